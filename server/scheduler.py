"""The scheduler: gathers the pending work of many sessions of one model into one ONNX Runtime run.

Two kinds of work share each run, stacked along the state's batch axis:
- steps (streamed input, prompts): tokens [seq] of one session, from a state slot to a state slot;
- generations: a session generating tokens. It stays in the running batch, one token per run, until it
  finishes: sessions join and leave between any two runs (continuous batching), and the next tokens of
  all generating sessions are sampled together, vectorised (sampling.sample_batch), each from its own
  random stream, so a session's tokens never depend on what else is in the batch.

One iteration: take the queued steps and the runnable generations (at most `max_batch` in all; a
session has at most one step in flight, because a request holds its session's lock, and a generation
feeds one token per run), group rows of equal length (no padding, so nothing leaks between sessions),
run each group once, scatter the new states into the slab, then hand the results back on the event
loop. Work that arrives while a run is in flight forms the next batch, so batches grow with load by
themselves (low latency when idle, big batches when busy); `max_wait_s` optionally holds a batch that
starts from idle a little to let more join.

Results are committed by callbacks the scheduler calls on the event loop for every row that ran, even
if the caller went away meanwhile: the slab already holds the new state, so the session's position
must follow. A step whose caller left before its run is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from rnnserve.server import metrics
from rnnserve.server.runtime import LAST_LOGITS, OnnxModel, Outputs, SlotRunner
from rnnserve.server.sampling import SamplingParams, log_softmax, sample_batch
from rnnserve.server.slab import StateSlab

log = logging.getLogger(__name__)

LAST_LOGPROBS = "logprobs_last"  # log-softmax of the last position, [vocab] per row (language models)


@dataclass
class StepRequest:
    tokens: np.ndarray  # int64 [seq]
    src: int  # state slot read
    dst: int  # state slot written (== src, or a scratch slot while a long input is not committed)
    last: bool  # language model: only the last position's log-probabilities are wanted
    commit: Callable[[Outputs], None] | None  # called on the loop once the step ran, caller or not
    future: asyncio.Future[Outputs] = field(repr=False)
    enqueued_at: float = field(default_factory=time.monotonic, repr=False)


class Generation(Protocol):
    """A session generating tokens in the running batch (the engine implements it)."""

    slot: int
    token: int  # the token to feed at the next run (already sampled)
    sampling: SamplingParams
    ready_at: float  # time.monotonic() when `token` became ready to run (for the queue-wait metric)

    def draw(self) -> float:
        """The next uniform draw of this generation's own random stream."""
        ...

    @property
    def active(self) -> bool:
        """False once it finished or was cancelled: it leaves the batch."""
        ...

    @property
    def runnable(self) -> bool:
        """False while its reader is far behind: it sits out runs until they catch up."""
        ...

    def stepped(self, logprobs: np.ndarray, next_token: int) -> None:
        """After a run: logprobs [vocab] follow `token`; next_token was sampled from them."""
        ...

    def left(self) -> None:
        """It left the batch: no run on its slot is in flight or will be."""
        ...


@dataclass(frozen=True)
class SchedulerOptions:
    max_batch: int = 64  # most rows (sessions) in one iteration
    max_wait_s: float = 0.0  # extra time a batch starting from idle waits for company
    # A small batch (at most this many tokens in all) whose runs have lately taken under
    # `inline_max_run_s` runs on the event loop itself: handing it to the worker thread and back costs
    # ~0.2 ms (thread wake-ups, GIL hand-over), more than such a run. Everything else goes to the worker,
    # so the loop keeps serving gRPC I/O while ORT computes (ORT releases the GIL).
    # inline_max_tokens = 0: always the worker.
    inline_max_tokens: int = 4
    inline_max_run_s: float = 0.0005
    # ... and a batch of one row (nothing else queued) whose runs take under this: the loop has little
    # else to do meanwhile, so it may block a little longer.
    inline_alone_max_run_s: float = 0.005
    # A small, fast step (as for inline_max_run_s) arriving when the scheduler has had nothing to do
    # for this long runs at once in its caller (no queue, no task switch): at low load there is nobody
    # to batch with. Under load steps arrive closer together than this and go through the queue, where
    # they batch. (Measured: letting slow runs take this path too kept a design-sized model at batch 1
    # under load, 616 vs 2086 tokens/s for 64 streams.)
    direct_after_idle_s: float = 0.0002


@dataclass
class _Batch:
    steps: list[StepRequest]
    generations: list[Generation]


@dataclass
class _Result:
    step_outputs: list[Outputs | Exception]  # per step: its outputs, or why its run failed
    generations: list[tuple[np.ndarray, int] | Exception]  # per generation: (logprobs [vocab], next token)
    seconds: float  # how long _execute took


