"""What each kind of model does: one class per task, chosen once per loaded model by `task_for`.

- `LanguageModelTask`: sessions stream text and Generate; a step's output is the next-token
  distribution (the last position's only, through the "last" graph, unless per-token log-probabilities
  are asked for); a Stream reply carries the top next-token candidates. A message (Stream or Generate)
  may end with its end-of-turn token <eos> (`end_turn_token`): for a plain LM that is the end of a
  document.
- `DialogueTask` (task "dialogue", docs/dialogue.md): a language model over a conversation whose turns
  end with <eos>; its step graph needs <eos> to be the last token of a step (that is where the context
  advances), so its inputs are cut after every <eos> (`chunks`).
- `StreamingClassifierTask` (classifier_mode "streaming": unidirectional): sessions stream text; a step's
  output is the class probabilities of the text so far, which a Stream reply carries; Classify runs each
  text from a fresh state in a scratch slot.
- `WholeTextClassifierTask` (classifier_mode "whole": bidirectional): no sessions (it reads a text from
  both ends); Classify runs padded batches of whole texts through the scheduler (`Scheduler.classify`).

The engine asks a model's task what is allowed (the task raises the refusal), how an input is cut into
steps and how Classify runs; the output processor (`InputUpdate`) asks it how a step's outputs change a
session. Beyond `task_for`, only loading reads the task (runtime.py: the language-model-only graphs).
"""

from __future__ import annotations

import asyncio
import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

from rnnserve.server.errors import FailedPrecondition, InvalidArgument
from rnnserve.server.repository import LoadedModel
from rnnserve.server.runner import LAST_LOGPROBS
from rnnserve.server.runtime import Outputs
from rnnserve.server.sampling import log_softmax, top_candidates
from rnnserve.server.sessions import CLASSIFY_SLOTS

if TYPE_CHECKING:
    from rnnserve.server.output import InputUpdate
    from rnnserve.server.scheduler import Scheduler
    from rnnserve.server.sessions import Session

T = TypeVar("T")
Candidate = tuple[int, str, float]  # (token id, its text, logprob) of a next-token candidate


@dataclass(frozen=True)
class Classification:
    """Class probabilities for a text (or a session's text so far)."""

    label: str
    label_id: int
    probs: list[float]

    @classmethod
    def from_probs(cls, probs: np.ndarray, labels: Sequence[str]) -> Classification:
        best = int(np.argmax(probs))
        return cls(labels[best], best, [float(p) for p in probs])


@dataclass
class FeedResult:
    """The answer to a Stream message (kept as the session's last applied input, for retries)."""

    session_id: str
    position: int  # after the input
    token_ids: list[int]
    token_logprobs: list[float]  # empty unless asked for; NaN where nothing predicted the token
    top: list[Candidate]  # language model: (id, text, logprob) of the next token, best first
    classification: Classification | None = None  # classifier: class probabilities of the text so far
    replayed: bool = False


@dataclass(frozen=True)
class FeedReply:
    """What a Stream reply carries besides the position: one of the two, by task."""

    top: list[Candidate]  # language model: the next token's candidates, best first
    classification: Classification | None  # classifier: class probabilities of the text so far


class ClassifyLimits(Protocol):
    """The engine limits Classify runs under (EngineLimits)."""

    @property
    def chunk_tokens(self) -> int: ...  # a long text runs as steps of at most this many tokens

    @property
    def classify_batch(self) -> int: ...  # texts per run of a whole-text classifier


