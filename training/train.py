"""Train a recurrent language model with truncated BPTT and save the best checkpoint.

Run it as `rnnserve train lm --out runs/lm` (see `rnnserve.training.cli`), or from Python:
`train_language_model(TrainConfig(out_dir="runs/lm"))`. The checkpoint is a plain dict (no pickled
modules, loadable with `torch.load(..., weights_only=True)`) with `tokenizer.json` written beside it.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor
from tqdm import tqdm

from rnnserve.training.amp import MixedPrecision
from rnnserve.training.config import TrainConfig
from rnnserve.training.data import encode_documents, prepare_lm_data
from rnnserve.training.distributed import (
    DistInfo,
    any_rank,
    gather_to_main,
    init_distributed,
    shard_rows,
    shutdown_distributed,
    sum_across_ranks,
    wait_for_all_ranks,
    wrap_model,
)
from rnnserve.training.metrics_sink import TENSORBOARD_DIR, MetricsSink
from rnnserve.training.model import ModelArgs, RNNLanguageModel, State, detach_state
from rnnserve.training.runstate import (
    LAST_FILE,
    InterruptFlag,
    RunClock,
    TrainingStopped,
    check_new_run,
    rng_state,
    save_atomically,
    set_rng_state,
)

__all__ = ["TrainConfig", "TrainingStopped", "encode_documents", "load_checkpoint", "train_language_model"]

CHECKPOINT_FORMAT = 1
CHECKPOINT_FILE = "checkpoint.pt"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
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


def _loss(logits: Tensor, targets: Tensor) -> Tensor:
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
        total += _loss(logits, y).item() * y.numel()
        count += y.numel()
    return total / max(count, 1)


def device_for(name: str) -> torch.device:
    """The torch device a config names: "cpu", "cuda", or "auto" (cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _prepare_data(
    config: TrainConfig, report: bool = True
) -> tuple[Tokenizer, list[int], list[int], list[int] | None]:
    """(tokenizer, train ids, validation ids, test ids or None): the corpus split first, the tokenizer learnt
    on its training split only (see `rnnserve.training.data.prepare_lm_data`).
    With `report`, prints which files each split came from and their sizes."""
    data = prepare_lm_data(config)
    if report:  # with or without the progress bar
        tqdm.write(data.describe())
    val_ids = data.valid
    if config.max_eval_tokens:  # None or 0: evaluate on the whole validation split
        val_ids = val_ids[: config.max_eval_tokens]
    return data.tokenizer, data.train, val_ids, data.test


def _model_args(config: TrainConfig, vocab_size: int) -> ModelArgs:
    return ModelArgs(
        cell=config.cell,
        vocab_size=vocab_size,
        embedding_size=config.emb,
        hidden_size=config.hidden,
        num_layers=config.layers,
        dropout=config.dropout,
        tie_weights=config.tie_weights,
    )


OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "plateau")
StepHook = Callable[[int, torch.nn.Module], None]  # (global step, the model being trained)


@dataclass
class _Progress:
    """Where a run is: everything besides model/optimiser/schedule/RNG that `last.pt` must restore."""

    epoch: int = 1
    step_in_epoch: int = 0  # windows of this epoch already trained on
    global_step: int = 0
    epoch_loss_sum: float = 0.0  # token-weighted training loss so far this epoch
    epoch_tokens: int = 0
    best: float = math.inf
    bad_epochs: int = 0  # epochs since the best val loss (early stopping)
    train_seconds: float = 0.0  # wall time spent training and evaluating, summed over resumed sessions
    history: list[dict[str, float]] = field(default_factory=list)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
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
    config: TrainConfig,
    total_steps: int,
    time_fraction: Callable[[], float] | None = None,
) -> Any:
    """LambdaLR (stepped per batch) for warm-up/cosine, ReduceLROnPlateau (per epoch), or None.
    `time_fraction()`: the share of the time budget used so far (cosine follows it when it is ahead)."""
    if config.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {config.schedule!r}")
    if config.schedule == "plateau":
        if config.warmup_steps:
            raise ValueError("warmup_steps works with the none and cosine schedules, not plateau")
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=config.plateau_patience)
    if config.schedule == "none" and not config.warmup_steps:
        return None
    warmup, cosine = config.warmup_steps, config.schedule == "cosine"
    used = time_fraction or (lambda: 0.0)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total_steps, cosine, used()))


