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

The next batch is chosen and started as soon as a run ends, before that run's results are handed back
(a pipeline two runs deep: ONNX Runtime computes while the loop applies tokens and talks gRPC). A
generation of the finished run goes on at once, with the token just sampled for it, if it will still be
running once that run is handed back (`Generation.continues_after_run`: a token's end is known when it
is sampled); the others wait for the hand-over.

Results are committed by callbacks the scheduler calls on the event loop for every row that ran, even
if the caller went away meanwhile: the slab already holds the new state, so the session's position
must follow (and the caller, cancelled, returns only once that commit is done, so the next request on
its session sees it). A step whose caller left before its run is dropped.
"""

from __future__ import annotations

import asyncio
import bisect
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
from rnnserve.server.sampling import Sampler, draw_batch, log_softmax_and_weights, sample_batch
from rnnserve.server.slab import SlotError, StateSlab

log = logging.getLogger(__name__)

WORKER_HANDOFF_S = 5e-5  # see Scheduler._launch

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
    taken: bool = field(default=False, repr=False)  # in a batch: it will run and be committed
    # Made only when the caller is cancelled while the step is in flight: set once it was committed.
    settled: asyncio.Future[None] | None = field(default=None, repr=False)

    def settle(self) -> None:
        if self.settled is not None and not self.settled.done():
            self.settled.set_result(None)


class Generation(Protocol):
    """A session generating tokens in the running batch (the engine implements it)."""

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

    def continues_after_run(self) -> bool:
        """Asked after a run fed it `token`, before `stepped` hands the run's results over: whether it
        will still be active and runnable then. (Whether a token ends a generation is known when the
        token is sampled, so the next run can start while this one's results are handed over.)"""
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
    # the token each generation feeds (its `token`, or the one just sampled for it when the batch
    # starts before the previous run's results were handed over)
    generation_tokens: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.steps or self.generations)

    @property
    def tokens(self) -> int:
        return sum(len(r.tokens) for r in self.steps) + len(self.generations)


Sampled = tuple[np.ndarray, int]  # a generation's logprobs [vocab] after its token, and the next token