class ModelTask(ABC):
    """What a kind of model allows and how its runs are read. One per loaded model version."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    @property
    def key(self) -> str:
        return self.model.key

    def check_session(self) -> None:  # noqa: B027 (allowed unless a task says otherwise)
        """Raise if sessions (Stream, Generate) cannot be opened on this model."""

    @abstractmethod
    def check_generate(self) -> None:
        """Raise if Generate is not for this model."""

    @abstractmethod
    def check_token_logprobs(self) -> None:
        """Raise if a Stream message may not ask for per-token log-probabilities."""

    @abstractmethod
    def check_classify(self) -> None:
        """Raise if Classify is not for this model."""

    def last_position(self, token_logprobs: bool) -> bool:
        """Whether an input's steps need only the last position's output (the "last" graph skips the
        vocabulary projection of every other position)."""
        return False

    def chunks(self, ids: Sequence[int], size: int) -> list[np.ndarray]:
        """An input's tokens as the steps it runs as: each int64 [seq], at most `size` tokens."""
        return chunks(ids, size)

    def end_turn_token(self) -> int:
        """The token a message with end_turn ends with; raise if this model has none."""
        raise FailedPrecondition(
            f"model {self.key} is a {self.model.manifest.task}: end_turn needs a language model or a "
            "dialogue model (it appends the end-of-turn token <eos>)"
        )

    @abstractmethod
    def absorb(self, update: InputUpdate, chunk: np.ndarray, outputs: Outputs) -> None:
        """Take a step's outputs for chunk tokens [seq] into `update` (not yet into the session)."""

    @abstractmethod
    def reply(self, session: Session, top_k: int) -> FeedReply:
        """What a Stream reply carries after an input was applied to the session."""

    @abstractmethod
    async def classify(
        self, scheduler: Scheduler, ids: list[list[int]], limits: ClassifyLimits
    ) -> list[np.ndarray]:
        """Class probabilities [classes] of each text (checked token ids), independently of sessions."""


class LanguageModelTask(ModelTask):
    def check_generate(self) -> None:
        pass

    def check_token_logprobs(self) -> None:
        pass

    def check_classify(self) -> None:
        raise self._not_a_classifier()

    def _not_a_classifier(self) -> FailedPrecondition:
        return FailedPrecondition(f"model {self.key} is a language model; Classify needs a classifier")

    def last_position(self, token_logprobs: bool) -> bool:
        return not token_logprobs

    def end_turn_token(self) -> int:
        eos = self.model.manifest.special_tokens.get("eos")
        if eos is None:
            raise FailedPrecondition(
                f"model {self.key} has no end-of-turn token (no 'eos' in its special tokens): end_turn "
                "cannot be used with it"
            )
        return eos

    def absorb(self, update: InputUpdate, chunk: np.ndarray, outputs: Outputs) -> None:
        if LAST_LOGPROBS in outputs:
            update.next_logprobs = outputs[LAST_LOGPROBS]  # [vocab]
            return
        all_logprobs = log_softmax(outputs["logits"])  # [seq, vocab]
        # the token at position i was predicted by the distribution before it (none before the first)
        previous = [update.next_logprobs, *all_logprobs[:-1]]
        update.token_logprobs += [
            math.nan if p is None else float(p[t]) for p, t in zip(previous, chunk, strict=True)
        ]
        update.next_logprobs = all_logprobs[-1]

    def reply(self, session: Session, top_k: int) -> FeedReply:
        assert session.next_logprobs is not None
        codec = self.model.codec
        top = [(i, codec.token_text(i), lp) for i, lp in top_candidates(session.next_logprobs, top_k)]
        return FeedReply(top, None)

    async def classify(
        self, scheduler: Scheduler, ids: list[list[int]], limits: ClassifyLimits
    ) -> list[np.ndarray]:
        raise self._not_a_classifier()


class DialogueTask(LanguageModelTask):
    """A dialogue model (HRED/VHRED): served as a language model over the conversation's token stream."""

    def chunks(self, ids: Sequence[int], size: int) -> list[np.ndarray]:
        """Cut after every <eos> (the step graph's contract: <eos> is only ever a step's last token,
        where the turn ends and the context advances), then at most `size` tokens a step."""
        eos = self.end_turn_token()
        steps: list[np.ndarray] = []
        start = 0
        for end in [i + 1 for i, t in enumerate(ids) if t == eos] + [len(ids)]:
            if end > start:
                steps += chunks(ids[start:end], size)
            start = end
        return steps


