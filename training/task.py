"""`TrainTask`: what one kind of model brings to the training skeleton (`rnnserve.training.trainer`).

The skeleton owns the run: seeding, the optimiser and schedule, epochs and steps, mixed precision,
data parallelism, the time budget, evaluations, the best `checkpoint.pt` and the resumable `last.pt`,
progress, the metrics sink, Ctrl-C and `max_steps`. A task owns its data, its model, the loss of one
batch and what an evaluation measures. Read the methods in the order the skeleton calls them:

    settings()                          once: the run's settings from the task's own config
    prepare(dist, device, main)         once: data and tokenizer (returns the tokenizer to save)
    build_model()                       once: the model (the skeleton moves it to the device)
    load_run_state(last, dist, device)  once, when resuming: the task's entries of last.pt
    ready(model, main)                  once: print a summary
    for each epoch:
        epoch_batches(epoch)            the batches of this epoch (same seed => same batches)
        start_epoch()                   when the epoch starts at its first batch
        loss(model, batch)              per batch, in train mode, under autocast
        evaluate(model, position)       at `evaluation_steps(...)`, at a time-budget stop, and at a stop
                                        before any evaluation; then describe(evaluation, improved)
        end_epoch()                     after the epoch's last batch
        run_state(dist)                 whenever last.pt is written
    finish(checkpoint, model, progress) once, after a run that ended normally (rank 0)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from rnnserve.training.distributed import DistInfo


@dataclass(frozen=True)
class RunSettings:
    """What the skeleton reads from a task's config (each task maps its own config onto this)."""

    out_dir: Path
    command: str  # e.g. "rnnserve train lm": messages say `{command} --out DIR --resume`
    epochs: int
    seed: int
    resume: bool = False
    force: bool = False
    max_steps: int | None = None  # stop (saving last.pt) after this many steps in all
    save_every: int = 200  # write last.pt every this many steps (and at each epoch end)
    clip: float = 1.0  # gradient-norm clip
    threads: int | None = None
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    progress: bool = True  # the tqdm bar
    # The optimiser and schedule (training/optim.py).
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "none"
    warmup_steps: int = 0
    plateau_patience: int = 0
    patience: int | None = None  # early stopping: evaluations without a better score; None = never
    amp: str = "off"  # training/amp.py
    deterministic: bool = False  # deterministic kernels (cuDNN/cuBLAS)
    benchmark_kernels: bool = False  # cudnn.benchmark: only for fixed shapes (else it re-tunes per shape)
    time_budget_min: float | None = None  # evaluate and end the run normally after this much training
    log_every: int = 0  # a step row in metrics.jsonl every this many steps (0: evaluation rows only)
    tensorboard: bool = False  # mirror metrics.jsonl to TensorBoard


# last.pt files written before the two trainers became one named some progress fields differently.
_LEGACY_PROGRESS = {"epoch_tokens": "epoch_count", "epoch_examples": "epoch_count", "bad_epochs": "stale"}


@dataclass
class Progress:
    """Where a run is: everything besides model/optimiser/schedule/RNG/task that `last.pt` restores."""

    epoch: int = 1
    step_in_epoch: int = 0  # batches of this epoch already trained on
    global_step: int = 0
    epoch_loss_sum: float = 0.0  # count-weighted training loss so far this epoch (this rank)
    epoch_count: int = 0  # what that loss is averaged over: tokens, examples...
    best: float | None = None  # the best score so far (None: no evaluation yet)
    stale: int = 0  # evaluations since the best (early stopping)
    train_seconds: float = 0.0  # wall time spent training and evaluating, summed over resumed sessions
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Progress:
        """The progress a last.pt holds (older field names included)."""
        # (Their "no evaluation yet" values, inf for a loss and -1 for an accuracy, compare as None does.)
        return cls(**{_LEGACY_PROGRESS.get(k, k): v for k, v in saved.items()})

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch, self.epoch_loss_sum, self.epoch_count = 0, 0.0, 0


@dataclass(frozen=True)
class EvalPosition:
    """Where the run is when it evaluates (what a task's metrics may record)."""

    epoch: int  # the epoch in progress, from 1
    step_in_epoch: int  # batches of it trained on
    steps_in_epoch: int
    global_step: int
    train_loss: float  # mean training loss of this epoch so far, over every rank
    train_seconds: float

    @property
    def fractional_epoch(self) -> float:
        """Epochs trained so far, e.g. 1.5 halfway through the second."""
        return self.epoch + self.step_in_epoch / max(self.steps_in_epoch, 1) - 1


@dataclass
class Evaluation:
    """One evaluation. `metrics`: flat numbers (history, metrics.jsonl, the checkpoint's and later the
    manifest's metrics); it holds the task's `best_metric`. `details`: more for the checkpoint's metrics
    only (e.g. a classifier's full report with its confusion matrix)."""

    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)


