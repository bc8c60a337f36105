"""The training skeleton drives any `TrainTask`: a toy task written here (as a new kind of model would be)
trains, checkpoints, stops and resumes exactly with no change to the skeleton."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from torch import Tensor, nn

from rnnserve.training.checkpoint import CHECKPOINT_FILE, METRICS_FILE, read_checkpoint
from rnnserve.training.distributed import DistInfo
from rnnserve.training.runstate import LAST_FILE, TrainingStopped
from rnnserve.training.task import EvalPosition, Evaluation, Progress, RunSettings, TrainTask
from rnnserve.training.trainer import Trainer


@dataclass
class ToyArgs:
    inputs: int = 4


class ToyModel(nn.Module):
    def __init__(self, args: ToyArgs) -> None:
        super().__init__()
        self.args = args
        self.drop = nn.Dropout(0.2)  # draws from the RNG: resuming must restore it
        self.linear = nn.Linear(args.inputs, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.drop(x)).squeeze(-1)  # (batch,)


@dataclass
class ToyConfig:
    out_dir: str
    epochs: int = 3
    seed: int = 0
    resume: bool = False
    max_steps: int | None = None


class ToyTask(TrainTask):
    """Linear regression on fixed random data, 8 batches an epoch in a per-epoch seeded order."""

    kind = "toy"
    best_metric = "val_mse"
    higher_is_better = False

    def __init__(self, config: ToyConfig) -> None:
        self.config = config

    def settings(self) -> RunSettings:
        c = self.config
        return RunSettings(
            out_dir=Path(c.out_dir), command="toy train", epochs=c.epochs, seed=c.seed, resume=c.resume,
            max_steps=c.max_steps, save_every=3, progress=False, lr=0.05, log_every=1,
        )  # fmt: skip

    def prepare(self, dist: DistInfo, device: torch.device, main: bool) -> Tokenizer:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(80, 4, generator=g)  # (examples, inputs)
        y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(80, generator=g)  # (examples,)
        self.x, self.y, self.val_x, self.val_y = x[:64], y[:64], x[64:], y[64:]
        return Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))

    def build_model(self) -> nn.Module:
        return ToyModel(ToyArgs())

    def steps_per_epoch(self) -> int:
        return 8

    def epoch_batches(self, epoch: int) -> Sequence[Tensor]:
        order = torch.randperm(64, generator=torch.Generator().manual_seed(epoch))  # same epoch, same order
        return list(order.split(8))

    def loss(self, model: nn.Module, batch: Tensor) -> tuple[Tensor, int]:
        return F.mse_loss(model(self.x[batch]), self.y[batch]), len(batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, position: EvalPosition) -> Evaluation:
        model.eval()
        mse = F.mse_loss(model(self.val_x), self.val_y).item()
        return Evaluation({"val_mse": mse, "epoch": position.fractional_epoch}, {"note": "toy"})

    def describe(self, evaluation: Evaluation, improved: bool) -> str:
        return f"epoch {evaluation.metrics['epoch']:.2f}: val mse {evaluation.metrics['val_mse']:.4f}"

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"toy_extra": [1, 2, 3]}


def _weights(path: Path) -> dict[str, Tensor]:
    return dict(torch.load(path, weights_only=True)["state_dict"])


def test_a_new_task_trains_and_checkpoints_on_the_skeleton(tmp_path: Path) -> None:
    path = Trainer(ToyTask(ToyConfig(str(tmp_path / "run")))).run()
    assert path == tmp_path / "run" / CHECKPOINT_FILE
    ckpt, _ = read_checkpoint(path, "toy")  # the one checkpoint format, read back by kind
    assert ckpt["model_args"] == {"inputs": 4} and ckpt["toy_extra"] == [1, 2, 3]
    assert ckpt["metrics"]["note"] == "toy"  # details go into the checkpoint's metrics only
    history = [h["val_mse"] for h in ckpt["history"]]
    assert len(history) == 3 and history[-1] < history[0]
    assert torch.load(tmp_path / "run" / LAST_FILE, weights_only=True)["kind"] == "toy-last"
    rows = (tmp_path / "run" / METRICS_FILE).read_text().splitlines()
    assert len(rows) == 3 * 8 + 3  # a step row per step (log_every=1) and a row per evaluation
    with pytest.raises(ValueError, match="is a toy checkpoint, not a language model"):
        read_checkpoint(path, "lm")


def test_a_stopped_toy_run_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    full = Trainer(ToyTask(ToyConfig(str(tmp_path / "full")))).run()
    with pytest.raises(TrainingStopped, match="max_steps") as stop:
        Trainer(ToyTask(ToyConfig(str(tmp_path / "cut"), max_steps=5))).run()
    # Stopped before the first evaluation: evaluated at the stop, so there is a checkpoint to export.
    assert (
        stop.value.checkpoint is not None
        and read_checkpoint(stop.value.checkpoint, "toy")[0]["metrics"]["step"] == 5
    )
    resumed = Trainer(ToyTask(ToyConfig(str(tmp_path / "cut"), resume=True))).run()
    expected, got = _weights(full), _weights(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_progress_reads_the_field_names_of_older_last_files() -> None:
    old_lm = {"epoch": 2, "step_in_epoch": 3, "global_step": 9, "epoch_loss_sum": 1.5, "epoch_tokens": 12,
              "best": float("inf"), "bad_epochs": 1, "train_seconds": 2.0, "history": []}  # fmt: skip
    progress = Progress.from_dict(old_lm)
    assert (progress.epoch_count, progress.stale, progress.global_step) == (12, 1, 9)
    old_classifier = {**old_lm, "epoch_examples": 7, "stale": 2, "best": -1.0}
    del old_classifier["epoch_tokens"], old_classifier["bad_epochs"]
    assert (Progress.from_dict(old_classifier).epoch_count, Progress.from_dict(old_classifier).stale) == (
        7,
        2,
    )
