"""Train a recurrent text classifier (sentiment) with early stopping on dev accuracy.

    rnnserve train classifier --train ../shared/data/sst-2/train.tsv --dev ../shared/data/sst-2/dev.tsv \
        --out runs/sst2-bilstm

or from Python: `train_classifier(ClassifierTrainConfig(train=..., dev=..., out_dir=...))`. The tokenizer is
built from the training split only and saved as `tokenizer.json` beside `checkpoint.pt`; the checkpoint is
a plain dict (`torch.load(..., weights_only=True)`) with `kind: "classifier"`, the model args, the config,
the labels and the dev metrics of the best evaluation (accuracy, per-class precision/recall/F1, confusion
matrix). `predict_proba` is the PyTorch reference that an exported graph (and the server) must match.
"""

from __future__ import annotations

import math
import random
import sys
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

from rnnserve.training.classifier_data import (
    display_names,
    length_buckets,
    load_labelled,
    resolve_splits,
    split_holdout,
    subsample,
)
from rnnserve.training.classifier_model import ClassifierArgs, RNNClassifier
from rnnserve.training.config import ClassifierTrainConfig
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
from rnnserve.training.tokenizer import (
    CLASSIFIER_SPECIAL_TOKENS,
    CLASSIFIER_TOKENIZER_KINDS,
    build_classifier_tokenizer,
    special_token_ids,
)
from rnnserve.training.train import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    TOKENIZER_FILE,
    device_for,
    read_checkpoint,
)

