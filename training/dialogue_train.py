"""Train an HRED (or, with `latent > 0`, a VHRED) dialogue model on the shared training skeleton.

    rnnserve train dialogue --data shakespeare --hidden 256 --minutes 10 --out runs/chat

`DialogueTask` is a `TrainTask` (training/task.py): `Trainer(DialogueTask(config)).run()` owns the loop,
the optimiser, the time budget, `checkpoint.pt` (kind "dialogue", the layout `dialogue_checkpoint.
load_dialogue_checkpoint` and the exporter read) and the resumable `last.pt`. The task brings:

- data (training/dialogue_data.py): `config.data` is "shakespeare", "chatterbot" (fetched into the data
  cache) or a path; dialogues split 90/5/5 by a seeded shuffle; the char tokenizer learnt on train;
- batches of whole dialogues of similar longest turn (the turn-batched layout pads every turn to it);
- the loss: `DialogueModel.loss` over every prediction of the stream (turn 1 included, as a flat LM is
  trained), with VHRED's KL weighted by `kl_weight(step)`, linear from 0 to 1 over `kl_anneal_steps`;
- the evaluation: **per-token perplexity of the held-out responses**, i.e. turns 2+ of the validation
  dialogues, each turn's `<eos>` included, in eval mode (VHRED: z = the prior's mean, as served); the
  best checkpoint is the lowest `val_response_ppl`.

It trains in one process (no torchrun): a dialogue batch is small and CPU-bound.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn
from tqdm import tqdm

from rnnserve.training.dialogue_cli import DialogueTrainConfig
from rnnserve.training.dialogue_data import (
    DialogueData,
    EncodedDialogue,
    dialogue_batch,
    length_batches,
    prepare_dialogue_data,
    read_dialogues,
    resolve_source,
)
from rnnserve.training.dialogue_model import DialogueArgs, DialogueModel
from rnnserve.training.distributed import DistInfo
from rnnserve.training.task import EvalPosition, Evaluation, Progress, RunSettings, TrainTask
from rnnserve.training.tokenizer import special_token_ids

COMMAND = "rnnserve train dialogue"


def dialogue_args(config: DialogueTrainConfig, vocab_size: int, eos_id: int) -> DialogueArgs:
    """The model the config describes, for a tokenizer of `vocab_size` with `<eos>` = `eos_id`."""
    return DialogueArgs(
        cell=config.cell,
        vocab_size=vocab_size,
        embedding_size=config.emb,
        encoder_hidden=config.encoder_hidden or config.hidden,
        context_hidden=config.context_hidden or config.hidden,
        decoder_hidden=config.hidden,
        num_layers=config.layers,
        encoder_bidirectional=config.bidirectional,
        latent_dim=config.latent,
        dropout=config.dropout,
        eos_id=eos_id,
    )


def kl_weight(step: int, anneal_steps: int) -> float:
    """VHRED's KL weight before optimiser step `step` (0-based): linear from 0 to 1 over `anneal_steps`."""
    return 1.0 if anneal_steps <= 0 else min(1.0, step / anneal_steps)


@torch.no_grad()
def response_loss(
    model: DialogueModel, dialogues: Sequence[EncodedDialogue], batch_size: int, device: torch.device
) -> tuple[float, float, int]:
    """(mean NLL per response token, mean KL per response turn (VHRED), response tokens) over `dialogues`
    in eval mode: the responses are turns 2+, each with its `<eos>`."""
    was_training = model.training
    model.eval()
    nll, kl, tokens, turns = 0.0, 0.0, 0, 0
    for batch in length_batches(dialogues, batch_size, by_longest_turn=True):
        chunk = [dialogues[i] for i in batch]
        loss = model.loss(dialogue_batch(chunk).to(device), from_turn=1)
        nll, kl, tokens = nll + loss.nll_sum.item(), kl + loss.kl_sum.item(), tokens + loss.tokens
        turns += sum(len(d) - 1 for d in chunk)
    model.train(was_training)
    return nll / max(tokens, 1), kl / max(turns, 1), tokens


def load_dialogues(config: DialogueTrainConfig) -> DialogueData:
    """Read `config.data`, split it and build the tokenizer (train split) and encodings."""
    source = resolve_source(config.data)
    dialogues = read_dialogues(source, config.format, config.turns_per_dialogue, config.max_turn_chars)
    return prepare_dialogue_data(dialogues, seed=config.split_seed)


