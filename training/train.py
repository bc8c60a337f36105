"""Train a recurrent language model with truncated BPTT and save the best checkpoint.

Run it as `rnnserve train lm --out runs/lm` (see `rnnserve.training.cli`), or from Python:
`train_language_model(TrainConfig(out_dir="runs/lm"))`. The checkpoint is a plain dict (no pickled
modules, loadable with `torch.load(..., weights_only=True)`) with `tokenizer.json` written beside it
(the format: `rnnserve.training.checkpoint`).

This module is the LM's public face: the loop is the shared skeleton (`rnnserve.training.trainer`), the
LM's behaviour is `LanguageModelTask` (`rnnserve.training.lm_task`); the names below stay importable
from here.
"""

from __future__ import annotations

from pathlib import Path

from rnnserve.training.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    METRICS_FILE,
    TOKENIZER_FILE,
    checkpoint_kind,
    read_checkpoint,
    read_checkpoint_kind,
)
from rnnserve.training.config import TrainConfig
from rnnserve.training.data import encode_documents
from rnnserve.training.lm_task import (
    PLOT_FILE,
    LanguageModelTask,
    batchify,
    evaluate,
    load_checkpoint,
    plot_learning_curves,
    save_checkpoint,
    windows,
)
from rnnserve.training.optim import OPTIMIZERS, SCHEDULES, lr_factor, make_optimizer, make_scheduler
from rnnserve.training.runstate import LAST_FILE, TrainingStopped
from rnnserve.training.trainer import StepHook, Trainer, device_for

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "LAST_FILE",
    "METRICS_FILE",
    "OPTIMIZERS",
    "PLOT_FILE",
    "SCHEDULES",
    "TOKENIZER_FILE",
    "StepHook",
    "TrainConfig",
    "TrainingStopped",
    "batchify",
    "checkpoint_kind",
    "device_for",
    "encode_documents",
    "evaluate",
    "load_checkpoint",
    "lr_factor",
    "make_optimizer",
    "make_scheduler",
    "plot_learning_curves",
    "read_checkpoint",
    "read_checkpoint_kind",
    "save_checkpoint",
    "train_language_model",
    "windows",
]


def train_language_model(config: TrainConfig, on_step: StepHook | None = None) -> Path:
    """Train as configured; returns the best checkpoint's path (tokenizer.json is beside it).

    `last.pt` (the whole run state) is written every `save_every` steps and at each epoch end; with
    `config.resume` the run continues from it and ends with the weights an uninterrupted run would have.
    Ctrl-C or reaching `max_steps` writes `last.pt` and raises `TrainingStopped`. `on_step(global_step,
    model)` is called after each optimiser step (tests use it to interrupt a run or inspect weights).
    Under torchrun the run is data-parallel (see `rnnserve.training.distributed`): only rank 0 writes.
    """
    return Trainer(LanguageModelTask(config)).run(on_step)
