"""The scheduler: decides what runs next for one model version, and keeps the model runner busy.

Data flows one way: handler → engine → **scheduler** (who runs next) → model runner (runner.py: runs
graphs, samples) → output processor (output.py: the one place a session advances) → the caller's future
or the generation's reader.

Work of many sessions shares each run, stacked along the state's batch axis:
- steps (streamed input, prompts, rollback replays): tokens [seq] of one session, slot to slot;
- generations: a session generating tokens stays in the running batch until it finishes (continuous
  batching: sessions join and leave between any two runs). Each run it makes one token through the step
  graph and the host sampler, or, when the model has a generation graph and the session's sampling
  settings fit it, K tokens in one block (see runner.py);
- whole-text Classify groups (a whole-sequence classifier): up to classify_batch texts each, no state;
  queued with the steps, a row per text.

One iteration takes the queued steps and the runnable generations (at most `max_batch` rows; a session
has at most one step in flight, because a request holds its session's lock), runs them, and hands the
results back on the event loop. Work that arrives while a run is in flight forms the next batch, so
batches grow with load by themselves; `max_wait_s` optionally holds a batch that starts from idle.

The next batch is chosen and started as soon as a run ends, before that run's results are handed back
(a pipeline two runs deep: ONNX Runtime computes while the loop applies tokens and talks gRPC). A
generation of the finished run goes on at once if it will still be running once that run is handed back
(`Generation.continues_after_run`: a token's end is known when it is sampled).

Results are committed on the event loop for every row that ran, even if the caller went away meanwhile:
the slab already holds the new state, so the session must follow (a caller cancelled while its step is in
flight returns only once that commit is done). A step whose caller left before its run is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from rnnserve.server import metrics, output
from rnnserve.server.runner import ModelRunner, RunOutput, RunPlan
from rnnserve.server.runtime import OnnxModel, Outputs
from rnnserve.server.sampling import Sampler
from rnnserve.server.slab import SlotError, StateSlab
from rnnserve.server.slots import BlockOutput
from rnnserve.server.work import Batch, ClassifyRequest, Generation, StepRequest, batch_rows

log = logging.getLogger(__name__)

WORKER_HANDOFF_S = 5e-5  # see Scheduler._launch


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
    # Trace spans around each run (tracing.Tracing, with its `run(model, plan)` context manager); None: off.
    tracer: Any = None


class Scheduler:
    """Batches the work of one model version. Start it with `start()`, stop with `stop()`."""

    def __init__(
        self, model: OnnxModel, slab: StateSlab, executor: Executor, options: SchedulerOptions | None = None
    ) -> None:
        self.model = model
        self.slab = slab
        self.options = options or SchedulerOptions()
        self.metrics = metrics.ModelMetrics(model.key)
        self.runner = ModelRunner(model, slab, self.metrics)
        self._executor = executor
        self._steps: deque[StepRequest | ClassifyRequest] = deque()  # in arrival order
        self._generations: deque[Generation] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._small_run_s = float("inf")  # moving average of small batches' run time; inf = not yet seen
        self._busy = False  # a batch is being run by the loop (inline or in the worker)
        self._idle_since = 0.0  # perf_counter() when the last run ended
        self._running: tuple[Batch, asyncio.Future[RunOutput]] | None = None  # the run in flight, if any

    @property
    def batches_run(self) -> int:
        return self.runner.batches_run

    @property
    def steps_run(self) -> int:
        return self.runner.steps_run

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
    def idle(self) -> bool:
        """Nothing queued, running or generating: stopping it now would fail no caller."""
        return not self._steps and self._running is None and not self._busy and not self._generations

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
            batch = Batch(steps=[request])
            self.metrics.observe_queue_wait([request.enqueued_at])
            try:
                result = self._execute_small(batch)
            finally:
                self._idle_since = time.perf_counter()
            self._deliver(batch, result)
            return future.result()
        self._enqueue(request)
        try:
            return await future
        except asyncio.CancelledError:
            # (A deadline or a client that went away cancels its call's task.) Not taken: it is dropped,
            # never run. Taken and not delivered yet (the cancel may come after it was: then it was
            # committed and nothing is left to wait for):
            if request.taken and not request.delivered:
                # Its run is in flight and will be committed: the caller lets go of its session only
                # after that, so the next request on the session sees the session as this one left it
                # (and a retry of this input is recognised as applied).
                request.settled = asyncio.get_running_loop().create_future()
                await asyncio.wait([request.settled])
            raise

    async def classify(self, texts: Sequence[Sequence[int]], pad: int, run_rows: int) -> np.ndarray:
        """Class probabilities [texts, classes] of whole texts (token ids each) through a whole-sequence
        classifier, in padded runs of at most run_rows texts (see runner.py). No state: a caller that
        goes away leaves nothing behind (its group is dropped, or its result ignored)."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._enqueue(ClassifyRequest(texts, pad, run_rows, future))
        return await future

    def _enqueue(self, request: StepRequest | ClassifyRequest) -> None:
        self._steps.append(request)
        self._wake.set()

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

    def expresses(self, sampler: Sampler) -> bool:
        """Whether a generation with these settings runs in K-step blocks (see runner.py)."""
        return self.runner.expresses(sampler)

    # -- leaving the batch --------------------------------------------------------------------------

    def _leave(self, generation: Generation) -> None:
        """A generation leaves the running batch: if it ran blocks, its session is first settled
        exactly after its last kept token by replaying that block's kept tokens (see Generation)."""
        rollback = generation.rollback()
        if rollback is None:
            generation.left()
            return
        start_state, tokens = rollback
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()

        def commit(outputs: Outputs) -> None:
            generation.settled(outputs)
            generation.left()

        def failed(f: asyncio.Future[Outputs]) -> None:
            if not f.cancelled() and f.exception() is not None:
                generation.settled(None)
                generation.left()

        future.add_done_callback(failed)
        tokens_array = np.asarray(tokens, dtype=np.int64)  # [kept]
        self._enqueue(
            StepRequest(tokens_array, generation.slot, generation.slot, True, commit, future, start_state)
        )

    # -- the loop -----------------------------------------------------------------------------------

    def _next_batch(self, handing_over: dict[Generation, int | None]) -> Batch:
        """The queued steps and runnable generations for the next run.

        `handing_over`: the generations of a run whose results are not handed over yet, with the token
        sampled for each (None if its run failed). They continue if they will still be running once it
        is (`continues_after_run`); the others wait for the hand-over.
        """
        # Those that finished or were cancelled leave first: leaving may queue a replay step (see _leave).
        for generation in [g for g in self._generations if g not in handing_over and not g.active]:
            self._generations.remove(generation)
            self._leave(generation)
        room = self.options.max_batch
        batch = Batch()
        taken = 0  # rows: one per step, one per text of a Classify group
        while self._steps and taken < room:
            request = self._steps[0]
            if request.future.done():  # its caller went away before it ran: drop it
                self._steps.popleft()
                continue
            rows = len(request.texts) if isinstance(request, ClassifyRequest) else 1
            if taken and taken + rows > room:
                break  # a group that does not fit goes first next run
            self._steps.popleft()
            request.taken = True
            taken += rows
            if isinstance(request, ClassifyRequest):
                batch.classify.append(request)
            else:
                batch.steps.append(request)
        room -= taken
        chosen: list[Generation] = []
        waiting: list[Generation] = []
        for generation in self._generations:
            if generation in handing_over:
                token = handing_over[generation]
                if token is not None and len(chosen) < room and generation.continues_after_run():
                    chosen.append(generation)
                    batch.add(generation, generation.next_token(token))
                else:
                    waiting.append(generation)
            elif len(chosen) < room and generation.runnable:
                chosen.append(generation)
                batch.add(generation, generation.token)
            else:
                waiting.append(generation)
        # Round robin when more generate than fit in a batch: who sat out goes first next time.
        self._generations = deque(waiting + chosen)
        return batch

    async def _loop(self) -> None:
        """Run batches one after another. A batch that goes to the worker thread starts as soon as
        the previous run ended, before that run's results are handed over on the loop (a pipeline of
        two: ONNX Runtime computes while the loop applies tokens and talks gRPC)."""
        running: tuple[Batch, asyncio.Future[RunOutput]] | None = None
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
                log.exception("model %s failed on a batch of %d rows", self.model.key, batch_rows(batch))
                self._running = None
                self._fail(batch, exc)
                running = None
                continue
            finally:
                self._idle_since = time.perf_counter()
            self._running = None
            following = self._next_batch(self._handing_over(batch, result))
            if following and not self._runs_inline(following):
                running = self._launch(following)  # the worker runs it while we hand over below
                self._deliver(batch, result)
            else:
                self._busy = False
                self._deliver(batch, result)
                running = self._launch(following) if following else None
                await asyncio.sleep(0)  # let gRPC I/O (and the callers just answered) through

    @staticmethod
    def _handing_over(batch: Batch, result: RunOutput) -> dict[Generation, int | None]:
        """Each generation of a run with the token it sampled last (None where its run failed); a
        block's generations decide here where they end (`scanned`)."""
        handing_over: dict[Generation, int | None] = {
            g: None if isinstance(s, Exception) else s[1]
            for g, s in zip(batch.sampled, result.sampled, strict=True)
        }
        block = result.block
        for row, generation in enumerate(batch.block):
            if isinstance(block, BlockOutput):
                generation.scanned(block.ids[row], block.logprobs[row])
                handing_over[generation] = int(block.ids[row, -1])
            else:
                handing_over[generation] = None
        return handing_over

    def _runs_inline(self, batch: Batch) -> bool:
        """Small fast batches run on the loop itself (see SchedulerOptions.inline_max_tokens)."""
        if batch.block:
            return False  # K tokens a row: never small
        # Alone (one row, nothing queued), a slower run still goes inline: there is little other
        # work for the loop to overlap with it, and the hop to the worker would be pure cost.
        alone = batch_rows(batch) == 1 and not self._steps
        limit = self.options.inline_max_run_s if not alone else self.options.inline_alone_max_run_s
        return self._plan(batch).tokens <= self.options.inline_max_tokens and self._small_run_s < limit

    def _plan(self, batch: Batch) -> RunPlan:
        """The runner's view of a batch, made once per batch (the inline decision and the run use it)."""
        if batch.plan is None:
            batch.plan = RunPlan(
                steps=batch.steps,
                sampled=batch.sampled,
                sampled_tokens=batch.sampled_tokens,
                block=batch.block,
                block_tokens=batch.block_tokens,
                block_graph=self.runner.block_graph_for(batch.block),
                classify=batch.classify,
            )
        return batch.plan

    def _launch(self, batch: Batch) -> tuple[Batch, asyncio.Future[RunOutput]]:
        """Start a batch: inline (done when this returns) or in the worker thread."""
        self._observe_queue_wait(batch)
        self._busy = True
        loop = asyncio.get_running_loop()
        if self._runs_inline(batch):
            job: asyncio.Future[RunOutput] = loop.create_future()
            try:
                job.set_result(self._execute_small(batch))
            except Exception as exc:
                job.set_exception(exc)
            self._running = batch, job
            return batch, job
        job = asyncio.wrap_future(self._executor.submit(self._execute_timed, batch))
        self._running = batch, job  # until its results are handed over (failed by stop() if not)
        # Let go of the GIL for a moment: the worker thread, just woken, needs it to get into ONNX
        # Runtime, and whatever the loop runs next (handing results over) would hold it until the loop
        # next blocks. Measured with 64 sessions generating in-process: ~30k -> ~33k tokens/s. Only for
        # generations: with streamed steps only, the loop's next work is gRPC I/O, and the sleep (50 us
        # asked, ~115 us taken) cost ~9% of the loop's time per message (py-spy, bench/profile_serving.py).
        if batch.sampled and not batch.block:
            time.sleep(WORKER_HANDOFF_S)
        return batch, job

    def _execute_timed(self, batch: Batch) -> RunOutput:
        """In the worker: run a batch, and note how long small ones take (for the inline decision)."""
        plan = self._plan(batch)
        result = self._run(plan)
        if plan.tokens <= self.options.inline_max_tokens:
            self._observe_small(result.seconds)
        return result

    def _observe_queue_wait(self, batch: Batch) -> None:
        """Each step's wait, and the generations' longest (once per run: 64 observations per token
        step would cost more than the sampling)."""
        waited = [r.enqueued_at for r in batch.steps] + [r.enqueued_at for r in batch.classify]
        generations = batch.generations
        if generations:
            # (a generation continuing before its last token was handed over has not waited at all)
            waited.append(min(time.monotonic(), min(g.ready_at for g in generations)))
        self.metrics.observe_queue_wait(waited)

    def _execute_small(self, batch: Batch) -> RunOutput:
        """Run a small batch on the event loop itself."""
        result = self._run(self._plan(batch))
        self._observe_small(result.seconds)
        return result

    def _run(self, plan: RunPlan) -> RunOutput:
        """Run a plan (in the worker or on the loop), in a trace span when tracing."""
        if self.options.tracer is None:
            return self.runner.execute(plan)
        with self.options.tracer.run(self.model.key, plan):
            return self.runner.execute(plan)

    def _observe_small(self, seconds: float) -> None:
        """Track how long small batches take to run (the run itself, not the hop to the worker)."""
        seen = self._small_run_s
        self._small_run_s = seconds if seen == float("inf") else 0.9 * seen + 0.1 * seconds

    def _fail(self, batch: Batch, exc: Exception) -> None:
        for request in batch.steps:
            if not request.future.done():
                request.future.set_exception(exc)
            request.settle()
        for group in batch.classify:
            output.deliver_classified(group, exc)
        for generation in batch.generations:  # its state may be half-written: it cannot go on
            self._drop(generation)

    def _drop(self, generation: Generation) -> None:
        """A generation whose run failed leaves the batch (its reader gets the error)."""
        if generation in self._generations:
            self._generations.remove(generation)
        self._leave(generation)

    def _deliver(self, batch: Batch, result: RunOutput) -> None:
        """On the loop: hand every row that ran to the output processor, which commits it."""
        for request, outputs in zip(batch.steps, result.step_outputs, strict=True):
            output.deliver_step(request, outputs)
        for group, probs in zip(batch.classify, result.classified, strict=True):
            output.deliver_classified(group, probs)
        for generation, stepped in zip(batch.sampled, result.sampled, strict=True):
            if isinstance(stepped, Exception):  # it cannot go on; its reader gets the error
                self._drop(generation)
            else:
                generation.stepped(*stepped)
        for row, generation in enumerate(batch.block):
            if isinstance(result.block, BlockOutput):
                generation.block_stepped(result.block, row)
            else:
                self._drop(generation)
