"""Train a recurrent text classifier (sentiment) with early stopping on dev accuracy.

    rnnserve train classifier --train ../shared/data/sst-2/train.tsv --dev ../shared/data/sst-2/dev.tsv \
        --out runs/sst2-bilstm

or from Python: `train_classifier(ClassifierTrainConfig(train=..., dev=..., out_dir=...))`. The tokenizer is
built from the training split only and saved as `tokenizer.json` beside `checkpoint.pt`; the checkpoint is
a plain dict (`torch.load(..., weights_only=True)`) with `kind: "classifier"`, the model args, the config,
the labels and the dev metrics of the best evaluation (accuracy, per-class precision/recall/F1, confusion
matrix). `predict_proba` is the PyTorch reference that an exported graph (and the server) must match.

The loop is the shared skeleton (`rnnserve.training.trainer`); the classifier's behaviour is
`ClassifierTask` (`rnnserve.training.classifier_task`). This module keeps its metrics, prediction and
checkpoint helpers.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor

from rnnserve.training.checkpoint import model_checkpoint, read_checkpoint, save_model_checkpoint
from rnnserve.training.classifier_model import ClassifierArgs, RNNClassifier
from rnnserve.training.config import ClassifierTrainConfig
from rnnserve.training.runstate import save_atomically
from rnnserve.training.tokenizer import CLASSIFIER_SPECIAL_TOKENS, special_token_ids

__all__ = [
    "ClassifierTrainConfig",
    "classification_report",
    "encode_texts",
    "finish_history",
    "flat_metrics",
    "format_report",
    "load_classifier_checkpoint",
    "predict_proba",
    "save_classifier_checkpoint",
    "train_classifier",
]

KIND = "classifier"
PREDICT_BATCH = 256


def encode_texts(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text exactly as the server encodes them (normalizer included, no specials)."""
    return [enc.ids for enc in tok.encode_batch(texts, add_special_tokens=False)]


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(tokens (batch, max_len) right-padded with pad_id, lengths (batch,)) as int64 tensors."""
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return tokens, torch.tensor([len(s) for s in seqs], dtype=torch.long)


# -- metrics --------------------------------------------------------------------------------------------


def classification_report(gold: list[int], pred: list[int], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix [gold][pred]."""
    k = len(labels)
    cm = [[0] * k for _ in range(k)]
    for g, p in zip(gold, pred, strict=True):
        cm[g][p] += 1
    per_class: dict[str, dict[str, float]] = {}
    for i, name in enumerate(labels):
        tp = cm[i][i]
        predicted = sum(cm[r][i] for r in range(k))
        support = sum(cm[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": float(support)}
    n = max(len(gold), 1)
    return {
        "accuracy": sum(cm[i][i] for i in range(k)) / n,
        "macro_f1": sum(c["f1"] for c in per_class.values()) / k,
        "per_class": per_class,
        "confusion_matrix": cm,
        "labels": list(labels),
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as text: accuracy, per-class table, confusion matrix (rows gold, columns predicted)."""
    labels: list[str] = report["labels"]
    w = max(9, *(len(n) for n in labels)) + 1
    lines = [f"accuracy {report['accuracy']:.4f}   macro F1 {report['macro_f1']:.4f}", ""]
    lines.append(f"{'class':<{w}} precision  recall     f1  support")
    for name, c in report["per_class"].items():
        lines.append(
            f"{name:<{w}} {c['precision']:9.4f} {c['recall']:7.4f} {c['f1']:6.4f} {int(c['support']):8d}"
        )
    lines += ["", "confusion matrix (rows: gold, columns: predicted)"]
    lines.append(" " * w + "".join(f"{n:>{w}}" for n in labels))
    for name, row in zip(labels, report["confusion_matrix"], strict=True):
        lines.append(f"{name:<{w}}" + "".join(f"{v:>{w}d}" for v in row))
    return "\n".join(lines)


def flat_metrics(report: dict[str, Any], prefix: str = "dev_") -> dict[str, float]:
    """The report's numbers as a flat str -> float dict (what a manifest's `metrics` holds)."""
    out = {f"{prefix}accuracy": float(report["accuracy"]), f"{prefix}macro_f1": float(report["macro_f1"])}
    for name, c in report["per_class"].items():
        for key in ("precision", "recall", "f1"):
            out[f"{prefix}{key}.{name}"] = float(c[key])
    return out


# -- prediction ----------------------------------------------------------------------------------------


@torch.no_grad()
def _logits(model: RNNClassifier, seqs: list[list[int]], batch_size: int = PREDICT_BATCH) -> Tensor:
    """Logits (N, classes) in input order; batches by similar length. Every sequence must be non-empty."""
    empty = [i for i, s in enumerate(seqs) if not s]
    if empty:
        raise ValueError(f"texts {empty[:5]} have no tokens after tokenization; nothing to classify")
    device = model.classifier.weight.device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs), model.args.num_classes)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        tokens, lengths = pad_batch([seqs[i] for i in idx], model.args.pad_id)
        out[idx] = model(tokens.to(device), lengths).float().cpu()
    return out


def predict_proba(model: RNNClassifier, tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """Class probabilities (N, classes) float32 for `texts`, the reference the server must match.

    Encodes with `tokenizer.encode(text, add_special_tokens=False).ids`, no truncation. A text with no
    tokens at all (e.g. empty) is a ValueError.
    """
    was_training = model.training
    model.eval()
    try:
        probs = F.softmax(_logits(model, encode_texts(tokenizer, texts)), dim=-1)
    finally:
        model.train(was_training)
    return probs.numpy().astype(np.float32)


@torch.no_grad()
def evaluate(
    model: RNNClassifier, seqs: list[list[int]], gold: list[int], labels: list[str]
) -> dict[str, Any]:
    """Classification report plus the mean cross-entropy (`loss`) of `model` (eval mode) on the examples."""
    model.eval()
    logits = _logits(model, seqs)
    report = classification_report(gold, logits.argmax(dim=-1).tolist(), labels)
    report["loss"] = float(F.cross_entropy(logits, torch.tensor(gold)).item())
    return report


# -- training and checkpoints --------------------------------------------------------------------------


def train_classifier(config: ClassifierTrainConfig) -> Path:
    """Train as configured; returns the best checkpoint's path (tokenizer.json is beside it).

    `last.pt` is written every `save_every` steps and after each evaluation; with `config.resume` the run
    continues from it and ends with the weights an uninterrupted run would have. Ctrl-C or `max_steps`
    writes `last.pt` and raises `TrainingStopped`.
    """
    # Imported here: the task module imports this one's helpers.
    from rnnserve.training.classifier_task import ClassifierTask
    from rnnserve.training.trainer import Trainer

    return Trainer(ClassifierTask(config)).run()


def finish_history(path: Path, history: list[dict[str, float]], seconds: float) -> None:
    """Record every evaluation (including those after the best) and the total time in the checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["history"] = history
    ckpt["train_seconds_total"] = seconds
    save_atomically(ckpt, path)


def save_classifier_checkpoint(
    path: Path,
    model: RNNClassifier,
    config: ClassifierTrainConfig,
    tok: Tokenizer,
    labels: list[str],
    raw_labels: list[str],
    metrics: dict[str, Any],
    history: list[dict[str, float]] | None = None,
) -> None:
    """Write the plain-dict classifier checkpoint atomically (`ClassifierTask` writes the same).

    `metrics` holds flat numbers (dev_accuracy, dev_loss, ...) and `report` (the full classification
    report with per-class figures and the confusion matrix).
    """
    ckpt = model_checkpoint(
        KIND, asdict(model.args), asdict(config), model, metrics, history or [],
        labels=list(labels), raw_labels=list(raw_labels),
        special_tokens=special_token_ids(tok, CLASSIFIER_SPECIAL_TOKENS), tokenizer_kind=config.tokenizer,
    )  # fmt: skip
    save_model_checkpoint(path, ckpt)


def load_classifier_checkpoint(path: str | Path) -> tuple[RNNClassifier, Tokenizer, dict[str, Any]]:
    """(model in eval mode on CPU, tokenizer from tokenizer.json beside it, the checkpoint dict)."""
    ckpt, tokenizer = read_checkpoint(path, KIND)
    model = RNNClassifier(ClassifierArgs(**ckpt["model_args"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), tokenizer, ckpt
