"""Plain result types of the client, and their conversion from protobuf (shared by all clients)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from rnnserve.client.errors import SessionDiverged
from rnnserve.v1 import rnnserve_pb2 as pb

FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_STOP: "stop",
}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    task: str
    cell: str
    num_layers: int
    hidden_size: int
    num_directions: int
    vocab_size: int
    tokenizer: str
    special_tokens: dict[str, int]
    metrics: dict[str, float]
    latest: bool
    provider: str
    labels: list[str] = field(default_factory=list)  # classifier: class names
    pooling: str = ""  # classifier: max | mean | last
    classifier_mode: str = ""  # classifier: streaming | whole
    streams: bool = True  # whether sessions can be opened on it

    @classmethod
    def from_pb(cls, m: pb.ModelInfo) -> ModelInfo:
        return cls(
            name=m.name,
            version=m.version,
            task=m.task,
            cell=m.cell,
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            num_directions=m.num_directions,
            vocab_size=m.vocab_size,
            tokenizer=m.tokenizer,
            special_tokens=dict(m.special_tokens),
            metrics=dict(m.metrics),
            latest=m.latest,
            provider=m.provider,
            labels=list(m.labels),
            pooling=m.pooling,
            classifier_mode=m.classifier_mode,
            streams=m.streams,
        )


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    model: str
    version: str
    position: int
    created_at: float
    expires_at: float
    ttl_seconds: int
    task: str = "lm"
    labels: list[str] = field(default_factory=list)

    @classmethod
    def from_pb(cls, s: pb.SessionInfo) -> SessionInfo:
        return cls(
            s.session_id,
            s.model,
            s.version,
            s.position,
            s.created_at,
            s.expires_at,
            s.ttl_seconds,
            s.task,
            list(s.labels),
        )


@dataclass(frozen=True)
class Candidate:
    """One possible next token."""

    id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class Classification:
    """Class probabilities of a text; `probs` follows the model's label order."""

    label: str
    label_id: int
    probs: list[float]
    labels: list[str]

    @classmethod
    def from_pb(cls, c: pb.Classification, labels: Sequence[str]) -> Classification:
        return cls(c.label, c.label_id, list(c.probs), list(labels))

    def prob(self, label: str) -> float:
        """The probability of one class by name."""
        return self.probs[self.labels.index(label)]


@dataclass(frozen=True)
class FeedOutput:
    """What the model says after the tokens one `feed` appended."""

    position: int  # the session's position afterwards
    token_ids: list[int]  # the tokens appended
    top: list[Candidate]  # language model: next-token candidates, most likely first
    token_logprobs: list[float] = field(default_factory=list)  # per appended token, if asked
    classification: Classification | None = None  # streaming classifier: the text so far
    replayed: bool = False

    @classmethod
    def from_pb(cls, r: pb.StreamResponse, labels: Sequence[str] = ()) -> FeedOutput:
        return cls(
            position=r.position,
            token_ids=list(r.token_ids),
            top=[Candidate(c.id, c.text, c.logprob) for c in r.top],
            token_logprobs=list(r.token_logprobs),
            classification=Classification.from_pb(r.classification, labels)
            if r.HasField("classification")
            else None,
            replayed=r.replayed,
        )


@dataclass(frozen=True)
class GeneratedToken:
    """One sampled token as it arrives; `finish_reason` is set on the last one.

    `text` is the text this token made visible (possibly empty: a character not complete yet, text held
    back while it may start a stop string); `position` is the session's position after it."""

    id: int
    text: str
    logprob: float
    position: int
    finish_reason: str | None


