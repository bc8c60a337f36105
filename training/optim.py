"""Optimisers and learning-rate schedules of the training skeleton (any task: see training/trainer.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "plateau")


class OptimizerConfig(Protocol):
    """The fields the optimiser and schedule read (TrainConfig has them; so does RunSettings)."""

    @property
    def optimizer(self) -> str: ...
    @property
    def lr(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def momentum(self) -> float: ...
    @property
    def schedule(self) -> str: ...
    @property
    def warmup_steps(self) -> int: ...
    @property
    def plateau_patience(self) -> int: ...


def make_optimizer(model: torch.nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD with momentum, as configured."""
    params, lr, wd = model.parameters(), config.lr, config.weight_decay
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=wd)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")


def lr_factor(step: int, warmup: int, total: int, cosine: bool, time_fraction: float = 0.0) -> float:
    """Multiplier of the peak lr before optimiser step `step` (0-based): linear warm-up, then cosine to 0.

    With a time budget, `time_fraction` (the share of it used so far) drives the cosine when it is ahead
    of the step count, so a run cut short by the clock still ends annealed.
    """
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_fraction))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    opt: torch.optim.Optimizer,
    config: OptimizerConfig,
    total_steps: int,
    time_fraction: Callable[[], float] | None = None,
    plateau_mode: Literal["min", "max"] = "min",
) -> Any:
    """LambdaLR (stepped per batch) for warm-up/cosine, ReduceLROnPlateau (stepped with each evaluation's
    score; `plateau_mode` "max" when a higher score is better), or None.
    `time_fraction()`: the share of the time budget used so far (cosine follows it when it is ahead)."""
    if config.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {config.schedule!r}")
    if config.schedule == "plateau":
        if config.warmup_steps:
            raise ValueError("warmup_steps works with the none and cosine schedules, not plateau")
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode=plateau_mode, factor=0.5, patience=config.plateau_patience
        )
    if config.schedule == "none" and not config.warmup_steps:
        return None
    warmup, cosine = config.warmup_steps, config.schedule == "cosine"
    used = time_fraction or (lambda: 0.0)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total_steps, cosine, used()))
