"""The training skeleton shared by every kind of model: `Trainer(task).run()`.

It owns the run: seeding, the optimiser and learning-rate schedule (training/optim.py), epochs and
steps, mixed precision (training/amp.py), data parallelism under torchrun (training/distributed.py),
the time budget, evaluations with the best `checkpoint.pt` and the resumable `last.pt` (the format:
training/checkpoint.py), the progress bar, metrics.jsonl/TensorBoard (training/metrics_sink.py), Ctrl-C
and `max_steps` (both write last.pt and raise `TrainingStopped`), and `--resume`, which ends a run with
the weights an uninterrupted one would have. A task (training/task.py) brings the rest: its data, model,
the loss of a batch and what an evaluation measures. Today: `LanguageModelTask` (training/lm_task.py)
and `ClassifierTask` (training/classifier_task.py).

How to add a task (a new kind of model), with no change to this file:

1. Subclass `TrainTask` (training/task.py, whose docstrings say when each method is called) in a
   module of its own: set `kind` (the checkpoint's kind, e.g. "dialogue"), `best_metric` and
   `higher_is_better`; keep the config dataclass in `self.config` and map it onto `RunSettings` in
   `settings()`; read the data and build the tokenizer in `prepare()`; build the model in
   `build_model()` (a module with an `args` dataclass); give each epoch's batches, the loss of one
   batch, an evaluation on the validation split and the checkpoint's own entries. A task that carries
   state across batches (like the LM's truncated BPTT) saves it in `run_state()` and restores it in
   `load_run_state()`.
2. Train: `Trainer(MyTask(config)).run()` returns the best checkpoint's path (tokenizer.json beside it).
3. Read it back: `read_checkpoint(path, MyTask.kind)` (training/checkpoint.py): the dict and tokenizer.
4. Register `rnnserve train KIND` in rnnserve/cli.py (`register_commands`).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from rnnserve.training.amp import MixedPrecision
from rnnserve.training.checkpoint import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    TOKENIZER_FILE,
    model_checkpoint,
    run_checkpoint,
    save_model_checkpoint,
)
from rnnserve.training.distributed import (
    DistInfo,
    any_rank,
    gather_to_main,
    init_distributed,
    shutdown_distributed,
    sum_across_ranks,
    wait_for_all_ranks,
    wrap_model,
)
from rnnserve.training.metrics_sink import TENSORBOARD_DIR, MetricsSink
from rnnserve.training.optim import make_optimizer, make_scheduler
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
from rnnserve.training.task import EvalPosition, Evaluation, Progress, RunSettings, TrainTask

StepHook = Callable[[int, torch.nn.Module], None]  # (global step, the model being trained)


def device_for(name: str) -> torch.device:
    """The torch device a config names: "cpu", "cuda", or "auto" (cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Runs a `TrainTask` from start (or `last.pt`) to its best checkpoint."""

    def __init__(self, task: TrainTask) -> None:
        self.task = task
        self.settings = task.settings()

    def run(self, on_step: StepHook | None = None) -> Path:
        """Train; returns the best checkpoint's path. `on_step(global_step, model)` runs after each
        optimiser step (tests use it to interrupt a run or inspect weights). Under torchrun the run is
        data-parallel and only rank 0 writes files."""
        dist_info, device = init_distributed(device_for(self.settings.device))
        try:
            try:
                path = _Run(self.task, self.settings, dist_info, device, on_step).train()
            except TrainingStopped:
                wait_for_all_ranks(dist_info)  # every rank stops at the same step (any_rank)
                raise
            wait_for_all_ranks(dist_info)
            return path
        finally:
            shutdown_distributed(dist_info)


def seed_everything(settings: RunSettings, device: torch.device, rank: int = 0) -> None:
    """Seed torch, `random` and NumPy; threads and kernel choices as configured."""
    # Each rank draws its own dropout masks (seed + rank); initial weights come from rank 0 via DDP anyway.
    seed = settings.seed + rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    if settings.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; cuDNN's RNN kernels are once benchmarking is off
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda" and settings.benchmark_kernels:
        torch.backends.cudnn.benchmark = True  # cuDNN picks the fastest RNN kernels for fixed shapes


def rank_rng(last: dict[str, Any], info: DistInfo) -> dict[str, Any]:
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


def trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows logged after the step `last.pt` holds (they will be redone)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
    path.write_text("".join(r + "\n" for r in kept), encoding="utf-8")


class _Run:
    """One session of a run (a fresh start or a resumption), from set-up to the best checkpoint."""

    def __init__(
        self,
        task: TrainTask,
        settings: RunSettings,
        dist: DistInfo,
        device: torch.device,
        on_step: StepHook | None,
    ) -> None:
        self.task, self.s, self.dist, self.device, self.on_step = task, settings, dist, device, on_step
        self.main = dist.is_main
        out = settings.out_dir
        self.last_path, self.best_path, self.metrics_path = (
            out / LAST_FILE,
            out / CHECKPOINT_FILE,
            out / METRICS_FILE,
        )
        self.interrupt = InterruptFlag()

    # -- set-up -------------------------------------------------------------------------------------

    def _setup(self) -> None:
        s, task, out = self.s, self.task, self.s.out_dir
        seed_everything(s, self.device, self.dist.rank)
        check_new_run(out, s.resume, s.force, s.command)
        if self.main and not s.resume and self.last_path.exists():
            print(
                f"--force: starting a new run in {out} (the earlier run's files are overwritten)", flush=True
            )
        out.mkdir(parents=True, exist_ok=True)
        tokenizer = task.prepare(self.dist, self.device, self.main)
        if self.main:
            tokenizer.save(str(out / TOKENIZER_FILE))
        self.model = task.build_model().to(self.device)
        self.model_args = task.model_args(self.model)
        self.ddp_model = wrap_model(self.model, self.dist, self.device)  # what forward/backward go through
        self.opt = make_optimizer(self.model, s)
        self.amp = MixedPrecision.for_config(s.amp, self.device)
        last = torch.load(self.last_path, map_location="cpu", weights_only=True) if s.resume else None
        self.progress = Progress.from_dict(last["progress"]) if last is not None else Progress()
        self.clock = RunClock(self.progress, s.time_budget_min)
        plateau_mode: Literal["min", "max"] = "max" if task.higher_is_better else "min"
        total_steps = task.steps_per_epoch() * s.epochs
        self.scheduler = make_scheduler(self.opt, s, total_steps, self.clock.budget_fraction, plateau_mode)
        if last is not None:
            self._restore(last)
        elif self.main and self.metrics_path.exists():
            self.metrics_path.unlink()
        tensorboard = out / TENSORBOARD_DIR if s.tensorboard and self.main else None
        self.sink = MetricsSink(self.metrics_path, tensorboard)
        task.ready(self.model, self.main)

    def _restore(self, last: dict[str, Any]) -> None:
        if last.get("model_args") != self.model_args:
            raise ValueError(
                f"cannot resume: {self.last_path} holds a different model ({last.get('model_args')})"
            )
        self.model.load_state_dict(last["state_dict"])
        self.opt.load_state_dict(last["optimizer"])
        if self.scheduler is not None and last.get("scheduler") is not None:
            self.scheduler.load_state_dict(last["scheduler"])
        self.amp.load_state_dict(last.get("grad_scaler"))
        self.task.load_run_state(last, self.dist, self.device)
        set_rng_state(rank_rng(last, self.dist))
        if self.main:
            trim_metrics(self.metrics_path, self.progress.global_step)

    # -- the loop -----------------------------------------------------------------------------------

    def train(self) -> Path:
        self._setup()
        stop: str | None = None
        self.clock.restart()  # set-up time is not training time
        with self.interrupt:
            while self.progress.epoch <= self.s.epochs and stop is None:
                stop = self._epoch()
        self.clock.tick()
        self.sink.close()
        if stop is not None:
            self._stopped(stop)
        if self.main:
            self.task.finish(self.best_path, self.model, self.progress)
        return self.best_path

    def _epoch(self) -> str | None:
        """Train the epoch in progress (the rest of it, when resumed); returns why the run stops, if it
        is stopped (Ctrl-C, max_steps)."""
        s, task, p = self.s, self.task, self.progress
        batches = task.epoch_batches(p.epoch)
        if p.step_in_epoch == 0:
            task.start_epoch()
        evaluate_after = task.evaluation_steps(len(batches))
        bar = tqdm(
            batches,
            desc=f"epoch {p.epoch}",
            disable=not (s.progress and self.main),
            unit="step",
            initial=p.step_in_epoch,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
        )  # fmt: skip  (a log file stays short)
        started, seen = time.perf_counter(), 0
        stop: str | None = None
        ended = False  # early stopping or the time budget: the run ends normally
        for batch in batches[p.step_in_epoch :]:
            loss, count, lr = self._step(batch)
            seen += count * self.dist.world_size
            rate = seen / max(time.perf_counter() - started, 1e-9)
            self._report_step(bar, loss, lr, rate)
            if self.on_step is not None:
                self.on_step(p.global_step, self.model)
            flags = (self.interrupt.raised, self.clock.out_of_time())
            interrupted, out_of_time = any_rank(flags, self.dist, self.device)
            if out_of_time and self.main:
                tqdm.write(f"time budget of {s.time_budget_min} min used: evaluating and stopping")
            if p.step_in_epoch in evaluate_after or out_of_time:
                ended = self._evaluate(len(batches)) or out_of_time
                if ended:
                    break
            if interrupted:
                stop = "interrupted"
            elif s.max_steps is not None and p.global_step >= s.max_steps:
                stop = "max_steps reached"
            if stop is not None:
                break
            # (The epoch's end writes last.pt after its evaluation.)
            if s.save_every > 0 and p.global_step % s.save_every == 0 and p.step_in_epoch < len(batches):
                self._save_last()
        bar.close()
        if p.step_in_epoch == len(batches):
            p.next_epoch()
            task.end_epoch()
        if ended:
            p.epoch = s.epochs + 1  # the run is over (normally, not "stopped")
        self._save_last()
        if stop is None and p.epoch <= s.epochs:
            (interrupted,) = any_rank((self.interrupt.raised,), self.dist, self.device)
            stop = "interrupted" if interrupted else None  # Ctrl-C during the evaluation
        return stop

    def _step(self, batch: Any) -> tuple[float, int, float]:
        """One optimiser step on `batch`; returns (its loss, what the loss averages over, the lr used)."""
        p = self.progress
        self.ddp_model.train()
        with self.amp.autocast():
            loss, count = self.task.loss(self.ddp_model, batch)
        self.opt.zero_grad(set_to_none=True)
        self.amp.backward_and_step(loss, self.opt, self.model.parameters(), self.s.clip)
        lr = float(self.opt.param_groups[0]["lr"])
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            self.scheduler.step()
        p.step_in_epoch += 1
        p.global_step += 1
        value = loss.item()  # this rank's share; the ranks' shares are equal-sized
        p.epoch_loss_sum += value * count
        p.epoch_count += count
        return value, count, lr

    def _report_step(self, bar: Any, loss: float, lr: float, rate: float) -> None:
        p, task, unit = self.progress, self.task, self.task.count_unit
        mean = task.step_metrics(p.epoch_loss_sum / max(p.epoch_count, 1))
        bar.update(1)
        bar.set_postfix(
            {**{k: f"{v:.4f}" for k, v in mean.items()}, f"{unit}_s": f"{rate:.0f}"}, refresh=False
        )
        if self.main and self.s.log_every > 0 and p.global_step % self.s.log_every == 0:
            row = {"step": p.global_step, "epoch": p.epoch, **task.step_metrics(loss), "lr": lr}
            self.sink.write({**row, f"{unit}_per_s": rate})

    # -- evaluations and checkpoints ----------------------------------------------------------------

    def _position(self, steps_in_epoch: int, train_loss: float) -> EvalPosition:
        p = self.progress
        return EvalPosition(
            p.epoch, p.step_in_epoch, steps_in_epoch, p.global_step, train_loss, p.train_seconds
        )

    def _evaluate(self, steps_in_epoch: int) -> bool:
        """Evaluate, log, step a plateau schedule, keep the best checkpoint (rank 0 writes); True when
        early stopping ends the run. Every rank evaluates the whole validation set, so all take the same
        decisions without communicating."""
        p, task = self.progress, self.task
        self.clock.tick()
        # The epoch's training loss over all ranks' data (each rank saw its own share).
        loss_sum, count = sum_across_ranks((p.epoch_loss_sum, p.epoch_count), self.dist, self.device)
        evaluation = task.evaluate(self.model, self._position(steps_in_epoch, loss_sum / max(count, 1)))
        score = evaluation.metrics[task.best_metric]
        p.history.append(evaluation.metrics)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(score)
        improved = p.best is None or (score > p.best if task.higher_is_better else score < p.best)
        if self.main:
            self.sink.write({"step": p.global_step, **evaluation.metrics})
            tqdm.write(task.describe(evaluation, improved))
            if improved or not self.best_path.exists():
                self._save_best(evaluation, p.history)
        if improved:
            p.best, p.stale = score, 0
        else:
            p.stale += 1
        if self.s.patience is not None and p.stale >= self.s.patience:
            if self.main:
                tqdm.write(f"early stopping: no better {task.best_metric} in {self.s.patience} evaluation(s)")
            return True
        return False

    def _save_best(self, evaluation: Evaluation, history: list[dict[str, float]]) -> None:
        task = self.task
        metrics = {**evaluation.metrics, **evaluation.details}
        ckpt = model_checkpoint(
            task.kind, self.model_args, task.config_dict(), self.model, metrics, history,
            **task.checkpoint_extras(),
        )  # fmt: skip
        save_model_checkpoint(self.best_path, ckpt)

    def _save_last(self) -> None:
        """Collect every rank's run state and RNG streams; rank 0 writes `last.pt` (a collective call)."""
        self.clock.tick()
        task_state = self.task.run_state(self.dist)
        rngs = gather_to_main(rng_state(), self.dist)
        if task_state is None or rngs is None:
            return  # not rank 0
        run = {
            "optimizer": self.opt.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": rng_state(),
            "progress": asdict(self.progress),
            "grad_scaler": self.amp.state_dict(),
            "rng_ranks": rngs if self.dist.enabled else None,
        }
        ckpt = run_checkpoint(
            self.task.kind, self.model_args, self.task.config_dict(), self.model, run, task_state
        )
        save_atomically(ckpt, self.last_path)

    def _stopped(self, reason: str) -> None:
        """Write last.pt and raise TrainingStopped; a run stopped before its first evaluation is evaluated
        now, so that it leaves a checkpoint to export."""
        p = self.progress
        self._save_last()
        checkpoint = None
        if self.main:
            if not self.best_path.exists():
                self._checkpoint_at_stop()
            checkpoint = self.best_path
        raise TrainingStopped(self.last_path, p.global_step, reason, checkpoint)

    def _checkpoint_at_stop(self) -> None:
        """`progress` is left alone: a resumed run's first evaluation replaces this checkpoint (nothing is
        better than no evaluation), exactly as the uninterrupted run writes its first one."""
        p = self.progress
        train_loss = p.epoch_loss_sum / max(p.epoch_count, 1)
        evaluation = self.task.evaluate(self.model, self._position(self.task.steps_per_epoch(), train_loss))
        evaluation.metrics["step"] = p.global_step
        self._save_best(evaluation, [*p.history, evaluation.metrics])
        tqdm.write(
            f"stopped at step {p.global_step}, before the run's first evaluation: "
            f"{self.task.describe(evaluation, True)}; {self.best_path} written"
        )
