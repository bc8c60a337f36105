"""Small helpers shared by test modules (import as `from support import ...`; tests/ is on sys.path)."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")
# Reviews the sentiment fixtures (conftest.classifier_checkpoints) classify: short, long, mixed.
SENTIMENT_TEXTS = [
    "the movie was wonderful and charming",
    "a dull , tedious plot",
    "it was so bad",
    "brilliant",
    "the acting was really superb but the story was clumsy and the film was lifeless",
]
CELLS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]  # every recurrent cell (conftest.cell_repo)
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