def save_last(
    path: Path,
    model: RNNLanguageModel,
    opt: torch.optim.Optimizer,
    scheduler: Any,
    config: TrainConfig,
    progress: _Progress,
    hidden: State,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write `last.pt` atomically: everything `resume` needs to continue exactly where the run is
    (`extra`: more entries, e.g. the fp16 gradient scaler and every rank's RNG streams)."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "kind": "lm-last",
        "model_args": asdict(model.args),
        "config": asdict(config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "progress": asdict(progress),
        "hidden": [h.detach().cpu() for h in hidden],
        **(extra or {}),
    }
    save_atomically(ckpt, path)


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows logged after the step `last.pt` holds (they will be redone)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
    path.write_text("".join(r + "\n" for r in kept), encoding="utf-8")


def train_language_model(config: TrainConfig, on_step: StepHook | None = None) -> Path:
    """Train as configured; returns the best checkpoint's path (tokenizer.json is beside it).

    `last.pt` (the whole run state) is written every `save_every` steps and at each epoch end; with
    `config.resume` the run continues from it and ends with the weights an uninterrupted run would have.
    Ctrl-C or reaching `max_steps` writes `last.pt` and raises `TrainingStopped`. `on_step(global_step,
    model)` is called after each optimiser step (tests use it to interrupt a run or inspect weights).
    Under torchrun the run is data-parallel (see `rnnserve.training.distributed`): only rank 0 writes.
    """
    dist_info, device = init_distributed(device_for(config.device))
    try:
        try:
            path = _train(config, on_step, dist_info, device)
        except TrainingStopped:
            wait_for_all_ranks(dist_info)  # every rank stops at the same step (any_rank)
            raise
        wait_for_all_ranks(dist_info)
        return path
    finally:
        shutdown_distributed(dist_info)


def _seed_everything(config: TrainConfig, device: torch.device, rank: int = 0) -> None:
    # Each rank draws its own dropout masks (seed + rank); initial weights come from rank 0 via DDP anyway.
    seed = config.seed + rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; cuDNN's RNN kernels are once benchmarking is off
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # cuDNN picks the fastest RNN kernels for our fixed shapes


def _train(config: TrainConfig, on_step: StepHook | None, dist_info: DistInfo, device: torch.device) -> Path:
    _seed_everything(config, device, dist_info.rank)
    main = dist_info.is_main
    show = config.progress and main
    out = Path(config.out_dir)
    last_path = out / LAST_FILE
    check_new_run(out, config.resume, config.force, "rnnserve train lm")
    if main and not config.resume and last_path.exists():
        print(f"--force: starting a new run in {out} (the earlier run's files are overwritten)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    tok, train_ids, val_ids, test_ids = _prepare_data(config, report=main)
    if main:
        tok.save(str(out / TOKENIZER_FILE))
    # Every rank lays out the same `batch_size` streams and trains on its own block of them.
    train_data = shard_rows(batchify(train_ids, config.batch_size), dist_info).to(device)  # (batch/world, T)
    val_data = batchify(val_ids, config.eval_batch_size).to(device)  # (eval_batch, time), whole on every rank
    args = _model_args(config, tok.get_vocab_size())
    model = RNNLanguageModel(args).to(device)
    ddp_model = wrap_model(model, dist_info, device)  # what forward/backward go through
    opt = make_optimizer(model, config)
    amp = MixedPrecision.for_config(config.amp, device)
    batches = windows(train_data, config.bptt)
    if config.max_steps_per_epoch is not None:
        batches = batches[: config.max_steps_per_epoch]
    last = torch.load(last_path, map_location="cpu", weights_only=True) if config.resume else None
    progress = _Progress(**last["progress"]) if last is not None else _Progress()
    clock = RunClock(progress, config.time_budget_min)
    scheduler = make_scheduler(opt, config, len(batches) * config.epochs, clock.budget_fraction)
    hidden: State = model.init_state(train_data.shape[0], device)
    metrics_path = out / METRICS_FILE
    if last is not None:
        if last.get("model_args") != asdict(args):
            raise ValueError(f"cannot resume: {last_path} holds a different model ({last.get('model_args')})")
        model.load_state_dict(last["state_dict"])
        opt.load_state_dict(last["optimizer"])
        if scheduler is not None and last["scheduler"] is not None:
            scheduler.load_state_dict(last["scheduler"])
        amp.load_state_dict(last.get("grad_scaler"))
        # last.pt holds all `batch_size` streams' state; each rank continues its own block of them.
        hidden = tuple(shard_rows(h, dist_info, dim=1).to(device) for h in last["hidden"])
        set_rng_state(_rank_rng(last, dist_info))
        if main:
            _trim_metrics(metrics_path, progress.global_step)
    elif main and metrics_path.exists():
        metrics_path.unlink()
    path = out / CHECKPOINT_FILE
    sink = MetricsSink(metrics_path, out / TENSORBOARD_DIR if config.tensorboard and main else None)

    def save() -> None:
        _save_last_all_ranks(last_path, model, opt, scheduler, amp, config, progress, hidden, dist_info)

    stop_reason: str | None = None
    out_of_time = False
    clock.restart()
    with InterruptFlag() as interrupt:
        while progress.epoch <= config.epochs and stop_reason is None:
            epoch = progress.epoch
            ddp_model.train()
            if progress.step_in_epoch == 0:
                hidden = model.init_state(train_data.shape[0], device)
            start, tokens_seen = time.perf_counter(), 0
            bar = tqdm(
                batches, desc=f"epoch {epoch}", disable=not show, unit="step", initial=progress.step_in_epoch
            )  # fmt: skip
            for x, y in batches[progress.step_in_epoch :]:
                x = x[:, : y.shape[1]]
                hidden = detach_state(hidden)  # truncated BPTT: no gradient into the previous window
                with amp.autocast():
                    logits, hidden = ddp_model(x, hidden)
                    loss = _loss(logits, y)
                opt.zero_grad(set_to_none=True)
                amp.backward_and_step(loss, opt, model.parameters(), config.clip)
                lr = opt.param_groups[0]["lr"]
                if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                    scheduler.step()
                progress.step_in_epoch += 1
                progress.global_step += 1
                step_loss = loss.item()  # this rank's share; the ranks' shares are equal-sized
                progress.epoch_loss_sum += step_loss * y.numel()
                progress.epoch_tokens += y.numel()
                tokens_seen += y.numel() * dist_info.world_size
                mean = progress.epoch_loss_sum / progress.epoch_tokens
                tok_s = tokens_seen / max(time.perf_counter() - start, 1e-9)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{mean:.3f}", ppl=f"{math.exp(min(mean, 50)):.1f}", tok_s=f"{tok_s:.0f}"
                )
                step = progress.global_step
                if main and config.log_every > 0 and step % config.log_every == 0:
                    ppl = math.exp(min(step_loss, 50))
                    row = {"step": step, "epoch": epoch, "loss": step_loss, "ppl": ppl, "lr": lr,
                           "tokens_per_s": tok_s}  # fmt: skip
                    sink.write(row)
                if on_step is not None:
                    on_step(step, model)
                interrupted, out_of_time = any_rank(
                    (interrupt.raised, clock.out_of_time()), dist_info, device
                )
                if interrupted:
                    stop_reason = "interrupted"
                elif config.max_steps is not None and step >= config.max_steps:
                    stop_reason = "max_steps reached"
                if stop_reason is not None or out_of_time:
                    break
                if (
                    config.save_every > 0
                    and step % config.save_every == 0
                    and progress.step_in_epoch < len(batches)  # the epoch end saves after its evaluation
                ):
                    save()
            bar.close()
            if stop_reason is not None and progress.step_in_epoch < len(batches):
                break
            if out_of_time and main:
                tqdm.write(f"time budget of {config.time_budget_min} min used: evaluating and stopping")
            clock.tick()
            # The epoch's training loss over all ranks' streams (each rank saw its own block).
            progress.epoch_loss_sum, progress.epoch_tokens = sum_across_ranks(
                (progress.epoch_loss_sum, progress.epoch_tokens), dist_info, device
            )
            _end_epoch(model, val_data, config, progress, scheduler, path, sink, main)
            clock.tick()
            if config.patience is not None and progress.bad_epochs >= config.patience:
                if main:
                    tqdm.write(f"early stopping: no better val loss for {config.patience} epoch(s)")
                progress.epoch = config.epochs + 1
            if out_of_time:
                progress.epoch = config.epochs + 1  # the time budget ends the run (normally, not "stopped")
            hidden = model.init_state(train_data.shape[0], device)
            save()
            (interrupted,) = any_rank((interrupt.raised,), dist_info, device)
            if interrupted and stop_reason is None and progress.epoch <= config.epochs:
                stop_reason = "interrupted"  # Ctrl-C during the evaluation
    clock.tick()
    sink.close()
    if stop_reason is not None:
        save()
        checkpoint = None
        if main:
            if not path.exists():  # stopped before its first evaluation: evaluate now, so it can be exported
                _checkpoint_at_stop(model, val_data, config, progress, path)
            checkpoint = path
        raise TrainingStopped(last_path, progress.global_step, stop_reason, checkpoint)
    if test_ids and main:
        _evaluate_best_on_test(path, model, test_ids, config, device)
    if config.plot and main:
        plot_learning_curves(metrics_path, out / PLOT_FILE)
    return path


def _checkpoint_at_stop(
    model: RNNLanguageModel, val_data: Tensor, config: TrainConfig, progress: _Progress, path: Path
) -> None:
    """Evaluate a run that stops before its first epoch end and write checkpoint.pt, so what it has learnt
    can be exported. `progress` is left alone: a resumed run's first epoch end replaces this checkpoint
    (nothing is better than no evaluation), exactly as the uninterrupted run writes its first one."""
    val_loss = evaluate(model, val_data, config.bptt)
    metrics: dict[str, float] = {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50)),
        "train_loss": progress.epoch_loss_sum / max(progress.epoch_tokens, 1),
        "epoch": progress.epoch,
        "step": progress.global_step,
        "elapsed_s": round(progress.train_seconds, 1),
    }
    save_checkpoint(path, model, config, metrics, [*progress.history, metrics])
    tqdm.write(
        f"stopped at step {progress.global_step} (epoch {progress.epoch}, before its end): val loss "
        f"{val_loss:.3f}, val ppl {metrics['val_ppl']:.2f}; {path} written"
    )


