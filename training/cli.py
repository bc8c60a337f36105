"""`rnnserve train lm ...`: the training subcommands (this module must not import torch at import time)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from rnnserve.training.config import TrainConfig

_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` (with the nested `lm` subcommand) to an argparse subparsers object."""
    train = subparsers.add_parser("train", help="train a model")
    kinds = train.add_subparsers(dest="train_command", required=True, metavar="{lm}")
    lm = kinds.add_parser("lm", help="train a recurrent language model (truncated BPTT)")
    _add_lm_arguments(lm)
    lm.set_defaults(func=run_train_lm)


def _add_lm_arguments(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    p.add_argument("--data", help="text file or directory of .txt files (default: the Python stdlib)")
    p.add_argument("--tokenizer", choices=["char", "word"], default=d["tokenizer"])
    p.add_argument("--cell", choices=["rnn_tanh", "rnn_relu", "lstm", "gru"], default=d["cell"])
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
