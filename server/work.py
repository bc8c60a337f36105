"""The kinds of work the scheduler queues and batches: a step of one session, a group of texts to
classify, and a generation in the running batch (implemented by generation.py); and a batch of them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from rnnserve.server.runner import RunPlan
from rnnserve.server.runtime import Outputs
from rnnserve.server.sampling import Sampler
from rnnserve.server.slab import State
from rnnserve.server.slots import BlockOutput


@dataclass
class StepRequest:
    tokens: np.ndarray  # int64 [seq]
    src: int  # state slot read
    dst: int  # state slot written (== src, or a scratch slot while a long input is not committed)
    last: bool  # language model: only the last position's log-probabilities are wanted
    commit: Callable[[Outputs], None] | None  # called on the loop once the step ran, caller or not
    future: asyncio.Future[Outputs] = field(repr=False)
    start_state: State | None = None  # batch-1 start state (graph layout) instead of slot src
    enqueued_at: float = field(default_factory=time.monotonic, repr=False)
    taken: bool = field(default=False, repr=False)  # in a batch: it will run and be committed
    # Made only when the caller is cancelled while the step is in flight: set once it was committed.
    settled: asyncio.Future[None] | None = field(default=None, repr=False)
    delivered: bool = field(default=False, repr=False)  # committed (or failed): settle() was called

    def settle(self) -> None:
        self.delivered = True
        if self.settled is not None and not self.settled.done():
            self.settled.set_result(None)


@dataclass
class ClassifyRequest:
    """A group of whole texts for a whole-sequence classifier (see runner.ClassifyRow)."""

    texts: Sequence[Sequence[int]]  # token ids of each text
    pad: int
    run_rows: int  # texts per run at most
    future: asyncio.Future[np.ndarray] = field(repr=False)  # probs [texts, classes]
    enqueued_at: float = field(default_factory=time.monotonic, repr=False)
    taken: bool = field(default=False, repr=False)


class Generation(Protocol):
    """A session generating tokens in the running batch (generation.py implements it)."""

    slot: int
    token: int  # the token to feed at the next run (already sampled)
    sampler: Sampler  # its sampling parameters and its own random stream
    ready_at: float  # time.monotonic() when `token` became ready to run (for the queue-wait metric)

    @property
    def active(self) -> bool:
        """False once it finished or was cancelled: it leaves the batch."""
        ...

    @property
    def runnable(self) -> bool:
        """False while its reader is far behind: it sits out runs until they catch up."""
        ...

    @property
    def in_block(self) -> bool:
        """Whether its next run is a K-step block of the generation graph (else one host-sampled step)."""
        ...

    def scanned(self, ids: np.ndarray, logprobs: np.ndarray) -> None:
        """After a block ran, before `continues_after_run`: the block sampled ids [K] (logprobs [K]);
        decide where it ends, as sampling one token at a time would."""
        ...

    def continues_after_run(self) -> bool:
        """Asked after a run, before its results are handed over: whether it will still be active and
        runnable then, with `next_token` (below) to feed."""
        ...

    def next_token(self, sampled: int) -> int:
        """The token it feeds next if it continues (`sampled`: what a host step sampled for it)."""
        ...

    def stepped(self, logprobs: np.ndarray, next_token: int) -> None:
        """After a host step: logprobs [vocab] follow `token`; next_token was sampled from them."""
        ...

    def block_stepped(self, block: BlockOutput, row: int) -> None:
        """After a block: hand over the tokens it kept (row `row` of the block)."""
        ...

    def rollback(self) -> tuple[State, list[int]] | None:
        """When it leaves: (start state, tokens) to replay so its session ends exactly after its last
        kept token with that token's next-token distribution, or None if nothing is to replay."""
        ...

    def settled(self, outputs: Outputs | None) -> None:
        """The replay ran (its outputs; None if it failed)."""
        ...

    def left(self) -> None:
        """It left the batch: no run on its slot is in flight or will be."""
        ...


@dataclass
class Batch:
    steps: list[StepRequest] = field(default_factory=list)
    sampled: list[Generation] = field(default_factory=list)  # one host-sampled token each
    sampled_tokens: list[int] = field(default_factory=list)  # what each feeds
    block: list[Generation] = field(default_factory=list)  # K tokens each in the generation graph
    block_tokens: list[int] = field(default_factory=list)
    classify: list[ClassifyRequest] = field(default_factory=list)
    plan: RunPlan | None = field(default=None, repr=False)  # what the runner runs, made once (see Scheduler)

    def __bool__(self) -> bool:
        return bool(self.steps or self.sampled or self.block or self.classify)

    @property
    def generations(self) -> list[Generation]:
        return self.sampled + self.block

    def add(self, generation: Generation, token: int) -> None:
        if generation.in_block:
            self.block.append(generation)
            self.block_tokens.append(token)
        else:
            self.sampled.append(generation)
            self.sampled_tokens.append(token)


def batch_rows(batch: Batch) -> int:
    texts = sum(len(c.texts) for c in batch.classify)
    return len(batch.steps) + len(batch.sampled) + len(batch.block) + texts
