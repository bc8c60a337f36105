"""The classifier task: labelled texts, length-bucketed batches, early stopping on dev accuracy.

Each epoch draws its batches from a seeded data-order RNG (similar lengths together, random order), whose
state at the epoch's start is saved in last.pt so that a resumed run rebuilds the same batches. The dev
split is evaluated `evals_per_epoch` times an epoch; the best dev accuracy picks the checkpoint, which
also holds the full classification report. `rnnserve.training.classifier_train` is the public face.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn
from tqdm import tqdm

from rnnserve.training.classifier_data import (
    display_names,
    length_buckets,
    load_labelled,
    resolve_splits,
    split_holdout,
    subsample,
)
from rnnserve.training.classifier_model import ClassifierArgs, RNNClassifier
from rnnserve.training.classifier_train import (
    encode_texts,
    evaluate,
    finish_history,
    flat_metrics,
    pad_batch,
)
from rnnserve.training.config import ClassifierTrainConfig
from rnnserve.training.distributed import DistInfo
from rnnserve.training.task import EvalPosition, Evaluation, Progress, RunSettings, TrainTask
from rnnserve.training.tokenizer import (
    CLASSIFIER_SPECIAL_TOKENS,
    CLASSIFIER_TOKENIZER_KINDS,
    build_classifier_tokenizer,
    special_token_ids,
)


class ClassifierTask(TrainTask):
    """A recurrent text classifier (pooling over time) trained on labelled text."""

    kind = "classifier"
    best_metric = "dev_accuracy"
    higher_is_better = True
    count_unit = "examples"

    def __init__(self, config: ClassifierTrainConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)  # data order
        self.epoch_order: object = self.rng.getstate()  # the data-order RNG at this epoch's start

    def settings(self) -> RunSettings:
        c = self.config
        return RunSettings(
            out_dir=Path(c.out_dir), command="rnnserve train classifier", epochs=c.epochs, seed=c.seed,
            resume=c.resume, force=c.force, max_steps=c.max_steps, save_every=c.save_every, clip=c.clip,
            threads=c.threads, device=c.device, progress=c.progress, optimizer="adamw", lr=c.lr,
            weight_decay=c.weight_decay, patience=c.patience,
        )  # fmt: skip

    def prepare(self, dist: DistInfo, device: torch.device, main: bool) -> Tokenizer:
        if dist.enabled:
            raise ValueError("`rnnserve train classifier` trains in one process; run it without torchrun")
        c = self.config
        if c.tokenizer not in CLASSIFIER_TOKENIZER_KINDS:
            raise ValueError(f"tokenizer must be one of {CLASSIFIER_TOKENIZER_KINDS}, got {c.tokenizer!r}")
        if not c.train:
            raise ValueError("no training data: set `train` (--train) to a TSV/CSV file or a label directory")
        cols = {"text_column": c.text_column, "label_column": c.label_column}
        train_path, dev_path = resolve_splits(c.train, c.dev)  # a data set folder: its splits
        print(f"train: {train_path}; dev: {dev_path or f'{c.dev_fraction:.0%} held out of train'}")
        texts, labels, self.raw_names = load_labelled(train_path, **cols)
        if dev_path is not None:
            dev_texts, dev_labels, _ = load_labelled(dev_path, label_names=self.raw_names, **cols)
        else:
            (texts, labels), (dev_texts, dev_labels) = split_holdout(texts, labels, c.dev_fraction, c.seed)
        texts, labels = subsample(texts, labels, c.max_train_examples, c.seed)
        self.names = display_names(self.raw_names, c.label_names)
        self.tokenizer = build_classifier_tokenizer(
            c.tokenizer, texts, lowercase=c.lowercase, min_freq=c.min_freq, vocab_size=c.vocab_size
        )  # (train texts only)
        train_ids = encode_texts(self.tokenizer, texts)
        keep = [i for i, s in enumerate(train_ids) if s]  # a text with no tokens teaches nothing
        self.train_ids = [train_ids[i][: c.max_len] if c.max_len else train_ids[i] for i in keep]
        self.train_labels = [labels[i] for i in keep]
        dev_ids = encode_texts(self.tokenizer, dev_texts)
        dev_keep = [i for i, s in enumerate(dev_ids) if s]
        if not self.train_ids or not dev_keep:
            raise ValueError("no non-empty training or dev texts after tokenization")
        self.dev_ids, self.dev_labels = [dev_ids[i] for i in dev_keep], [dev_labels[i] for i in dev_keep]
        self.device = device
        return self.tokenizer

    def build_model(self) -> nn.Module:
        c = self.config
        self.args = ClassifierArgs(
            cell=c.cell,
            vocab_size=self.tokenizer.get_vocab_size(),
            embedding_size=c.emb,
            hidden_size=c.hidden,
            num_layers=c.layers,
            num_classes=len(self.names),
            bidirectional=c.bidirectional,
            pooling=c.pooling,
            dropout=c.dropout,
            emb_dropout=c.emb_dropout,
            pad_id=special_token_ids(self.tokenizer, CLASSIFIER_SPECIAL_TOKENS)["pad"],
        )
        return RNNClassifier(self.args)

    def ready(self, model: nn.Module, main: bool) -> None:
        if main:
            tqdm.write(
                f"{len(self.train_ids)} training / {len(self.dev_ids)} dev examples, labels {self.names}, "
                f"vocabulary {self.args.vocab_size}, {sum(p.numel() for p in model.parameters())} parameters"
            )

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_ids) / self.config.batch_size)

    def epoch_batches(self, epoch: int) -> Sequence[list[int]]:
        self.epoch_order = self.rng.getstate()
        return length_buckets([len(s) for s in self.train_ids], self.config.batch_size, self.rng)

    def end_epoch(self) -> None:
        self.epoch_order = self.rng.getstate()  # the next epoch's order starts from here

    def loss(self, model: nn.Module, batch: list[int]) -> tuple[Tensor, int]:
        tokens, lengths = pad_batch([self.train_ids[i] for i in batch], self.args.pad_id)  # (batch, max_len)
        target = torch.tensor([self.train_labels[i] for i in batch], device=self.device)  # (batch,)
        return F.cross_entropy(model(tokens.to(self.device), lengths), target), len(batch)

    def evaluation_steps(self, steps_in_epoch: int) -> Collection[int]:
        every = max(1, math.ceil(steps_in_epoch / max(1, self.config.evals_per_epoch)))
        return {*range(every, steps_in_epoch + 1, every), steps_in_epoch}

    def evaluate(self, model: nn.Module, position: EvalPosition) -> Evaluation:
        assert isinstance(model, RNNClassifier)
        report = evaluate(model, self.dev_ids, self.dev_labels, self.names)
        metrics = {
            "epoch": position.fractional_epoch,
            "train_loss": position.train_loss,
            "dev_loss": report["loss"],
            **flat_metrics(report),
            "train_seconds": position.train_seconds,
        }
        return Evaluation(metrics, {"report": report})

    def describe(self, evaluation: Evaluation, improved: bool) -> str:
        m, best_mark = evaluation.metrics, "  (best)" if improved else ""
        return (
            f"epoch {m['epoch']:.2f}: train loss {m['train_loss']:.4f}, dev loss {m['dev_loss']:.4f}, "
            f"dev accuracy {m['dev_accuracy']:.4f}{best_mark}"
        )

    def checkpoint_extras(self) -> dict[str, Any]:
        return {
            "labels": list(self.names),
            "raw_labels": list(self.raw_names),
            "special_tokens": special_token_ids(self.tokenizer, CLASSIFIER_SPECIAL_TOKENS),
            "tokenizer_kind": self.config.tokenizer,
        }

    def run_state(self, dist: DistInfo) -> dict[str, Any] | None:
        return {"epoch_order": self.epoch_order}

    def load_run_state(self, last: dict[str, Any], dist: DistInfo, device: torch.device) -> None:
        version, internal, gauss = last["epoch_order"]
        self.rng.setstate((version, tuple(internal), gauss))

    def finish(self, checkpoint: Path, model: nn.Module, progress: Progress) -> None:
        finish_history(checkpoint, progress.history, progress.train_seconds)
