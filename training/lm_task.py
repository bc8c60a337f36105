"""The language-model task: next-token prediction over parallel token streams with truncated BPTT.

The training split is laid out as `batch_size` contiguous streams (under torchrun each rank takes its
block of them) and cut into windows of `bptt` tokens; the recurrent state is carried from one window to
the next (detached: no gradient into the previous window) and saved in last.pt, so a resumed run
continues exactly. An epoch ends with an evaluation on the validation split (mean per-token loss, ppl);
the lowest validation loss picks the best checkpoint. `rnnserve.training.train` is the public face.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn
from tqdm import tqdm

from rnnserve.training.checkpoint import (
    METRICS_FILE,
    model_checkpoint,
    read_checkpoint,
    save_model_checkpoint,
)
from rnnserve.training.config import TrainConfig
from rnnserve.training.data import encode_documents, prepare_lm_data
from rnnserve.training.distributed import DistInfo, gather_to_main, shard_rows
from rnnserve.training.model import ModelArgs, RNNLanguageModel, State, detach_state
from rnnserve.training.runstate import save_atomically
from rnnserve.training.task import EvalPosition, Evaluation, Progress, RunSettings, TrainTask

PLOT_FILE = "learning_curves.png"


def batchify(stream: list[int], batch: int) -> Tensor:
    """Lay a stream out as `batch` contiguous rows: (batch, len(stream) // batch) int64."""
    n = len(stream) // batch
    if n < 2:
        raise ValueError(f"a stream of {len(stream)} tokens is too short for {batch} parallel streams")
    return torch.tensor(stream[: n * batch], dtype=torch.long).view(batch, n)


def windows(data: Tensor, bptt: int) -> list[tuple[Tensor, Tensor]]:
    """Consecutive (input, target) windows along time; each (batch, <=bptt), target shifted by one."""
    return [(data[:, i : i + bptt], data[:, i + 1 : i + 1 + bptt]) for i in range(0, data.shape[1] - 1, bptt)]


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy; logits (batch, seq, vocab), targets (batch, seq)."""
    seq = targets.shape[1]
    return F.cross_entropy(logits[:, :seq].reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: RNNLanguageModel, data: Tensor, bptt: int) -> float:
    """Mean per-token loss over `data` (batch, time), carrying state across windows."""
    model.eval()
    state: State = model.init_state(data.shape[0], data.device)
    total, count = 0.0, 0
    for x, y in windows(data, bptt):
        x = x[:, : y.shape[1]]
        logits, state = model(x, state)
        total += lm_loss(logits, y).item() * y.numel()
        count += y.numel()
    return total / max(count, 1)


def ppl(loss: float) -> float:
    return math.exp(min(loss, 50))


def lm_model_args(config: TrainConfig, vocab_size: int) -> ModelArgs:
    return ModelArgs(
        cell=config.cell,
        vocab_size=vocab_size,
        embedding_size=config.emb,
        hidden_size=config.hidden,
        num_layers=config.layers,
        dropout=config.dropout,
        tie_weights=config.tie_weights,
    )


def save_checkpoint(
    path: Path,
    model: RNNLanguageModel,
    config: TrainConfig,
    metrics: dict[str, Any],
    history: list[dict[str, float]] | None = None,
) -> None:
    """Write an LM checkpoint atomically (`history`: the metrics of every evaluation so far)."""
    ckpt = model_checkpoint(
        LanguageModelTask.kind, asdict(model.args), asdict(config), model, metrics,
        history or [metrics], tokenizer_kind=config.tokenizer,
    )  # fmt: skip
    save_model_checkpoint(path, ckpt)


def load_checkpoint(path: str | Path) -> tuple[RNNLanguageModel, Tokenizer, dict[str, Any]]:
    """(model in eval mode on CPU, tokenizer from tokenizer.json beside it, the checkpoint dict)."""
    ckpt, tokenizer = read_checkpoint(path, LanguageModelTask.kind)
    model = RNNLanguageModel(ModelArgs(**ckpt["model_args"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), tokenizer, ckpt


class LanguageModelTask(TrainTask):
    """A recurrent LM trained with truncated BPTT (see the module docstring)."""

    kind = "lm"
    best_metric = "val_loss"
    higher_is_better = False
    count_unit = "tokens"

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.hidden: State = ()  # the state carried across windows; each (layers, batch / world, hidden)

    def settings(self) -> RunSettings:
        c = self.config
        return RunSettings(
            out_dir=Path(c.out_dir), command="rnnserve train lm", epochs=c.epochs, seed=c.seed,
            resume=c.resume, force=c.force, max_steps=c.max_steps, save_every=c.save_every, clip=c.clip,
            threads=c.threads, device=c.device, progress=c.progress, optimizer=c.optimizer, lr=c.lr,
            weight_decay=c.weight_decay, momentum=c.momentum, schedule=c.schedule,
            warmup_steps=c.warmup_steps, plateau_patience=c.plateau_patience, patience=c.patience,
            amp=c.amp, deterministic=c.deterministic, benchmark_kernels=True,
            time_budget_min=c.time_budget_min, log_every=c.log_every, tensorboard=c.tensorboard,
        )  # fmt: skip

    def prepare(self, dist: DistInfo, device: torch.device, main: bool) -> Tokenizer:
        """The corpus split first, the tokenizer learnt on its training split only (see
        `rnnserve.training.data.prepare_lm_data`); rank 0 prints which files each split came from."""
        c = self.config
        data = prepare_lm_data(c)
        if main:  # with or without the progress bar
            tqdm.write(data.describe())
        val_ids = data.valid[: c.max_eval_tokens] if c.max_eval_tokens else data.valid  # None or 0: all
        self.tokenizer, self.test_ids, self.device = data.tokenizer, data.test, device
        # Every rank lays out the same `batch_size` streams and trains on its own block of them.
        self.train_data = shard_rows(batchify(data.train, c.batch_size), dist).to(device)  # (batch/world, T)
        self.val_data = batchify(val_ids, c.eval_batch_size).to(device)  # (eval_batch, time), on every rank
        self.batches = windows(self.train_data, c.bptt)[: c.max_steps_per_epoch]  # None: all
        return self.tokenizer

    def build_model(self) -> nn.Module:
        self.model = RNNLanguageModel(lm_model_args(self.config, self.tokenizer.get_vocab_size()))
        return self.model

    def steps_per_epoch(self) -> int:
        return len(self.batches)

    def epoch_batches(self, epoch: int) -> Sequence[tuple[Tensor, Tensor]]:
        return self.batches  # the same windows every epoch, in order (the state flows along them)

    def start_epoch(self) -> None:
        self.hidden = self.model.init_state(self.train_data.shape[0], self.device)

    def end_epoch(self) -> None:
        self.start_epoch()  # the next epoch starts from a zero state (and last.pt says so)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, int]:
        x, y = batch  # (batch, <=bptt) each; the last window's input may be one longer than its target
        x = x[:, : y.shape[1]]
        self.hidden = detach_state(self.hidden)  # truncated BPTT: no gradient into the previous window
        logits, self.hidden = model(x, self.hidden)  # logits (batch, seq, vocab)
        return lm_loss(logits, y), y.numel()

    def evaluate(self, model: nn.Module, position: EvalPosition) -> Evaluation:
        assert isinstance(model, RNNLanguageModel)
        val_loss = evaluate(model, self.val_data, self.config.bptt)
        return Evaluation({
            "val_loss": val_loss,
            "val_ppl": ppl(val_loss),
            "train_loss": position.train_loss,
            "epoch": position.epoch,
            "elapsed_s": round(position.train_seconds, 1),
        })  # fmt: skip

    def describe(self, evaluation: Evaluation, improved: bool) -> str:
        m = evaluation.metrics
        return (
            f"epoch {m['epoch']}: train loss {m['train_loss']:.3f}, val loss {m['val_loss']:.3f}, "
            f"val ppl {m['val_ppl']:.2f}"
        )

    def step_metrics(self, loss: float) -> dict[str, float]:
        return {"loss": loss, "ppl": ppl(loss)}

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"tokenizer_kind": self.config.tokenizer}

    def run_state(self, dist: DistInfo) -> dict[str, Any] | None:
        """Every rank's carried state, joined along the batch axis on rank 0 (a collective call)."""
        hiddens = gather_to_main([h.detach().cpu() for h in self.hidden], dist)
        if hiddens is None:
            return None  # not rank 0
        whole = [torch.cat(parts, dim=1) for parts in zip(*hiddens, strict=True)]  # (layers, batch, hidden)
        return {"hidden": whole}

    def load_run_state(self, last: dict[str, Any], dist: DistInfo, device: torch.device) -> None:
        # last.pt holds all `batch_size` streams' state; each rank continues its own block of them.
        self.hidden = tuple(shard_rows(h, dist, dim=1).to(device) for h in last["hidden"])

    def finish(self, checkpoint: Path, model: nn.Module, progress: Progress) -> None:
        assert isinstance(model, RNNLanguageModel)
        if self.test_ids:
            self._evaluate_best_on_test(checkpoint, model, self.test_ids)
        if self.config.plot:
            out = Path(self.config.out_dir)
            plot_learning_curves(out / METRICS_FILE, out / PLOT_FILE)

    def _evaluate_best_on_test(self, path: Path, model: RNNLanguageModel, test_ids: list[int]) -> None:
        """Score the best checkpoint once on the test split (never used for any choice during training) and
        record `test_loss`/`test_ppl` in its metrics."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["state_dict"])
        test_data = batchify(test_ids, self.config.eval_batch_size).to(self.device)  # (eval_batch, time)
        test_loss = evaluate(model, test_data, self.config.bptt)
        # A new dict: the checkpoint's history holds the same metrics object, and it stays as trained.
        ckpt["metrics"] = {**ckpt["metrics"], "test_loss": test_loss, "test_ppl": ppl(test_loss)}
        save_atomically(ckpt, path)
        tqdm.write(
            f"best checkpoint on the test split: loss {test_loss:.3f}, ppl {ckpt['metrics']['test_ppl']:.2f}"
        )


def plot_learning_curves(metrics_path: Path, png: Path) -> bool:
    """Training loss per logged step and val loss per epoch, against steps; False (with a warning) when
    matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed; skipping learning_curves.png", stacklevel=2)
        return False
    if not metrics_path.exists():
        return False
    rows = [
        json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    steps = [r for r in rows if "loss" in r]
    epochs = [r for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss (step)", lw=1)
    if epochs:
        ax.plot([r["step"] for r in epochs], [r["val_loss"] for r in epochs], "o-", label="val loss (epoch)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


__all__ = [
    "PLOT_FILE",
    "LanguageModelTask",
    "batchify",
    "encode_documents",
    "evaluate",
    "lm_loss",
    "load_checkpoint",
    "plot_learning_curves",
    "save_checkpoint",
    "windows",
]