@dataclass(frozen=True)
class GenerateMessage:
    """One message of a Generate call: the tokens the server sent together, as parallel lists.

    `text` is their texts joined; token i's text is `text[text_offsets[i - 1]:text_offsets[i]]` (from 0
    for i = 0, offsets in code points), its position `position - len(token_ids) + 1 + i`; `tokens`
    gives them as `GeneratedToken`s. `finish_reason` is set on the last message of a call."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    text_offsets: list[int]
    position: int  # the session's position after the last token of this message
    finish_reason: str | None

    @classmethod
    def from_pb(cls, r: pb.GenerateResponse) -> GenerateMessage:
        return cls(
            list(r.token_ids),
            list(r.logprobs),
            r.text,
            list(r.text_offsets),
            r.position,
            FINISH_REASONS[r.finish_reason],
        )

    def __len__(self) -> int:
        return len(self.token_ids)

    def skip(self, k: int) -> GenerateMessage:
        """This message without its first k tokens (those a reissued call sent again)."""
        cut = self.text_offsets[k - 1] if k else 0
        offsets = [o - cut for o in self.text_offsets[k:]]
        return GenerateMessage(
            self.token_ids[k:], self.logprobs[k:], self.text[cut:], offsets, self.position, self.finish_reason
        )

    @property
    def texts(self) -> list[str]:
        """Each token's text: `text` split at `text_offsets`."""
        text, starts = self.text, [0, *self.text_offsets[:-1]]
        return [text[a:b] for a, b in zip(starts, self.text_offsets, strict=True)]

    @cached_property
    def tokens(self) -> list[GeneratedToken]:
        """The tokens of this message, in order; `finish_reason` on the last one only (made once)."""
        first, last = self.position - len(self.token_ids) + 1, len(self.token_ids) - 1
        return [
            GeneratedToken(token, text, logprob, first + i, self.finish_reason if i == last else None)
            for i, (token, text, logprob) in enumerate(
                zip(self.token_ids, self.texts, self.logprobs, strict=True)
            )
        ]


class GenerateRecord:
    """What one Generate call has received so far (shared by the sync and asyncio streams): its
    messages, unpacked here, and from them the tokens, the text and why it ended."""

    def __init__(self) -> None:
        self._messages: list[GenerateMessage] = []
        self.finish_reason: str | None = None
        self._resent: list[int] = []  # tokens a reissued call will send again, still to come

    def reissued(self) -> None:
        """The call is being made again (same request_id): its first tokens are those received already."""
        self._resent = [t.id for t in self.tokens]

    def received(self, response: pb.GenerateResponse) -> GenerateMessage | None:
        """Unpack one response and record it; None when it holds only tokens received already."""
        message = GenerateMessage.from_pb(response)
        if self._resent:
            k = min(len(self._resent), len(message))
            if message.token_ids[:k] != self._resent[:k]:
                raise SessionDiverged(
                    f"the reissued Generate sent tokens {message.token_ids[:k]} where the first call sent "
                    f"{self._resent[:k]}: the server's session is not the one this generation started from"
                )
            del self._resent[:k]
            if k == len(message):
                return None
            message = message.skip(k)
        self._messages.append(message)
        if message.finish_reason:
            self.finish_reason = message.finish_reason
        return message

    @property
    def tokens(self) -> list[GeneratedToken]:
        """Every token received so far, in order."""
        return [t for m in self._messages for t in m.tokens]

    @property
    def text(self) -> str:
        """The text generated so far (stop strings excluded)."""
        return "".join(m.text for m in self._messages)


@dataclass(frozen=True)
class RefusedModel:
    """A bundle the server could not load (nothing of it is served)."""

    path: str
    reason: str


@dataclass(frozen=True)
class ReloadResult:
    """What `reload_models` changed: versions loaded, bundles refused, "name/version"s dropped."""

    loaded: list[ModelInfo]
    refused: list[RefusedModel]
    unloaded: list[str]

    @classmethod
    def from_pb(cls, r: pb.ReloadModelsResponse) -> ReloadResult:
        return cls(
            [ModelInfo.from_pb(m) for m in r.loaded],
            [RefusedModel(m.path, m.reason) for m in r.refused],
            list(r.unloaded),
        )


def input_fields(data: str | Sequence[int], text_field: str, tokens_field: str) -> dict[str, Any]:
    """Keyword arguments that put text or token ids into a request's oneof."""
    if isinstance(data, str):
        return {text_field: data}
    return {tokens_field: pb.TokenIds(ids=list(data))}
