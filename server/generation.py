"""A Generate call in the model's running batch: its sampling state, the stop rules decided as each token
is sampled, K-step blocks and their rollback, and handing tokens to the reader when the flush policy
says they are due.

The engine's Generate path (generate_call.py) validates a request, applies its prompt and puts a
`Generation` into the scheduler's running batch; the scheduler feeds it tokens and calls `stepped`
after every run.

The request, the tokens handed over, finish reasons and the flush policy are in
`rnnserve.server.generate_request`; the stop-string matcher and the replay of a retried generation in
`rnnserve.server.generated_text`. Every public name of both is re-exported here, so callers import them
all from this module.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from rnnserve.server import output
from rnnserve.server.errors import NotFound, Unavailable
from rnnserve.server.generate_request import (
    Clock,
    FinishReason,
    FlushPolicy,
    GeneratedToken,
    GenerateRequest,
    request_digest,
)
from rnnserve.server.generated_text import Replay, StopMatcher
from rnnserve.server.runtime import Outputs
from rnnserve.server.sampling import Sampler
from rnnserve.server.scheduler import Scheduler
from rnnserve.server.sessions import AppliedGeneration, Session
from rnnserve.server.slab import State
from rnnserve.server.slots import BlockOutput
from rnnserve.server.text import IncrementalDecoder

__all__ = [
    "MAX_AHEAD",
    "Clock",
    "FinishReason",
    "FlushPolicy",
    "GenerateRequest",
    "GeneratedToken",
    "Generation",
    "Replay",
    "StopMatcher",
    "request_digest",
]

# A generation runs ahead of its reader by at most this many tokens, then sits out runs until the
# reader catches up (the tokens it makes are applied to the session whether or not anyone reads them).
MAX_AHEAD = 64
_GOLDEN_RATIO = 0.6180339887498949  # k * it mod 1 spreads any run of integers k evenly over [0, 1)


class Generation:
    """One Generate call in the model's running batch (implements work.Generation).

    The scheduler feeds `token` and calls `stepped` with what follows it; this applies the token to the
    session and queues it for the reader, who is woken when the flush policy says the tokens should go
    out. Whether a token ends the generation (stop strings and ids, <eos>, max_tokens) is decided when
    it is sampled (`_sampled_next`), a run before it is applied, which lets the scheduler start the next
    run before handing this one over.

    `stepped` runs for every session of the batch between two model runs, so it does as little as it
    can: without stop strings, turning tokens into text waits for the reader (`take`), which runs while
    the next batch is in ONNX Runtime.

    When its session closes it stops at the next run (`session_closed`), whether or not the reader is
    reading; the reader gets the tokens already made, then NotFound.

    K-step blocks (when the model's generation graph expresses its sampling settings): a block applies
    x0 (its `token`) and the K-1 tokens sampled after it, and samples one more. `scanned` decides each
    sampled token's end in order, exactly as one-token runs would; a generation that ends inside a block
    has run past its end, and leaves by replaying its kept tokens from the block's start state
    (`rollback`): an RNN's state is a pure function of its inputs, so the session ends exactly where K=1
    would have left it, with the distribution after its last token. A block's last sampled token that
    ends the generation is applied by one host step instead, like any finishing token.
    """

    def __init__(
        self,
        session: Session,
        request: GenerateRequest,
        eos: int | None,
        scheduler: Scheduler,
        flush: FlushPolicy,
        applied: AppliedGeneration,
        clock: Clock = time.monotonic,
        resume: Replay | None = None,
    ) -> None:
        assert session.next_logprobs is not None
        self.session = session
        self._applied = applied  # the session's last applied message from the first token on
        self._clock = clock  # for the flush interval
        self.slot = session.slot
        self._request = request
        self._eos = eos
        self._scheduler = scheduler
        self.sampler = Sampler(request.sampling)
        self._decoder = IncrementalDecoder(session.model.codec, list(session.recent_tokens))
        self._stops = StopMatcher(request.stop)
        self._stop_ids = set(request.stop_token_ids)
        self._decode_late = not request.stop  # no stop strings: text is made by the reader (see take)
        self._sampled = 0  # tokens sampled
        self._count = 0  # tokens generated (sampled and applied to the session)
        self._counted = 0  # of them, counted in the metric
        if resume is None:  # a new generation (or a retry of one cut short before its first token)
            applied.first_position = session.position
            applied.recent_before = tuple(session.recent_tokens)
        else:  # a retry going on after the tokens made before: the sampler's stream after as many draws
            made = len(applied.token_ids)
            self.sampler.draws(made)
            self._decoder, self._stops = resume.decoder, resume.stops
            self._sampled = self._count = self._counted = made
        self._ready: list[GeneratedToken] = []
        self._first_ready_at = 0.0  # clock() when the oldest of _ready was made
        self._handed_over = 0  # tokens taken by the reader so far
        self._flush = flush
        self._flush_phase = (session.slot * _GOLDEN_RATIO) % 1.0  # evenly spread over the slots in use
        self._wakeup = asyncio.Event()
        self._finished = False
        self._cancelled = False
        self._tokens_out = scheduler.metrics.tokens_out
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ready_at = time.monotonic()
        self._in_graph = scheduler.expresses(self.sampler)  # runs K-step blocks (else host steps)
        self._block_steps = scheduler.runner.model.default_generate_steps if self._in_graph else 1
        self._scan: list[GeneratedToken] = []  # a block's tokens kept, decided by `scanned`
        # The last block handed over and its row, and the tokens it kept: what `rollback` replays.
        self._last_block: tuple[BlockOutput, int, list[int]] | None = None
        first = self.sampler.choose(session.next_logprobs)
        self._sampled_next(first, float(session.next_logprobs[first]))

    @property
    def active(self) -> bool:
        return not (self._finished or self._cancelled or self.session.closed)

    def session_closed(self) -> None:
        """Its session was closed (Session.on_close): leave the batch at the next run (`active` is
        False now), even if the reader has stalled."""
        self._scheduler.wake()
        self._wakeup.set()

    @property
    def runnable(self) -> bool:
        return len(self._ready) + self._run_tokens <= MAX_AHEAD

    @property
    def in_block(self) -> bool:
        """Its next run is a K-step block: it can, and its next token does not end it (that one is
        applied by a host step)."""
        return self._in_graph and self._token_finish is None

    @property
    def _run_tokens(self) -> int:
        return self._block_steps if self.in_block else 1

    def continues_after_run(self) -> bool:
        if not self.active:
            return False
        if self._scan:  # after a block: it goes on unless a token it applied ends it
            ends = self._scan[-1].finish_reason is not None
            return not ends and len(self._ready) + len(self._scan) + self._run_tokens <= MAX_AHEAD
        return self._token_finish is None and len(self._ready) + 1 < MAX_AHEAD

    def next_token(self, sampled: int) -> int:
        return self.token if self._scan else sampled

    def scanned(self, ids: np.ndarray, logprobs: np.ndarray) -> None:
        """A block applied x0 (`token`) and ids[:-1], and sampled ids[-1] (ids, logprobs: [K]). Each
        sampled token's end is decided in order, as `_sampled_next` does for one-token runs; the tokens
        up to the first that ends the generation are kept."""
        kept = [GeneratedToken(self.token, self._token_text, self._logprob, 0, self._token_finish)]
        last = len(ids) - 1
        for i, (token, logprob) in enumerate(zip(ids.tolist(), logprobs.tolist(), strict=True)):
            self._sampled_next(token, logprob)
            if i == last:
                break  # x_K: sampled, not applied; the next run feeds it
            kept.append(GeneratedToken(token, self._token_text, logprob, 0, self._token_finish))
            if self._token_finish:
                break  # it ends here: the rest of the block ran past its end
        self._scan = kept

    def _sampled_next(self, token: int, logprob: float) -> None:
        """`token` was sampled: the next run feeds it. Whether it ends the generation (a stop string
        or id, <eos>, max_tokens) is decided now, so that the scheduler can start that next run
        before this one's results are handed over (see Scheduler._loop)."""
        self.token, self._logprob = token, logprob
        self._sampled += 1
        finish: str | None = None
        text = ""
        if not self._decode_late:
            text, stopped = self._stops.push(self._decoder.push(token))
            finish = FinishReason.STOP if stopped else None
        if finish is None:
            if token in self._stop_ids:
                finish = FinishReason.STOP
            elif token == self._eos and not self._request.ignore_eos:
                finish = FinishReason.EOS
            elif self._sampled == self._request.max_tokens:
                finish = FinishReason.LENGTH
            if finish and not self._decode_late:
                text += self._stops.flush()
        self._token_text, self._token_finish = text, finish

    def stepped(self, logprobs: np.ndarray, next_token: int) -> None:
        """After a host step that applied `token`: logprobs [vocab] follow it (a row of the batch's
        array until the generation leaves, see left); next_token was sampled from them."""
        token, finish = self.token, self._token_finish
        self._last_block = None  # the distribution after the last token is known: nothing to replay
        position = output.advance_by_generated(self.session, [token], logprobs)
        self._made([GeneratedToken(token, self._token_text, self._logprob, position, finish)])
        if not finish:
            self._sampled_next(next_token, float(logprobs[next_token]))

    def block_stepped(self, block: BlockOutput, row: int) -> None:
        """After a block (row `row` of it): hand over the tokens `scanned` kept."""
        kept, self._scan = self._scan, []
        ids = [t.token_id for t in kept]
        position = output.advance_by_generated(self.session, ids, None)
        for i, t in enumerate(kept):
            t.position = position - len(kept) + 1 + i
        self._last_block = block, row, ids
        self._made(kept)

    def _made(self, tokens: list[GeneratedToken]) -> None:
        """Tokens applied to the session: queue them for the reader (waking it when they are due)."""
        applied = self._applied
        if not self._count:
            self.session.last_applied = applied  # with the first change it makes (if no prompt did)
        self._count += len(tokens)
        applied.token_ids += [t.token_id for t in tokens]
        applied.logprobs += [t.logprob for t in tokens]
        applied.finish_reason = tokens[-1].finish_reason
        now = self._clock()
        if not self._ready:
            self._first_ready_at = now
        self._ready += tokens
        self.ready_at = time.monotonic()
        if tokens[-1].finish_reason:
            self._finished = True
        if self._due(now):
            self._wakeup.set()

    def rollback(self) -> tuple[State, list[int]] | None:
        """If its last run was a block, the block's start state and the tokens it kept: replaying them
        leaves the session exactly after its last kept token (and gives the distribution after it)."""
        if self._last_block is None or self.session.closed:
            return None
        block, row, ids = self._last_block
        return block.before_row(self._scheduler.runner.model, row), ids

    def settled(self, outputs: Outputs | None) -> None:
        self._last_block = None
        output.settle_after_generation(self.session, outputs)

    def _due(self, now: float) -> bool:
        """Whether the ready tokens should go to the reader now."""
        ready = len(self._ready)
        if not ready:
            return False
        if ready >= self._flush.per_message or ready >= MAX_AHEAD or not self.active or self.gone.done():
            return True
        if not self._handed_over:
            return True  # the first token never waits: time to first token is what a reader feels most
        return now - self._first_ready_at >= self._flush.interval(
            self._scheduler.generating, self._flush_phase
        )

    def _count_out(self) -> None:
        """The tokens-out metric, updated per hand-over to the reader rather than per token."""
        if self._count > self._counted:
            self._tokens_out.inc(self._count - self._counted)
            self._counted = self._count

    def left(self) -> None:
        if self.gone.done():
            return  # released already (see cancel)
        self._count_out()
        output.own_copy(self.session)  # (see stepped)
        self.gone.set_result(None)
        self._wakeup.set()

    def cancel(self) -> None:
        """The reader went away: leave the batch at the next run."""
        if self._finished and self._last_block is None:
            # Its last run was handed over and no run since included it (a finished token is known
            # when sampled): nothing is in flight on its slot and nothing to replay, so the session is
            # free now, a run earlier than the scheduler would notice.
            self.left()
            return
        if self.active:
            self._cancelled = True
        self._scheduler.wake()

    async def take(self) -> list[GeneratedToken]:
        """The tokens generated since the last call (at least one, in order), once they are due."""
        while not self._due(self._clock()):
            if self.gone.done() and not self._ready:
                if self.session.parked:
                    raise Unavailable(
                        f"session {self.session.id} moved to another replica while generating, after "
                        f"{self._count} tokens (all of them sent); retry: the call goes to its owner"
                    )
                if self.session.closed:
                    raise NotFound(
                        f"session {self.session.id} was closed while generating, after {self._count} "
                        "tokens (all of them sent); create a new session"
                    )
                raise RuntimeError(
                    f"generation on session {self.session.id} stopped: the model failed (see the server log)"
                )
            self._wakeup.clear()
            await self._wakeup.wait()
        tokens, self._ready = self._ready, []
        self._handed_over += len(tokens)
        if self._decode_late:
            for t in tokens:
                t.text = self._decoder.push(t.token_id)
        self._count_out()
        if len(tokens) >= MAX_AHEAD:
            self._scheduler.wake()  # it was sitting out runs
        return tokens