def _evaluate_best_on_test(
    path: Path, model: RNNLanguageModel, test_ids: list[int], config: TrainConfig, device: torch.device
) -> None:
    """Score the best checkpoint once on the test split (never used for any choice during training) and
    record `test_loss`/`test_ppl` in its metrics."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["state_dict"])
    test_data = batchify(test_ids, config.eval_batch_size).to(device)  # (eval_batch, time)
    test_loss = evaluate(model, test_data, config.bptt)
    # A new dict: the checkpoint's history holds the same metrics object, and it stays as trained.
    ckpt["metrics"] = {**ckpt["metrics"], "test_loss": test_loss, "test_ppl": math.exp(min(test_loss, 50))}
    save_atomically(ckpt, path)
    tqdm.write(
        f"best checkpoint on the test split: loss {test_loss:.3f}, ppl {ckpt['metrics']['test_ppl']:.2f}"
    )


def _rank_rng(last: dict[str, Any], info: DistInfo) -> dict[str, Any]:
    """This rank's RNG state from last.pt: its own when the run had as many ranks, else rank 0's (the
    continuation is then correct but not bit-identical to an uninterrupted run)."""
    per_rank = last.get("rng_ranks")
    if per_rank is not None and len(per_rank) == info.world_size:
        return dict(per_rank[info.rank])
    if info.world_size > 1 or per_rank is not None:
        warnings.warn(
            "resuming with a different number of processes: RNG streams (dropout) restart from rank 0's, "
            "so the run will not be bit-identical to an uninterrupted one",
            stacklevel=2,
        )
    return dict(last["rng"])


def _save_last_all_ranks(
    path: Path,
    model: RNNLanguageModel,
    opt: torch.optim.Optimizer,
    scheduler: Any,
    amp: MixedPrecision,
    config: TrainConfig,
    progress: _Progress,
    hidden: State,
    info: DistInfo,
) -> None:
    """Collect every rank's carried state and RNG streams; rank 0 writes `last.pt` (a collective call)."""
    hiddens = gather_to_main([h.detach().cpu() for h in hidden], info)
    rngs = gather_to_main(rng_state(), info)
    if hiddens is None or rngs is None:
        return  # not rank 0
    whole = tuple(torch.cat(parts, dim=1) for parts in zip(*hiddens, strict=True))  # (layers, batch, hidden)
    extra = {"grad_scaler": amp.state_dict(), "rng_ranks": rngs if info.enabled else None}
    save_last(path, model, opt, scheduler, config, progress, whole, extra)