__all__ = [
    "ClassifierTrainConfig",
    "classification_report",
    "encode_texts",
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


# -- training ------------------------------------------------------------------------------------------


def _prepare(
    config: ClassifierTrainConfig,
) -> tuple[Tokenizer, list[list[int]], list[int], list[list[int]], list[int], list[str], list[str]]:
    """(tokenizer, train ids, train labels, dev ids, dev labels, raw label names, display names)."""
    if config.tokenizer not in CLASSIFIER_TOKENIZER_KINDS:
        raise ValueError(f"tokenizer must be one of {CLASSIFIER_TOKENIZER_KINDS}, got {config.tokenizer!r}")
    if not config.train:
        raise ValueError("no training data: set `train` (--train) to a TSV/CSV file or a label directory")
    cols = {"text_column": config.text_column, "label_column": config.label_column}
    train_path, dev_path = resolve_splits(config.train, config.dev)  # a data set folder: its splits
    print(f"train: {train_path}; dev: {dev_path or f'{config.dev_fraction:.0%} held out of train'}")
    texts, labels, raw_names = load_labelled(train_path, **cols)
    if dev_path is not None:
        dev_texts, dev_labels, _ = load_labelled(dev_path, label_names=raw_names, **cols)
    else:
        (texts, labels), (dev_texts, dev_labels) = split_holdout(
            texts, labels, config.dev_fraction, config.seed
        )
    texts, labels = subsample(texts, labels, config.max_train_examples, config.seed)
    names = display_names(raw_names, config.label_names)
    tok = build_classifier_tokenizer(
        config.tokenizer,
        texts,
        lowercase=config.lowercase,
        min_freq=config.min_freq,
        vocab_size=config.vocab_size,
    )  # fmt: skip  (train texts only)
    train_ids = encode_texts(tok, texts)
    keep = [i for i, s in enumerate(train_ids) if s]  # a text with no tokens teaches nothing
    train_ids = [train_ids[i][: config.max_len] if config.max_len else train_ids[i] for i in keep]
    train_labels = [labels[i] for i in keep]
    dev_ids = encode_texts(tok, dev_texts)
    dev_keep = [i for i, s in enumerate(dev_ids) if s]
    if not train_ids or not dev_keep:
        raise ValueError("no non-empty training or dev texts after tokenization")
    return (tok, train_ids, train_labels, [dev_ids[i] for i in dev_keep], [dev_labels[i] for i in dev_keep],
            raw_names, names)  # fmt: skip


def _model_args(config: ClassifierTrainConfig, tok: Tokenizer, num_classes: int) -> ClassifierArgs:
    return ClassifierArgs(
        cell=config.cell,
        vocab_size=tok.get_vocab_size(),
        embedding_size=config.emb,
        hidden_size=config.hidden,
        num_layers=config.layers,
        num_classes=num_classes,
        bidirectional=config.bidirectional,
        pooling=config.pooling,
        dropout=config.dropout,
        emb_dropout=config.emb_dropout,
        pad_id=special_token_ids(tok, CLASSIFIER_SPECIAL_TOKENS)["pad"],
    )


@dataclass
class _ClassifierProgress:
    """Where a classifier run is: what `last.pt` restores besides the model, optimiser and RNG."""

    epoch: int = 1
    step_in_epoch: int = 0  # batches of this epoch already trained on
    global_step: int = 0
    epoch_loss_sum: float = 0.0  # example-weighted training loss so far this epoch
    epoch_examples: int = 0
    best: float = -1.0  # best dev accuracy so far
    stale: int = 0  # evaluations since the best (early stopping)
    train_seconds: float = 0.0  # summed over resumed sessions
    history: list[dict[str, float]] = field(default_factory=list)


def _save_classifier_last(
    path: Path,
    model: RNNClassifier,
    opt: torch.optim.Optimizer,
    config: ClassifierTrainConfig,
    progress: _ClassifierProgress,
    epoch_order: object,
) -> None:
    """Write `last.pt` atomically. `epoch_order` is the data-order RNG state at the start of this epoch,
    from which `resume` rebuilds the same batches and skips the ones already trained on."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "kind": "classifier-last",
        "model_args": asdict(model.args),
        "config": asdict(config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "rng": rng_state(),
        "epoch_order": epoch_order,
        "progress": asdict(progress),
    }
    save_atomically(ckpt, path)


def train_classifier(config: ClassifierTrainConfig) -> Path:
    """Train as configured; returns the best checkpoint's path (tokenizer.json is beside it).

    `last.pt` is written every `save_every` steps and after each evaluation; with `config.resume` the run
    continues from it and ends with the weights an uninterrupted run would have. Ctrl-C or `max_steps`
    writes `last.pt` and raises `TrainingStopped`.
    """
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)  # data order
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = device_for(config.device)
    out = Path(config.out_dir)
    last_path = out / LAST_FILE
    check_new_run(out, config.resume, config.force, "rnnserve train classifier")
    if not config.resume and last_path.exists():
        print(f"--force: starting a new run in {out} (the earlier run's files are overwritten)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    tok, train_ids, train_labels, dev_ids, dev_labels, raw_names, names = _prepare(config)
    tok.save(str(out / TOKENIZER_FILE))
    args = _model_args(config, tok, len(names))
    model = RNNClassifier(args).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    progress = _ClassifierProgress()
    if config.resume:
        last = torch.load(last_path, map_location="cpu", weights_only=True)
        if last.get("model_args") != asdict(args):
            raise ValueError(f"cannot resume: {last_path} holds a different model ({last.get('model_args')})")
        model.load_state_dict(last["state_dict"])
        opt.load_state_dict(last["optimizer"])
        progress = _ClassifierProgress(**last["progress"])
        set_rng_state(last["rng"])
        version, internal, gauss = last["epoch_order"]
        rng.setstate((version, tuple(internal), gauss))
    tqdm.write(
        f"{len(train_ids)} training / {len(dev_ids)} dev examples, labels {names}, "
        f"vocabulary {args.vocab_size}, {sum(p.numel() for p in model.parameters())} parameters"
    )
    path = out / CHECKPOINT_FILE
    lengths = [len(s) for s in train_ids]
    stop_reason: str | None = None
    clock = RunClock(progress)

    def save_last(epoch_order: object) -> None:
        clock.tick()
        _save_classifier_last(last_path, model, opt, config, progress, epoch_order)

    def save_best(metrics: dict[str, Any], history: list[dict[str, float]]) -> None:
        save_classifier_checkpoint(path, model, config, tok, names, raw_names, metrics, history)

    with InterruptFlag() as interrupt:
        while progress.epoch <= config.epochs and stop_reason is None:
            epoch = progress.epoch
            epoch_order = rng.getstate()
            batches = length_buckets(lengths, config.batch_size, rng)
            per_eval = max(1, math.ceil(len(batches) / max(1, config.evals_per_epoch)))
            bar = tqdm(
                batches,
                desc=f"epoch {epoch}",
                disable=not config.progress,
                unit="batch",
                initial=progress.step_in_epoch,
                mininterval=1.0 if sys.stderr.isatty() else 30.0,
            )  # fmt: skip  (a log file stays short)

            for idx in batches[progress.step_in_epoch :]:
                model.train()
                tokens, lens = pad_batch([train_ids[i] for i in idx], args.pad_id)
                target = torch.tensor([train_labels[i] for i in idx], device=device)
                loss = F.cross_entropy(model(tokens.to(device), lens), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
                opt.step()
                progress.step_in_epoch += 1
                progress.global_step += 1
                progress.epoch_loss_sum += loss.item() * len(idx)
                progress.epoch_examples += len(idx)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{progress.epoch_loss_sum / progress.epoch_examples:.4f}", refresh=False
                )
                step = progress.step_in_epoch
                if step % per_eval == 0 or step == len(batches):
                    clock.tick()
                    dev = (dev_ids, dev_labels, names)
                    _evaluate_and_keep_best(model, config, progress, dev, len(batches), save_best)
                    if progress.stale >= config.patience:
                        progress.epoch = config.epochs + 1  # early stop: the run is over
                        tqdm.write(f"early stop: no better dev accuracy in {config.patience} evaluations")
                        break
                if interrupt.raised:
                    stop_reason = "interrupted"
                elif config.max_steps is not None and progress.global_step >= config.max_steps:
                    stop_reason = "max_steps reached"
                if stop_reason is not None:
                    break
                if (
                    step < len(batches)
                    and config.save_every > 0
                    and progress.global_step % config.save_every == 0
                ):
                    save_last(epoch_order)
            bar.close()
            if stop_reason is not None and progress.step_in_epoch < len(batches):
                save_last(epoch_order)
                break
            if progress.epoch == epoch:  # the epoch ran to its end
                progress.epoch += 1
                progress.step_in_epoch, progress.epoch_loss_sum, progress.epoch_examples = 0, 0.0, 0
            epoch_order = rng.getstate()  # the next epoch's order starts from here
            save_last(epoch_order)
    if stop_reason is not None:
        if not path.exists():  # stopped before its first evaluation: evaluate now, so it can be exported
            record = _evaluation_record(model, progress, (dev_ids, dev_labels, names), len(batches))
            save_best(record, [*progress.history, {k: v for k, v in record.items() if k != "report"}])
            tqdm.write(
                f"stopped at step {progress.global_step} before the first evaluation: dev accuracy "
                f"{record['dev_accuracy']:.4f}; {path} written"
            )
        raise TrainingStopped(last_path, progress.global_step, stop_reason, path)
    clock.tick()
    _finish_history(path, progress.history, progress.train_seconds)
    return path


def _evaluate_and_keep_best(
    model: RNNClassifier,
    config: ClassifierTrainConfig,
    progress: _ClassifierProgress,
    dev: tuple[list[list[int]], list[int], list[str]],
    epoch_batches: int,
    save_best: Callable[[dict[str, Any], list[dict[str, float]]], None],
) -> None:
    """Evaluate on dev, record it in the history, save the checkpoint if it is the best so far."""
    record = _evaluation_record(model, progress, dev, epoch_batches)
    report = record.pop("report")
    progress.history.append(record)
    improved = report["accuracy"] > progress.best
    best_mark = "  (best)" if improved else ""
    tqdm.write(
        f"epoch {record['epoch']:.2f}: train loss {record['train_loss']:.4f}, dev loss "
        f"{report['loss']:.4f}, dev accuracy {report['accuracy']:.4f}{best_mark}"
    )
    if improved:
        progress.best, progress.stale = report["accuracy"], 0
        save_best({**record, "report": report}, progress.history)
    else:
        progress.stale += 1


def _evaluation_record(
    model: RNNClassifier,
    progress: _ClassifierProgress,
    dev: tuple[list[list[int]], list[int], list[str]],
    epoch_batches: int,
) -> dict[str, Any]:
    """One evaluation on dev (token ids, labels, label names): flat figures plus the full `report`."""
    report = evaluate(model, *dev)
    return {
        "epoch": progress.epoch + progress.step_in_epoch / epoch_batches - 1,
        "train_loss": progress.epoch_loss_sum / max(progress.epoch_examples, 1),
        "dev_loss": report["loss"],
        **flat_metrics(report),
        "train_seconds": progress.train_seconds,
        "report": report,
    }


def _finish_history(path: Path, history: list[dict[str, float]], seconds: float) -> None:
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
    """Write the plain-dict classifier checkpoint atomically.

    `metrics` holds flat numbers (dev_accuracy, dev_loss, ...) and `report` (the full classification
    report with per-class figures and the confusion matrix).
    """
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "kind": KIND,
        "model_args": asdict(model.args),
        "config": asdict(config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "labels": list(labels),
        "raw_labels": list(raw_labels),
        "special_tokens": special_token_ids(tok, CLASSIFIER_SPECIAL_TOKENS),
        "tokenizer_kind": config.tokenizer,
        "metrics": metrics,
        "history": list(history or []),
    }
    save_atomically(ckpt, path)


def load_classifier_checkpoint(path: str | Path) -> tuple[RNNClassifier, Tokenizer, dict[str, Any]]:
    """(model in eval mode on CPU, tokenizer from tokenizer.json beside it, the checkpoint dict)."""
    ckpt, tokenizer = read_checkpoint(path, KIND)
    model = RNNClassifier(ClassifierArgs(**ckpt["model_args"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), tokenizer, ckpt