class ClassifierTask(ModelTask):
    """Both kinds of classifier: no Generate, class probabilities out."""

    def check_generate(self) -> None:
        raise FailedPrecondition(
            f"model {self.key} is a classifier; Generate needs a language model "
            "(a classifier session returns class probabilities from Stream)"
        )

    def check_token_logprobs(self) -> None:
        raise InvalidArgument(f"return_token_logprobs needs a language model; {self.key} is a classifier")

    def check_classify(self) -> None:
        pass

    def absorb(self, update: InputUpdate, chunk: np.ndarray, outputs: Outputs) -> None:
        update.class_probs = outputs["probs"]  # [classes]: of the text so far

    def reply(self, session: Session, top_k: int) -> FeedReply:
        assert session.class_probs is not None
        return FeedReply([], Classification.from_probs(session.class_probs, self.model.manifest.labels))


class StreamingClassifierTask(ClassifierTask):
    def __init__(self, model: LoadedModel) -> None:
        super().__init__(model)
        # A Classify runs each text in a scratch slot; this many at once, the rest wait their turn
        # (never competing with sessions for slots, see sessions.CLASSIFY_SLOTS).
        self._slots = asyncio.Semaphore(CLASSIFY_SLOTS)

    async def classify(
        self, scheduler: Scheduler, ids: list[list[int]], limits: ClassifyLimits
    ) -> list[np.ndarray]:
        return list(await asyncio.gather(*(self._one(scheduler, i, limits.chunk_tokens) for i in ids)))

    async def _one(self, scheduler: Scheduler, ids: list[int], chunk_tokens: int) -> np.ndarray:
        """One text from a fresh state (a scratch slot): probs [classes]. Waits for a classify slot
        rather than failing."""

        async def run() -> np.ndarray:
            slot = scheduler.slab.allocate()
            try:
                probs = None
                for chunk in chunks(ids, chunk_tokens):
                    probs = (await scheduler.step(chunk, slot, slot))["probs"]
                assert probs is not None
                return probs
            finally:
                scheduler.slab.free(slot)

        async with self._slots:
            return await finish_even_if_cancelled(run())


class WholeTextClassifierTask(ClassifierTask):
    def check_session(self) -> None:
        raise FailedPrecondition(
            f"model {self.key} is a bidirectional classifier: it reads each text from both ends, so it "
            "needs the whole text at once and cannot follow a stream; use Classify, or a unidirectional "
            "(streaming) classifier for live sentiment"
        )

    async def classify(
        self, scheduler: Scheduler, ids: list[list[int]], limits: ClassifyLimits
    ) -> list[np.ndarray]:
        """Texts sorted by length (similar lengths pad together), in groups of classify_batch; each group
        is one queued request (the runner pads it, and may run small groups of concurrent calls as one)."""
        pad = self.model.manifest.special_tokens["pad"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        size = limits.classify_batch
        groups = [order[start : start + size] for start in range(0, len(order), size)]
        results = await asyncio.gather(
            *(scheduler.classify([ids[i] for i in group], pad, size) for group in groups)
        )
        probs: list[np.ndarray] = [np.empty(0)] * len(ids)
        for group, group_probs in zip(groups, results, strict=True):  # group_probs [group, classes]
            for row, i in enumerate(group):
                probs[i] = group_probs[row]
        return probs


def task_for(model: LoadedModel) -> ModelTask:
    """The task class of a loaded model (the one place the manifest's task strings are read)."""
    manifest = model.manifest
    if manifest.task == "lm":
        return LanguageModelTask(model)
    if manifest.task == "dialogue":
        return DialogueTask(model)
    if manifest.classifier_mode == "whole":
        return WholeTextClassifierTask(model)
    return StreamingClassifierTask(model)


def chunks(ids: Sequence[int], size: int) -> list[np.ndarray]:
    """ids as steps of at most `size` tokens, each int64 [seq]."""
    return [np.asarray(ids[i : i + size], dtype=np.int64) for i in range(0, len(ids), size)]


async def finish_even_if_cancelled(work: Awaitable[T]) -> T:
    """Await work; if the caller is cancelled meanwhile, let it finish before passing the cancel on.

    Steps already queued write their state slots; cutting them short could free a slot a step is about
    to write, or leave a session's position behind its state.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():  # however many times the caller is cancelled meanwhile
            try:
                await asyncio.wait([task])
            except asyncio.CancelledError:
                continue
        raise
