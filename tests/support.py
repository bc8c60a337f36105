"""Small helpers shared by test modules (import as `from support import ...`; tests/ is on sys.path)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from rnnserve.cells import CELLS as CELLS_REGISTRY

T = TypeVar("T")
# Reviews the sentiment fixtures (conftest.classifier_checkpoints) classify: short, long, mixed.
SENTIMENT_TEXTS = [
    "the movie was wonderful and charming",
    "a dull , tedious plot",
    "it was so bad",
    "brilliant",
    "the acting was really superb but the story was clumsy and the film was lifeless",
]
CELLS = list(CELLS_REGISTRY)  # every recurrent cell (conftest.cell_repo)
CELL_TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n"  # their vocabulary
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    """Every sample of http://127.0.0.1:port/metrics by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def run_engine_with(make_engine: Callable[[], Any], work: Callable[[Any], Awaitable[T]]) -> T:
    """Build an engine (in the event loop: it needs one), start it, await `work(engine)`, stop it."""

    async def go() -> T:
        engine = make_engine()
        engine.start()
        try:
            return await work(engine)
        finally:
            await engine.stop()

    return asyncio.run(go())


# What a scheduler's ONNX Runtime runs go through in the worker thread: its SlotRunner, whose `run` runs
# steps and `run_block` K-step generation blocks (a hook replaces them).
RUN_METHODS = ("run", "run_block")


def model_runs(scheduler: Any) -> Any:
    return scheduler.runner.slots


class HeldRuns:
    """From the `start`-th model run after entering on, runs wait in the ORT worker until `release()`
    (or exit): calls that need a run stay in flight, however fast the machine. `held` is set once a run
    waits; `runs` counts every run. (Give the server inline_max_tokens=0: every run goes to the worker.)"""

    def __init__(self, server: Any, start: int = 1) -> None:
        self.server = server
        self.start = start
        self.runs = 0  # counted in the (one) worker thread
        self.held = threading.Event()
        self._released = threading.Event()
        self._real: dict[tuple[Any, str], Callable[..., Any]] = {}

    def __enter__(self) -> HeldRuns:
        for scheduler in self.server.engine.schedulers.values():
            runner = model_runs(scheduler)
            for method in RUN_METHODS:
                run = self._real[(runner, method)] = getattr(runner, method)

                def held(*args: Any, run: Callable[..., Any] = run) -> Any:
                    self.runs += 1
                    if self.runs >= self.start and not self._released.is_set():
                        self.held.set()
                        assert self._released.wait(60), "the test never released the held run"
                    return run(*args)

                setattr(runner, method, held)
        return self

    def release(self) -> None:
        self._released.set()

    def __exit__(self, *exc: object) -> None:
        self.release()
        for (runner, method), run in self._real.items():
            setattr(runner, method, run)


def wait_for(condition: Callable[[], bool], what: str, limit_s: float = 60.0) -> None:
    """Poll until `condition` holds (a bound against a hang, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