def _end_epoch(
    model: RNNLanguageModel,
    val_data: Tensor,
    config: TrainConfig,
    progress: _Progress,
    scheduler: Any,
    path: Path,
    sink: MetricsSink,
    main: bool = True,
) -> None:
    """Evaluate, log, step the plateau schedule, save the best checkpoint (rank 0 only: `main`); move
    `progress` to the next epoch. Every rank evaluates the whole validation set, so all take the same
    schedule and early-stopping decisions without communicating."""
    epoch = progress.epoch
    train_loss = progress.epoch_loss_sum / max(progress.epoch_tokens, 1)
    val_loss = evaluate(model, val_data, config.bptt)
    metrics: dict[str, float] = {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50)),
        "train_loss": train_loss,
        "epoch": epoch,
        "elapsed_s": round(progress.train_seconds, 1),
    }
    progress.history.append(metrics)
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    if main:
        sink.write({"step": progress.global_step, **metrics})
    if main:
        tqdm.write(
            f"epoch {epoch}: train loss {train_loss:.3f}, val loss {val_loss:.3f}, "
            f"val ppl {metrics['val_ppl']:.2f}"
        )
    improved = val_loss < progress.best
    if main and (improved or not path.exists()):
        save_checkpoint(path, model, config, metrics, progress.history)
    if improved:
        progress.best, progress.bad_epochs = val_loss, 0
    else:
        progress.bad_epochs += 1
    progress.epoch += 1
    progress.step_in_epoch, progress.epoch_loss_sum, progress.epoch_tokens = 0, 0.0, 0


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


