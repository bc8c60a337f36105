"""What a Generate call asks for and gets back, apart from the running batch: the request and the digest
a retry must repeat, the tokens handed to the reader and why a generation finished, and the flush policy
that says when tokens go to the reader.

The running generation that uses them is `rnnserve.server.generation.Generation` (which re-exports every
name here); the stop-string matcher and the replay of a retried generation's tokens are in
`rnnserve.server.generated_text`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rnnserve.server.sampling import SamplingParams

Clock = Callable[[], float]  # seconds, monotonic (time.monotonic; tests drive their own)


class FinishReason:
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"


@dataclass(slots=True)
class GeneratedToken:
    token_id: int
    text: str  # text made visible by this token (stop strings held back / never sent)
    logprob: float
    position: int
    finish_reason: str | None = None


@dataclass(frozen=True)
class GenerateRequest:
    sampling: SamplingParams
    max_tokens: int
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    prompt: str | list[int] | None = None
    expected_position: int | None = None
    max_tokens_per_message: int = 1  # tokens one hand-over to the reader may carry
    flush_interval_ms: float | None = None  # how long a token may wait for company; None: the default
    request_id: str = ""  # a retry with the same id gets the tokens already made (see AppliedGeneration)
    end_turn: bool = False  # close the turn when it finishes: its last token is <eos> (see Engine.generate)


def request_digest(request: GenerateRequest) -> bytes:
    """What a retry under the same request_id must repeat: everything that decides the tokens (the
    packaging, max_tokens_per_message and flush_interval_ms, may differ)."""
    s = request.sampling
    prompt = request.prompt if isinstance(request.prompt, str | None) else tuple(request.prompt)
    fields: tuple[object, ...] = (
        (s.temperature, s.top_k, s.top_p, s.seed),
        request.max_tokens,
        tuple(request.stop),
        tuple(request.stop_token_ids),
        request.ignore_eos,
        prompt,
        request.expected_position,
    )
    if request.end_turn:  # (only when set: the digests of requests without it stay as they were)
        fields += (("end_turn",),)
    return hashlib.sha256(repr(fields).encode()).digest()


@dataclass(frozen=True)
class FlushPolicy:
    """When a generation hands its tokens to the reader (one message each hand-over, when allowed)."""

    per_message: int  # as soon as this many are ready
    interval_s: float  # or once the oldest has waited this long (0: at once)
    min_sessions: int = 0  # the interval applies only while this many sessions generate on the model

    def interval(self, generating: int, phase: float) -> float:
        """The wait for a generation whose phase is in [0, 1): spread over [interval/2, interval], so
        that the sessions of a batch, which get their tokens in the same runs, do not all become due
        in the same run (64 messages at once would hold the event loop, and so the next run, for
        milliseconds)."""
        if generating < self.min_sessions:
            return 0.0
        return self.interval_s * (0.5 + 0.5 * phase)
