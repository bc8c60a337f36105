"""`rnnserve train lm|classifier ...`: the training subcommands (this module must not import torch at import
time)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from rnnserve.training.config import ClassifierTrainConfig, TrainConfig

_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
_CLF_DEFAULTS = {f.name: f.default for f in fields(ClassifierTrainConfig)}
CELL_CHOICES = ["rnn_tanh", "rnn_relu", "lstm", "gru"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` (with the nested `lm` and `classifier` subcommands) to an argparse subparsers object."""
    train = subparsers.add_parser("train", help="train a model")
    kinds = train.add_subparsers(dest="train_command", required=True, metavar="{lm,classifier}")
    lm = kinds.add_parser("lm", help="train a recurrent language model (truncated BPTT)")
    _add_lm_arguments(lm)
    lm.set_defaults(func=run_train_lm)
    clf = kinds.add_parser(
        "classifier",
        help="train a recurrent text classifier (pooling over time) on labelled text",
        description="Labelled text: a TSV/CSV file with a header row (text and label columns, detected by "
        "name) or a directory with one subdirectory per label holding one text per file.",
    )
    _add_classifier_arguments(clf)
    clf.set_defaults(func=run_train_classifier)


def _add_lm_arguments(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    p.add_argument("--data", help="text file or directory of .txt files (default: the Python stdlib)")
    p.add_argument("--tokenizer", choices=["char", "word"], default=d["tokenizer"])
    p.add_argument("--cell", choices=CELL_CHOICES, default=d["cell"])
    p.add_argument("--layers", type=int, default=d["layers"])
    p.add_argument("--hidden", type=int, default=d["hidden"])
    p.add_argument("--emb", type=int, default=d["emb"])
    p.add_argument("--dropout", type=float, default=d["dropout"])
    p.add_argument("--tie-weights", action="store_true", help="share embedding/output (needs emb == hidden)")
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--bptt", type=int, default=d["bptt"], help="truncated-BPTT window in tokens")
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--clip", type=float, default=d["clip"], help="gradient-norm clip")
    p.add_argument("--max-steps-per-epoch", type=int, default=d["max_steps_per_epoch"])
    p.add_argument("--max-chars", type=int, default=d["max_chars"], help="size of the default corpus")
    p.add_argument("--min-count", type=int, default=d["min_count"], help="rarer tokens become <unk>")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--threads", type=int, default=d["threads"], help="torch CPU threads")
    p.add_argument("--device", default=d["device"], help="cpu, cuda or auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sample", type=int, default=300, help="print this many sampled tokens at the end")
    p.add_argument("--out", required=True, help="output directory (checkpoint.pt, tokenizer.json)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that the parsed flags describe."""
    return TrainConfig(
        data=args.data,
        tokenizer=args.tokenizer,
        min_count=args.min_count,
        max_chars=args.max_chars,
        cell=args.cell,
        layers=args.layers,
        hidden=args.hidden,
        emb=args.emb,
        dropout=args.dropout,
        tie_weights=args.tie_weights,
        epochs=args.epochs,
        batch_size=args.batch_size,
        bptt=args.bptt,
        lr=args.lr,
        clip=args.clip,
        max_steps_per_epoch=args.max_steps_per_epoch,
        seed=args.seed,
        threads=args.threads,
        device=args.device,
        progress=not args.no_progress,
        out_dir=args.out,
    )


def run_train_lm(args: argparse.Namespace) -> int:
    """Train, print the checkpoint path, its metrics and a short sample; returns the exit code."""
    from rnnserve.training.sample import sample_text
    from rnnserve.training.train import load_checkpoint, train_language_model

    try:
        config = config_from_args(args)
        path = train_language_model(config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model, tok, ckpt = load_checkpoint(path)
    m = ckpt["metrics"]
    print(f"checkpoint: {path}")
    print(f"epoch {m['epoch']}: val loss {m['val_loss']:.4f}, val ppl {m['val_ppl']:.3f}")
    if args.sample > 0:
        print("sample:\n" + sample_text(model, tok, max_tokens=args.sample, seed=config.seed))
    return 0


def _add_classifier_arguments(p: argparse.ArgumentParser) -> None:
    d = _CLF_DEFAULTS
    p.add_argument("--train", required=True, help="TSV/CSV file or directory-per-label tree")
    p.add_argument("--dev", help="dev split, same layouts (default: hold out --dev-fraction of train)")
    p.add_argument("--dev-fraction", type=float, default=d["dev_fraction"])
    p.add_argument(
        "--text-column", default=d["text_column"], help="default: detect (sentence, content, text...)"
    )
    p.add_argument("--label-column", default=d["label_column"], help="default: detect (label, sentiment...)")
    p.add_argument("--label-names", help="comma-separated display names by class id (default: from the data)")
    p.add_argument("--tokenizer", choices=["word", "bpe"], default=d["tokenizer"])
    p.add_argument("--no-lowercase", action="store_true", help="keep case (default: lowercase normalizer)")
    p.add_argument("--vocab-size", type=int, default=d["vocab_size"], help="vocabulary cap / BPE target size")
    p.add_argument(
        "--min-freq", type=int, default=d["min_freq"], help="rarer words (or BPE pairs) are dropped"
    )
    p.add_argument("--cell", choices=CELL_CHOICES, default=d["cell"])
    p.add_argument("--layers", type=int, default=d["layers"])
    p.add_argument("--hidden", type=int, default=d["hidden"], help="hidden size per direction")
    p.add_argument("--emb", type=int, default=d["emb"])
    bi = p.add_mutually_exclusive_group()
    bi.add_argument("--bidirectional", dest="bidirectional", action="store_true", default=d["bidirectional"],
                    help="whole-text model (default)")  # fmt: skip
    bi.add_argument("--unidirectional", dest="bidirectional", action="store_false",
                    help="streamable model: classifies a text chunk by chunk")  # fmt: skip
    p.add_argument("--pooling", choices=["max", "mean", "last"], default=d["pooling"])
    p.add_argument("--dropout", type=float, default=d["dropout"])
    p.add_argument("--emb-dropout", type=float, default=d["emb_dropout"])
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--clip", type=float, default=d["clip"], help="gradient-norm clip")
    p.add_argument("--patience", type=int, default=d["patience"], help="evaluations without improvement")
    p.add_argument("--evals-per-epoch", type=int, default=d["evals_per_epoch"])
    p.add_argument("--max-train-examples", type=int, default=d["max_train_examples"])
    p.add_argument("--max-len", type=int, default=d["max_len"], help="truncate training texts (tokens)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--threads", type=int, default=d["threads"], help="torch CPU threads")
    p.add_argument("--device", default=d["device"], help="cpu, cuda or auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output directory (checkpoint.pt, tokenizer.json)")


def classifier_config_from_args(args: argparse.Namespace) -> ClassifierTrainConfig:
    """The ClassifierTrainConfig that the parsed flags describe."""
    names = [n.strip() for n in args.label_names.split(",")] if args.label_names else None
    return ClassifierTrainConfig(
        train=args.train,
        dev=args.dev,
        dev_fraction=args.dev_fraction,
        text_column=args.text_column,
        label_column=args.label_column,
        label_names=names,
        tokenizer=args.tokenizer,
        lowercase=not args.no_lowercase,
        vocab_size=args.vocab_size,
        min_freq=args.min_freq,
        cell=args.cell,
        layers=args.layers,
        hidden=args.hidden,
        emb=args.emb,
        bidirectional=args.bidirectional,
        pooling=args.pooling,
        dropout=args.dropout,
        emb_dropout=args.emb_dropout,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        clip=args.clip,
        patience=args.patience,
        evals_per_epoch=args.evals_per_epoch,
        max_train_examples=args.max_train_examples,
        max_len=args.max_len,
        seed=args.seed,
        threads=args.threads,
        device=args.device,
        progress=not args.no_progress,
        out_dir=args.out,
    )


def run_train_classifier(args: argparse.Namespace) -> int:
    """Train, then print the checkpoint path and the dev report of the best checkpoint."""
    from rnnserve.training.classifier_data import DataError
    from rnnserve.training.classifier_train import format_report, load_classifier_checkpoint, train_classifier

    try:
        path = train_classifier(classifier_config_from_args(args))
    except (ValueError, FileNotFoundError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _, _, ckpt = load_classifier_checkpoint(path)
    m = ckpt["metrics"]
    print(f"checkpoint: {path}")
    print(
        f"best dev evaluation at epoch {m['epoch']:.2f}, after {m['train_seconds']:.0f} s "
        f"(the run took {ckpt['train_seconds_total']:.0f} s in all)"
    )
    print(format_report(m["report"]))
    return 0