_PENDING = RuntimeError("not sampled")  # a placeholder, always replaced


class Scheduler:
    """Batches the work of one model version. Start it with `start()`, stop with `stop()`."""

    def __init__(
        self, model: OnnxModel, slab: StateSlab, executor: Executor, options: SchedulerOptions | None = None
    ) -> None:
        self.model = model
        self.slab = slab
        self.runner = SlotRunner(model, slab)
        self.options = options or SchedulerOptions()
        self._executor = executor
        self._steps: deque[StepRequest] = deque()
        self._generations: deque[Generation] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches_run = 0  # ORT runs
        self.steps_run = 0  # rows run (steps and generated tokens)
        self._small_run_s = float("inf")  # moving average of small batches' run time; inf = not yet seen
        self._busy = False  # a batch is being run by the loop (inline or in the worker)
        self._idle_since = 0.0  # perf_counter() when the last run ended

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"scheduler {self.model.key}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for generation in self._generations:
            generation.left()
        self._generations.clear()

    def wake(self) -> None:
        """Something became runnable (a paused generation's reader caught up)."""
        self._wake.set()

    async def step(
        self,
        tokens: np.ndarray,
        src: int,
        dst: int,
        *,
        last: bool = False,
        commit: Callable[[Outputs], None] | None = None,
    ) -> Outputs:
        """Run tokens int64 [seq] from the state in slot `src`, writing the new state to slot `dst`.

        Returns this row's outputs: {"logprobs_last": [vocab]} when `last` (language model), else
        logits [seq, vocab] (language model) or probs [classes] (streaming classifier).
        """
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        request = StepRequest(tokens, src, dst, last, commit, future)
        if self._may_run_directly(len(tokens)):
            # Low load: run it here and now; the trip through the queue and the scheduler's task
            # would cost more than the run, and there is nobody to batch with.
            batch = _Batch([request], [])
            metrics.observe_queue_wait(self.model.key, [request.enqueued_at])
            try:
                result = self._execute_small(batch)
            finally:
                self._idle_since = time.perf_counter()
            self._deliver(batch, result)
            return future.result()
        self._steps.append(request)
        self._wake.set()
        return await future

    def _may_run_directly(self, tokens: int) -> bool:
        return (
            not self._busy
            and not self._steps
            and not self._generations
            and tokens <= self.options.inline_max_tokens
            and self._small_run_s < self.options.inline_max_run_s
            and time.perf_counter() - self._idle_since > self.options.direct_after_idle_s
        )

    def add_generation(self, generation: Generation) -> None:
        """Put a generation into the running batch from the next run on."""
        self._generations.append(generation)
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------------------

    def _next_batch(self) -> _Batch:
        room = self.options.max_batch
        steps: list[StepRequest] = []
        while self._steps and len(steps) < room:
            request = self._steps.popleft()
            if not request.future.done():  # its caller went away before it ran: drop it
                steps.append(request)
        room -= len(steps)
        chosen: list[Generation] = []
        waiting: list[Generation] = []
        for generation in self._generations:
            if not generation.active:
                generation.left()
            elif len(chosen) < room and generation.runnable:
                chosen.append(generation)
            else:
                waiting.append(generation)
        # Round robin when more generate than fit in a batch: who sat out goes first next time.
        self._generations = deque(waiting + chosen)
        return _Batch(steps, chosen)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._next_batch()
            if not batch.steps and not batch.generations:
                self._wake.clear()
                await self._wake.wait()
                if self.options.max_wait_s > 0:
                    await asyncio.sleep(self.options.max_wait_s)
                continue
            metrics.observe_queue_wait(
                self.model.key, [r.enqueued_at for r in batch.steps] + [g.ready_at for g in batch.generations]
            )
            tokens = sum(len(r.tokens) for r in batch.steps) + len(batch.generations)
            # Alone (one row, nothing queued), a slower run still goes inline: there is little other
            # work for the loop to overlap with it, and the hop to the worker would be pure cost.
            alone = len(batch.steps) + len(batch.generations) == 1 and not self._steps
            limit = self.options.inline_alone_max_run_s if alone else self.options.inline_max_run_s
            inline = tokens <= self.options.inline_max_tokens and self._small_run_s < limit
            self._busy = True
            try:
                if inline:
                    result = self._execute_small(batch)
                    await asyncio.sleep(0)  # let gRPC I/O through between inline runs
                else:
                    result = await loop.run_in_executor(self._executor, self._execute, batch)
                    if tokens <= self.options.inline_max_tokens:
                        self._observe_small(result.seconds)
            except Exception as exc:
                log.exception("model %s failed on a batch of %d rows", self.model.key, tokens)
                self._fail(batch, exc)
                continue
            finally:
                self._busy = False
                self._idle_since = time.perf_counter()
            self._deliver(batch, result)

    def _execute_small(self, batch: _Batch) -> _Result:
        """Run a small batch on the event loop itself."""
        result = self._execute(batch)
        self._observe_small(result.seconds)
        return result

    def _observe_small(self, seconds: float) -> None:
        """Track how long small batches take to run (the run itself, not the hop to the worker)."""
        seen = self._small_run_s
        self._small_run_s = seconds if seen == float("inf") else 0.9 * seen + 0.1 * seconds

    def _fail(self, batch: _Batch, exc: Exception) -> None:
        for request in batch.steps:
            if not request.future.done():
                request.future.set_exception(exc)
        for generation in batch.generations:  # its state may be half-written: it cannot go on
            self._generations.remove(generation)
            generation.left()

    def _deliver(self, batch: _Batch, result: _Result) -> None:
        """On the loop: commit every row that ran, then wake its caller."""
        for request, outputs in zip(batch.steps, result.step_outputs, strict=True):
            if isinstance(outputs, Exception):
                if not request.future.done():
                    request.future.set_exception(outputs)
                continue
            if request.commit is not None:
                request.commit(outputs)
            if not request.future.done():
                request.future.set_result(outputs)
        for generation, stepped in zip(batch.generations, result.generations, strict=True):
            if isinstance(stepped, Exception):  # it cannot go on; its reader gets the error
                self._generations.remove(generation)
                generation.left()
            else:
                generation.stepped(*stepped)

    # -- in the worker (or inline) ------------------------------------------------------------------

    def _execute(self, batch: _Batch) -> _Result:
        """Run each group of equal-length rows once; log-softmax and sample the generations' next tokens.

        A group whose run fails fails its rows only; their states are untouched (the slab is written
        after a successful run).
        """
        started = time.perf_counter()
        # rows: (tokens [seq], src, dst, last); steps first, then generations
        rows = [(r.tokens, r.src, r.dst, r.last) for r in batch.steps]
        rows += [(np.array([g.token], dtype=np.int64), g.slot, g.slot, True) for g in batch.generations]
        groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
        for i, (tokens, _, _, last) in enumerate(rows):
            groups[(len(tokens), last)].append(i)
        outputs: list[Outputs | Exception] = [{}] * len(rows)
        for (_, last), indices in groups.items():
            tokens = np.stack([rows[i][0] for i in indices])  # [group, seq]
            run_started = time.perf_counter()
            try:
                out = self.runner.run(
                    tokens, [rows[i][1] for i in indices], [rows[i][2] for i in indices], last
                )
            except Exception as exc:
                log.exception("model %s failed on a run of %d rows", self.model.key, len(indices))
                for i in indices:
                    outputs[i] = exc
                continue
            metrics.observe_run(self.model.key, len(indices), time.perf_counter() - run_started)
            if LAST_LOGITS in out:
                out = {LAST_LOGPROBS: log_softmax(out[LAST_LOGITS])}  # [group, vocab]
            for j, i in enumerate(indices):
                outputs[i] = {name: value[j] for name, value in out.items()}
            self.batches_run += 1
            self.steps_run += len(indices)
        n = len(batch.steps)
        return _Result(
            outputs[:n], self._sample(batch.generations, outputs[n:]), time.perf_counter() - started
        )

    @staticmethod
    def _sample(
        generations: list[Generation], outputs: list[Outputs | Exception]
    ) -> list[tuple[np.ndarray, int] | Exception]:
        """Each generation's next token, sampled for all at once: (logprobs [vocab], token) or its error."""
        results: list[tuple[np.ndarray, int] | Exception] = []
        ok: list[int] = []  # generations whose run succeeded
        rows: list[np.ndarray] = []  # their logprobs [vocab]
        for k, out in enumerate(outputs):
            if isinstance(out, Exception):
                results.append(out)
            else:
                ok.append(k)
                rows.append(out[LAST_LOGPROBS])
                results.append(_PENDING)  # replaced below
        if ok:
            logprobs = np.stack(rows)  # [rows, vocab]
            uniforms = np.array([generations[k].draw() for k in ok])  # [rows], one per session's own stream
            tokens = sample_batch(logprobs, [generations[k].sampling for k in ok], uniforms)  # [rows]
            for row, k in enumerate(ok):
                results[k] = (logprobs[row], int(tokens[row]))
        return results