class TrainTask(ABC):
    """One kind of model's training behaviour, driven by `Trainer` (see the module docstring).

    A subclass sets the class attributes, keeps its config dataclass in `self.config` and implements the
    abstract methods; the others have defaults that suit a task without carried state.
    """

    kind: ClassVar[str]  # the checkpoint's `kind` ("lm", "classifier", "dialogue"); last.pt is "<kind>-last"
    best_metric: ClassVar[str]  # the key of Evaluation.metrics that picks the best checkpoint
    higher_is_better: ClassVar[bool]  # accuracy: True; a loss: False
    count_unit: ClassVar[str] = "examples"  # what a batch's loss averages over; names the rate in step rows
    config: Any  # the task's config dataclass (saved in checkpoints as a dict)

    @abstractmethod
    def settings(self) -> RunSettings:
        """The run's settings, from the task's config."""

    @abstractmethod
    def prepare(self, dist: DistInfo, device: torch.device, main: bool) -> Tokenizer:
        """Read the data and build the tokenizer (on the training split only); keep what the other
        methods need. Under torchrun each rank keeps its own share of the training data (or raise a
        ValueError if the task trains in one process only). `main`: this rank prints. Returns the
        tokenizer, which the skeleton saves as tokenizer.json beside the checkpoint."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model, freshly initialised (the skeleton seeded torch and moves it to the device). It has an
        `args` dataclass, saved as the checkpoint's `model_args` (override `model_args` otherwise)."""

    def model_args(self, model: nn.Module) -> dict[str, Any]:
        """The model's constructor arguments as a dict (checkpoints' `model_args`)."""
        return asdict(model.args)  # type: ignore[call-overload]

    def config_dict(self) -> dict[str, Any]:
        """The config as checkpoints store it (`read_run_config` rebuilds it from last.pt to resume)."""
        return asdict(self.config)

    def ready(self, model: nn.Module, main: bool) -> None:  # noqa: B027 (optional hook)
        """Called once the model is built (and restored when resuming): print a summary if `main`."""

    @abstractmethod
    def steps_per_epoch(self) -> int:
        """Batches per epoch (the cosine schedule's length; every epoch should have this many)."""

    @abstractmethod
    def epoch_batches(self, epoch: int) -> Sequence[Any]:
        """The batches of `epoch` (from 1), in order. Called once per epoch, also when a resumed run
        re-enters an epoch part-way (the skeleton skips the batches already trained on), so the order must
        come from state that `run_state` saves (e.g. the data-order RNG at the epoch's start)."""

    def start_epoch(self) -> None:  # noqa: B027 (optional hook)
        """An epoch starts at its first batch (e.g. an LM zeroes the state it carries across batches)."""

    def end_epoch(self) -> None:  # noqa: B027 (optional hook)
        """An epoch's last batch is trained on (before last.pt is written)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, int]:
        """(the mean loss of `batch`, how many things it averages over: tokens, examples). `model` is in
        train mode, possibly wrapped in DistributedDataParallel (call it, don't reach into it); the call
        runs under autocast. The skeleton does backward, clipping and the optimiser step."""

    def evaluation_steps(self, steps_in_epoch: int) -> Collection[int]:
        """After which batches of an epoch (1-based counts) to evaluate; default: at its end."""
        return {steps_in_epoch}

    @abstractmethod
    def evaluate(self, model: nn.Module, position: EvalPosition) -> Evaluation:
        """Evaluate `model` (unwrapped; set eval mode, no gradients) on the validation split. Under
        torchrun every rank evaluates the same data, so all take the same decisions."""

    @abstractmethod
    def describe(self, evaluation: Evaluation, improved: bool) -> str:
        """One line for the log about an evaluation (`improved`: it is the best so far)."""

    def step_metrics(self, loss: float) -> dict[str, float]:
        """The figures of a training step for metrics.jsonl and the bar (e.g. an LM adds its perplexity)."""
        return {"loss": loss}

    @abstractmethod
    def checkpoint_extras(self) -> dict[str, Any]:
        """The task's own entries of checkpoint.pt (e.g. `tokenizer_kind`, a classifier's labels)."""

    def run_state(self, dist: DistInfo) -> dict[str, Any] | None:
        """The task's own entries of last.pt, to continue exactly (e.g. an LM's carried state, the
        data-order RNG). A collective call under torchrun: every rank calls it; None on ranks other than
        0 is fine (only rank 0 writes)."""
        return {}

    def load_run_state(self, last: dict[str, Any], dist: DistInfo, device: torch.device) -> None:  # noqa: B027
        """Restore what `run_state` saved (`last`: the whole last.pt dict)."""

    def finish(self, checkpoint: Path, model: nn.Module, progress: Progress) -> None:  # noqa: B027
        """After a run that ended normally, on rank 0 (e.g. score the best checkpoint on the test split)."""
