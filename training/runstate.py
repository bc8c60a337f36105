"""A training run's own state, shared by both trainers: `last.pt` (written atomically, read back to
resume), RNG streams, the Ctrl-C flag that lets a step finish, the run clock, and `TrainingStopped`."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

LAST_FILE = "last.pt"  # the whole run state, for --resume (the exporter reads checkpoint.pt)


class TrainingStopped(Exception):
    """Training ended early (Ctrl-C or `max_steps`) after writing `last.pt`; `resume` continues the run.

    `checkpoint` is the exportable best checkpoint so far (a run stopped before its first evaluation is
    evaluated at the stop to write one), or None where none could be written (not rank 0)."""

    def __init__(self, last: Path, step: int, reason: str, checkpoint: Path | None = None) -> None:
        super().__init__(f"{reason} at step {step}; the run's state is in {last}")
        self.last, self.step, self.reason, self.checkpoint = last, step, reason, checkpoint


def check_new_run(out_dir: Path, resume: bool, force: bool, command: str) -> None:
    """Refuse to start a new run over another run's `last.pt` unless told: `resume` continues it, `force`
    starts over (overwriting its files). `command` (e.g. "rnnserve train lm") goes into the message."""
    last = out_dir / LAST_FILE
    if resume:
        if not last.is_file():
            raise FileNotFoundError(f"cannot resume: {last} does not exist")
    elif last.exists() and not force:
        raise ValueError(
            f"{out_dir} already holds a training run ({last}): continue it with "
            f"`{command} --out {out_dir} --resume`, or start a new run there with --force (overwrites "
            "its checkpoints), or pick another --out"
        )


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), Python `random` and NumPy RNG states, as weights_only-loadable values."""
    legacy: tuple[str, Any, int, int, float] = np.random.get_state()  # type: ignore[assignment]
    name, keys, pos, has_gauss, cached = legacy
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomically(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_suffix(".pt.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def read_run_config(out_dir: str | Path) -> dict[str, Any]:
    """The config a run in `out_dir` saved in its last.pt, ready to resume (its `max_steps` bound dropped)."""
    path = Path(out_dir) / LAST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist")
    config = dict(torch.load(path, map_location="cpu", weights_only=True)["config"])
    config.update(resume=True, max_steps=None, out_dir=str(out_dir))
    return config


class InterruptFlag:
    """While active, the first Ctrl-C only sets `raised` (the loop stops after the current step); a second
    Ctrl-C interrupts as usual. Outside the main thread it does nothing."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __enter__(self) -> InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class TimedProgress(Protocol):
    train_seconds: float


class RunClock:
    """Adds wall time to `progress.train_seconds` at each tick, so a resumed run reports its total, and
    tells how much of the time budget (minutes; None = no budget) is used."""

    def __init__(self, progress: TimedProgress, budget_min: float | None = None) -> None:
        self._progress, self._last = progress, time.perf_counter()
        self._budget_s = budget_min * 60.0 if budget_min else None

    def restart(self) -> None:
        """Start counting from now (set-up time before the first step is not training time)."""
        self._last = time.perf_counter()

    def tick(self) -> None:
        now = time.perf_counter()
        self._progress.train_seconds += now - self._last
        self._last = now

    def elapsed(self) -> float:
        return self._progress.train_seconds + (time.perf_counter() - self._last)

    def budget_fraction(self) -> float:
        """Share of the time budget used (0 without a budget)."""
        return min(1.0, self.elapsed() / self._budget_s) if self._budget_s else 0.0

    def out_of_time(self) -> bool:
        return self._budget_s is not None and self.elapsed() >= self._budget_s