def save_checkpoint(
    path: Path,
    model: RNNLanguageModel,
    config: TrainConfig,
    metrics: dict[str, Any],
    history: list[dict[str, float]] | None = None,
) -> None:
    """Write the plain-dict checkpoint atomically (`history`: the metrics of every epoch so far)."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "kind": "lm",
        "model_args": asdict(model.args),
        "config": asdict(config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metrics": metrics,
        "tokenizer_kind": config.tokenizer,
        "history": list(history or [metrics]),
    }
    save_atomically(ckpt, path)


def checkpoint_kind(ckpt: dict[str, Any]) -> str:
    """ "lm" or "classifier": what a loaded checkpoint dict holds (older LM checkpoints have no `kind`)."""
    return str(ckpt.get("kind", "lm"))


def _load_model_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint dict that holds a model to export or sample from; errors that say what to do else
    (a missing file, a run's `last.pt`, something that is not ours)."""
    if not path.is_file():
        hint = ""
        if (path.parent / LAST_FILE).is_file():
            hint = (
                f"; {path.parent} holds a run stopped before its first evaluation: continue it with "
                f"`rnnserve train ... --out {path.parent} --resume` (stopping again writes {path.name})"
            )
        raise FileNotFoundError(f"{path} does not exist{hint}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a format-{CHECKPOINT_FORMAT} rnnserve checkpoint")
    if checkpoint_kind(ckpt).endswith("-last"):
        raise ValueError(
            f"{path} is a run's training state (for `--resume`), not a model checkpoint: use "
            f"{path.parent / CHECKPOINT_FILE}, the best evaluated weights of the run"
        )
    return ckpt


def read_checkpoint_kind(path: str | Path) -> str:
    """The kind of the checkpoint file at `path` (see `checkpoint_kind`)."""
    return checkpoint_kind(_load_model_checkpoint(Path(path)))


def load_checkpoint(path: str | Path) -> tuple[RNNLanguageModel, Tokenizer, dict[str, Any]]:
    """(model in eval mode on CPU, tokenizer from tokenizer.json beside it, the checkpoint dict)."""
    ckpt, tokenizer = read_checkpoint(path, "lm")
    model = RNNLanguageModel(ModelArgs(**ckpt["model_args"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), tokenizer, ckpt


def read_checkpoint(path: str | Path, kind: str) -> tuple[dict[str, Any], Tokenizer]:
    """A checkpoint of `kind` ("lm" | "classifier") and the tokenizer.json beside it; clear errors else."""
    path = Path(path)
    ckpt = _load_model_checkpoint(path)
    if checkpoint_kind(ckpt) != kind:
        names = {"lm": "language model", "classifier": "classifier"}
        raise ValueError(f"{path} is a {checkpoint_kind(ckpt)} checkpoint, not a {names.get(kind, kind)}")
    tok_path = path.parent / TOKENIZER_FILE
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path} (the checkpoint's tokenizer) does not exist")
    return ckpt, Tokenizer.from_file(str(tok_path))