@dataclass
class _Result:
    step_outputs: list[Outputs | Exception]  # per step: its outputs, or why its run failed
    generations: list[Sampled | Exception]  # per generation: what was sampled, or why its run failed
    seconds: float  # how long _execute took


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
        self.metrics = metrics.ModelMetrics(model.key)
        self._steps: deque[StepRequest] = deque()
        self._generations: deque[Generation] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches_run = 0  # ORT runs
        self.steps_run = 0  # rows run (steps and generated tokens)
        self._small_run_s = float("inf")  # moving average of small batches' run time; inf = not yet seen
        self._busy = False  # a batch is being run by the loop (inline or in the worker)
        self._idle_since = 0.0  # perf_counter() when the last run ended
        self._running: tuple[_Batch, asyncio.Future[_Result]] | None = None  # the run in flight, if any

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"scheduler {self.model.key}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._running is not None:  # a batch in flight when stopped: its callers must not wait on
            self._fail(self._running[0], RuntimeError(f"model {self.model.key} stopped"))
            self._running = None
        for generation in self._generations:
            generation.left()
        self._generations.clear()

    @property
    def generating(self) -> int:
        """Sessions in the running batch of generations (some may be sitting out a run)."""
        return len(self._generations)

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
        if src < 0 or dst < 0:  # -1 is "no slot" (a closed session's): it would index the last row
            raise SlotError(f"internal error: a step on state slot {src} -> {dst}")
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        request = StepRequest(tokens, src, dst, last, commit, future)
        if self._may_run_directly(len(tokens)):
            # Low load: run it here and now; the trip through the queue and the scheduler's task
            # would cost more than the run, and there is nobody to batch with.
            batch = _Batch([request], [])
            self.metrics.observe_queue_wait([request.enqueued_at])
            try:
                result = self._execute_small(batch)
            finally:
                self._idle_since = time.perf_counter()
            self._deliver(batch, result)
            return future.result()
        self._steps.append(request)
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            if request.taken:
                # Its run is in flight and will be committed: the caller lets go of its session only
                # after that, so the next request on the session sees the session as this one left it
                # (and a retry of this input is recognised as applied).
                request.settled = asyncio.get_running_loop().create_future()
                await asyncio.wait([request.settled])
            raise  # (not taken: it is dropped, never run)

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
        if generation.slot < 0:
            raise SlotError(f"internal error: a generation on state slot {generation.slot}")
        self._generations.append(generation)
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------------------

    def _next_batch(self, handing_over: dict[Generation, int | None]) -> _Batch:
        """The queued steps and runnable generations for the next run.

        `handing_over`: the generations of a run whose results are not handed over yet, with the token
        sampled for each (None if its run failed). They continue with that token if they will still
        be running once it is (`continues_after_run`); the others wait for the hand-over.
        """
        room = self.options.max_batch
        steps: list[StepRequest] = []
        while self._steps and len(steps) < room:
            request = self._steps.popleft()
            if not request.future.done():  # its caller went away before it ran: drop it
                request.taken = True
                steps.append(request)
        room -= len(steps)
        chosen: list[Generation] = []
        tokens: list[int] = []
        waiting: list[Generation] = []
        for generation in self._generations:
            if generation in handing_over:
                token = handing_over[generation]
                if token is not None and len(chosen) < room and generation.continues_after_run():
                    chosen.append(generation)
                    tokens.append(token)
                else:
                    waiting.append(generation)
            elif not generation.active:
                generation.left()
            elif len(chosen) < room and generation.runnable:
                chosen.append(generation)
                tokens.append(generation.token)
            else:
                waiting.append(generation)
        # Round robin when more generate than fit in a batch: who sat out goes first next time.
        self._generations = deque(waiting + chosen)
        return _Batch(steps, chosen, tokens)

    async def _loop(self) -> None:
        """Run batches one after another. A batch that goes to the worker thread starts as soon as
        the previous run ended, before that run's results are handed over on the loop (a pipeline of
        two: ONNX Runtime computes while the loop applies tokens and talks gRPC)."""
        running: tuple[_Batch, asyncio.Future[_Result]] | None = None
        while True:
            if running is None:
                batch = self._next_batch({})
                if not batch:
                    self._wake.clear()
                    await self._wake.wait()
                    if self.options.max_wait_s > 0:
                        await asyncio.sleep(self.options.max_wait_s)
                    continue
                running = self._launch(batch)
            batch, job = running
            try:
                result = await job
            except Exception as exc:
                log.exception("model %s failed on a batch of %d rows", self.model.key, batch.tokens)
                self._running = None
                self._fail(batch, exc)
                running = None
                continue
            finally:
                self._idle_since = time.perf_counter()
            self._running = None
            handing_over = dict(zip(batch.generations, self._sampled(result), strict=True))
            following = self._next_batch(handing_over)
            if following and not self._runs_inline(following):
                running = self._launch(following)  # the worker runs it while we hand over below
                self._deliver(batch, result)
            else:
                self._busy = False
                self._deliver(batch, result)
                running = self._launch(following) if following else None
                await asyncio.sleep(0)  # let gRPC I/O (and the callers just answered) through

    @staticmethod
    def _sampled(result: _Result) -> list[int | None]:
        """The token sampled for each generation of a run (None where its run failed)."""
        return [None if isinstance(g, Exception) else g[1] for g in result.generations]

    def _runs_inline(self, batch: _Batch) -> bool:
        """Small fast batches run on the loop itself (see SchedulerOptions.inline_max_tokens)."""
        # Alone (one row, nothing queued), a slower run still goes inline: there is little other
        # work for the loop to overlap with it, and the hop to the worker would be pure cost.
        alone = len(batch.steps) + len(batch.generations) == 1 and not self._steps
        limit = self.options.inline_max_run_s if not alone else self.options.inline_alone_max_run_s
        return batch.tokens <= self.options.inline_max_tokens and self._small_run_s < limit

    def _launch(self, batch: _Batch) -> tuple[_Batch, asyncio.Future[_Result]]:
        """Start a batch: inline (done when this returns) or in the worker thread."""
        self._observe_queue_wait(batch)
        self._busy = True
        loop = asyncio.get_running_loop()
        if self._runs_inline(batch):
            job: asyncio.Future[_Result] = loop.create_future()
            try:
                job.set_result(self._execute_small(batch))
            except Exception as exc:
                job.set_exception(exc)
            self._running = batch, job
            return batch, job
        job = asyncio.wrap_future(self._executor.submit(self._execute_timed, batch))
        self._running = batch, job  # until its results are handed over (failed by stop() if not)
        # Let go of the GIL for a moment: the worker thread, just woken, needs it to get into ONNX
        # Runtime, and whatever the loop runs next (handing results over, gRPC) would hold it until
        # the loop next blocks. Measured with 64 sessions generating in-process: ~30k -> ~33k tokens/s.
        time.sleep(WORKER_HANDOFF_S)
        return batch, job

    def _execute_timed(self, batch: _Batch) -> _Result:
        """In the worker: run a batch, and note how long small ones take (for the inline decision)."""
        result = self._execute(batch)
        if batch.tokens <= self.options.inline_max_tokens:
            self._observe_small(result.seconds)
        return result

    def _observe_queue_wait(self, batch: _Batch) -> None:
        """Each step's wait, and the generations' longest (once per run: 64 observations per token
        step would cost more than the sampling)."""
        waited = [r.enqueued_at for r in batch.steps]
        if batch.generations:
            # (a generation continuing before its last token was handed over has not waited at all)
            waited.append(min(time.monotonic(), min(g.ready_at for g in batch.generations)))
        self.metrics.observe_queue_wait(waited)

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
            request.settle()
        for generation in batch.generations:  # its state may be half-written: it cannot go on
            self._generations.remove(generation)
            generation.left()

    def _deliver(self, batch: _Batch, result: _Result) -> None:
        """On the loop: commit every row that ran, then wake its caller."""
        for request, outputs in zip(batch.steps, result.step_outputs, strict=True):
            if isinstance(outputs, Exception):
                if not request.future.done():
                    request.future.set_exception(outputs)
                request.settle()
                continue
            if request.commit is not None:
                request.commit(outputs)
            if not request.future.done():
                request.future.set_result(outputs)
            request.settle()
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
        after a successful run). Rows are the steps, then the generations (one token each, only the
        last position wanted), which all fall into one group, in order, after any steps of that shape.
        """
        started = time.perf_counter()
        steps, n = batch.steps, len(batch.steps)
        groups: dict[tuple[int, bool], list[int]] = defaultdict(list)  # (seq, last) -> row indices
        for i, r in enumerate(steps):
            groups[(len(r.tokens), r.last)].append(i)
        if batch.generations:
            groups[(1, True)].extend(range(n, n + len(batch.generations)))
        src = [r.src for r in steps] + [g.slot for g in batch.generations]
        dst = [r.dst for r in steps] + [g.slot for g in batch.generations]
        generation_tokens = np.asarray(batch.generation_tokens, dtype=np.int64).reshape(-1, 1)  # [gens, 1]
        step_outputs: list[Outputs | Exception] = [{}] * n
        generated: list[Sampled | Exception] = []
        for (_, last), indices in groups.items():
            first_generation = bisect.bisect_left(indices, n)  # rows before it are steps
            parts = [generation_tokens] if first_generation < len(indices) else []
            if first_generation:
                parts.insert(0, np.stack([steps[i].tokens for i in indices[:first_generation]]))
            tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)  # [group, seq]
            run_started = time.perf_counter()
            try:
                out = self.runner.run(tokens, [src[i] for i in indices], [dst[i] for i in indices], last)
            except Exception as exc:
                log.exception("model %s failed on a run of %d rows", self.model.key, len(indices))
                for i in indices[:first_generation]:
                    step_outputs[i] = exc
                generated = (
                    [exc] * (len(indices) - first_generation)
                    if first_generation < len(indices)
                    else generated
                )
                continue
            self.metrics.observe_run(len(indices), time.perf_counter() - run_started)
            if LAST_LOGITS in out:
                logprobs, weights = log_softmax_and_weights(out[LAST_LOGITS])  # [group, vocab] each
                out = {LAST_LOGPROBS: logprobs}
            for j, i in enumerate(indices[:first_generation]):
                step_outputs[i] = {name: value[j] for name, value in out.items()}
            if first_generation < len(indices):
                rows = slice(first_generation, None)
                generated = self._sample(batch.generations, out[LAST_LOGPROBS][rows], weights[rows])
            self.batches_run += 1
            self.steps_run += len(indices)
        return _Result(step_outputs, generated, time.perf_counter() - started)

    @staticmethod
    def _sample(
        generations: list[Generation], logprobs: np.ndarray, weights: np.ndarray
    ) -> list[tuple[np.ndarray, int] | Exception]:
        """Each generation's next token from its row of logprobs [generations, vocab] (and of weights,
        its unnormalised probabilities), sampled for all at once: (its logprobs [vocab], token)."""
        samplers = [g.sampler for g in generations]
        uniforms = draw_batch(samplers)  # [generations], each from its session's own stream
        tokens = sample_batch(logprobs, [s.params for s in samplers], uniforms, weights).tolist()
        return [(logprobs[k], tokens[k]) for k in range(len(generations))]