class DialogueTask(TrainTask):
    """HRED/VHRED on dialogues; the best checkpoint has the lowest held-out response perplexity."""

    kind = "dialogue"
    best_metric = "val_response_ppl"
    higher_is_better = False
    count_unit = "tokens"

    def __init__(self, config: DialogueTrainConfig, data: DialogueData | None = None) -> None:
        self.config = config
        self.data = data  # given: used as is (the benchmark shares one DialogueData between models)
        self.rng = random.Random(config.seed)  # data order
        self.epoch_order: object = self.rng.getstate()
        self.step = 0  # optimiser steps so far (the KL annealing's clock)
        self.epoch = 1

    def settings(self) -> RunSettings:
        c = self.config
        return RunSettings(
            out_dir=Path(c.out_dir), command=COMMAND, epochs=c.epochs, seed=c.seed, resume=c.resume,
            force=c.force, max_steps=c.steps, save_every=c.save_every, clip=c.clip, threads=c.threads,
            device=c.device, progress=c.progress, optimizer="adam", lr=c.lr, time_budget_min=c.minutes,
        )  # fmt: skip

    def prepare(self, dist: DistInfo, device: torch.device, main: bool) -> Tokenizer:
        if dist.enabled:
            raise ValueError(f"`{COMMAND}` trains in one process; run it without torchrun")
        self.data = self.data or load_dialogues(self.config)
        if not self.data.train or not self.data.valid:
            raise ValueError("the dialogue data has no training or no validation dialogues")
        if main:
            tqdm.write(self.data.describe())
        self.device = device
        return self.data.tokenizer

    def _data(self) -> DialogueData:
        if self.data is None:
            raise RuntimeError("prepare() has not run")
        return self.data

    def build_model(self) -> nn.Module:
        tok = self._data().tokenizer
        self.args = dialogue_args(self.config, tok.get_vocab_size(), special_token_ids(tok)["eos"])
        return DialogueModel(self.args)

    def ready(self, model: nn.Module, main: bool) -> None:
        if main:
            kind = f"VHRED (latent {self.args.latent_dim})" if self.args.variational else "HRED"
            tqdm.write(f"{kind} {self.args.cell}, {sum(p.numel() for p in model.parameters()):,} parameters")

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self._data().train) / self.config.batch_size)

    def epoch_batches(self, epoch: int) -> Sequence[list[int]]:
        self.epoch = epoch
        self.epoch_order = self.rng.getstate()
        return length_batches(self._data().train, self.config.batch_size, self.rng, by_longest_turn=True)

    def end_epoch(self) -> None:
        self.epoch_order = self.rng.getstate()  # the next epoch's order starts from here

    def loss(self, model: nn.Module, batch: list[int]) -> tuple[Tensor, int]:
        assert isinstance(model, DialogueModel)
        turns = dialogue_batch([self._data().train[i] for i in batch]).to(self.device)
        loss = model.loss(turns, kl_weight(self.step, self.config.kl_anneal_steps))
        self.step += 1
        return loss.objective, loss.tokens

    def evaluation_steps(self, steps_in_epoch: int) -> Collection[int]:
        c = self.config
        every = c.eval_every or steps_in_epoch
        steps = {*range(every, steps_in_epoch + 1, every), steps_in_epoch}
        if c.steps is not None:  # the run's last step, so that it ends evaluated
            last = c.steps - (self.epoch - 1) * steps_in_epoch
            steps |= {last} if 1 <= last <= steps_in_epoch else set()
        return steps

    def evaluate(self, model: nn.Module, position: EvalPosition) -> Evaluation:
        assert isinstance(model, DialogueModel)
        nll, kl, tokens = response_loss(model, self._data().valid, self.config.batch_size, self.device)
        metrics = {
            "epoch": position.fractional_epoch,
            "step": float(position.global_step),
            "train_loss": position.train_loss,
            "val_response_loss": nll,
            "val_response_ppl": math.exp(min(nll, 50.0)),
            "val_response_tokens": float(tokens),
            "kl_weight": kl_weight(self.step, self.config.kl_anneal_steps),
            "train_seconds": position.train_seconds,
        }
        if self.args.variational:
            metrics["val_kl_per_turn"] = kl
        return Evaluation(metrics)

    def describe(self, evaluation: Evaluation, improved: bool) -> str:
        m = evaluation.metrics
        kl = (
            f", KL/turn {m['val_kl_per_turn']:.3f} (weight {m['kl_weight']:.2f})"
            if "val_kl_per_turn" in m
            else ""
        )
        return (
            f"step {m['step']:.0f} (epoch {m['epoch']:.2f}): train loss {m['train_loss']:.4f}, held-out "
            f"response ppl {m['val_response_ppl']:.3f}{kl}{'  (best)' if improved else ''}"
        )

    def checkpoint_extras(self) -> dict[str, Any]:
        # The entries save_dialogue_checkpoint writes besides the skeleton's (load_dialogue_checkpoint's).
        return {"tokenizer_kind": "char", "special_tokens": special_token_ids(self._data().tokenizer)}

    def run_state(self, dist: DistInfo) -> dict[str, Any] | None:
        return {"epoch_order": self.epoch_order, "dialogue_step": self.step}

    def load_run_state(self, last: dict[str, Any], dist: DistInfo, device: torch.device) -> None:
        version, internal, gauss = last["epoch_order"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.step = int(last["dialogue_step"])

    def finish(self, checkpoint: Path, model: nn.Module, progress: Progress) -> None:
        data = self._data()
        if not data.test:
            return
        from rnnserve.training.dialogue_checkpoint import load_dialogue_checkpoint

        best, _, _ = load_dialogue_checkpoint(checkpoint)
        nll, _, tokens = response_loss(best.to(self.device), data.test, self.config.batch_size, self.device)
        tqdm.write(f"best checkpoint on the test split: response ppl {math.exp(nll):.3f} ({tokens:,} tokens)")


def train_dialogue(config: DialogueTrainConfig, data: DialogueData | None = None) -> Path:
    """Train as configured; returns the best checkpoint's path (tokenizer.json beside it). A run that
    reaches `config.steps` ends there (it was evaluated at that step)."""
    from rnnserve.training.runstate import TrainingStopped
    from rnnserve.training.trainer import Trainer

    try:
        return Trainer(DialogueTask(config, data)).run()
    except TrainingStopped as stop:
        if stop.reason != "max_steps reached" or stop.checkpoint is None:
            raise
        return stop.checkpoint
