"""Small helpers the benchmark scripts share (they run as `python bench/NAME.py`, so this imports as
`benchutil`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, in float64 (a reference, not a hot path)."""
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def median_ms(fn: Callable[[], object], repeats: int = 30) -> float:
    """Median wall time of `fn()` in milliseconds over `repeats` calls, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3
