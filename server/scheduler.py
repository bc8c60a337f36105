"""The scheduler: gathers pending steps of many sessions into one ONNX Runtime run.

Every step is (tokens [seq], state of one session). Steps waiting at the same moment are grouped by
sequence length (so no padding can leak into any state), stacked along the state's batch axis, run once
in a worker thread (the event loop keeps serving I/O meanwhile), and scattered back. Steps that arrive
while a run is in flight form the next batch, so batches grow with load by themselves; `max_wait_s`
optionally holds the first step a little to let more join.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from rnnserve.server import metrics
from rnnserve.server.runtime import OnnxModel, Outputs, State

log = logging.getLogger(__name__)


@dataclass
class StepRequest:
    tokens: np.ndarray  # int64 [seq]
    state: State  # batch 1
    future: asyncio.Future[tuple[Outputs, State]] = field(repr=False)
    enqueued_at: float = field(default_factory=time.monotonic, repr=False)


@dataclass(frozen=True)
class SchedulerOptions:
    max_batch: int = 64  # most sessions in one run
    max_wait_s: float = 0.0  # extra time the first step of a batch waits for company
    # A small batch (at most this many tokens in all) whose runs have lately taken under
    # `inline_max_run_s` runs on the event loop itself: handing it to the worker thread and back costs
    # ~0.2 ms (thread wake-ups, GIL hand-over), more than such a run. Everything else goes to the worker,
    # so the loop keeps serving I/O while it runs. inline_max_tokens = 0: always the worker.
    inline_max_tokens: int = 4
    inline_max_run_s: float = 0.0005


class Scheduler:
    """Batches steps for one model version. Start it with `start()`, stop with `stop()`."""

    def __init__(self, model: OnnxModel, executor: Executor, options: SchedulerOptions | None = None) -> None:
        self.model = model
        self.options = options or SchedulerOptions()
        self._executor = executor
        self._queue: asyncio.Queue[StepRequest] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches_run = 0
        self.steps_run = 0
        self._small_run_s = float("inf")  # moving average of small batches' run time; inf = not yet seen

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"scheduler {self.model.key}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def step(self, tokens: np.ndarray, state: State) -> tuple[Outputs, State]:
        """Run tokens [seq] from `state` (batch 1); returns (this session's row of every output, new state).

        For a language model the outputs hold logits [seq, vocab]; for a streaming classifier probs [classes].
        """
        future: asyncio.Future[tuple[Outputs, State]] = asyncio.get_running_loop().create_future()
        await self._queue.put(StepRequest(tokens, state, future))
        return await future

    async def _next_batch(self) -> list[StepRequest]:
        batch = [await self._queue.get()]
        if self.options.max_wait_s > 0 and self._queue.empty():
            await asyncio.sleep(self.options.max_wait_s)
        while len(batch) < self.options.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return [r for r in batch if not r.future.done()]  # drop steps whose caller went away

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            metrics.observe_queue_wait(self.model.key, [r.enqueued_at for r in batch])
            small = sum(len(r.tokens) for r in batch) <= self.options.inline_max_tokens
            started = time.perf_counter()
            try:
                if small and self._small_run_s < self.options.inline_max_run_s:
                    results = self._run_groups(batch)
                else:
                    results = await loop.run_in_executor(self._executor, self._run_groups, batch)
            except Exception as exc:
                log.exception("model %s failed on a batch of %d steps", self.model.key, len(batch))
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            if small:
                elapsed = time.perf_counter() - started
                seen = self._small_run_s
                self._small_run_s = elapsed if seen == float("inf") else 0.9 * seen + 0.1 * elapsed
            for request, result in zip(batch, results, strict=True):
                if not request.future.done():
                    request.future.set_result(result)

    def _run_groups(self, batch: list[StepRequest]) -> list[tuple[Outputs, State]]:
        """Run each same-length group as one batch (in the worker, or inline); results in request order."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i, request in enumerate(batch):
            groups[len(request.tokens)].append(i)
        results: list[tuple[Outputs, State] | None] = [None] * len(batch)
        for indices in groups.values():
            tokens = np.stack([batch[i].tokens for i in indices])  # [group, seq]
            state = self.model.concat_states([batch[i].state for i in indices])
            started = time.perf_counter()
            outputs, new_state = self.model.run(tokens, state)  # each output [group, ...]
            metrics.observe_run(self.model.key, len(indices), time.perf_counter() - started)
            for j, (i, st) in enumerate(
                zip(indices, self.model.split_state(new_state, len(indices)), strict=True)
            ):
                results[i] = ({name: value[j] for name, value in outputs.items()}, st)
            self.batches_run += 1
            self.steps_run += len(indices)
        return [r for r in results if r is not None]
