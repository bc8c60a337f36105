"""`rnnserve demo`: the main job end to end, on data every machine has.

Trains a small LSTM language model on the Python standard library's own source (or `--data PATH`),
exports it to a bundle, starts `rnnserve serve` in a separate process, and streams a sampled
continuation of a prompt through the Python client. With `--sentiment-data` (SST-2's folder or any
labelled TSV/CSV) it also trains a streaming sentiment classifier and shows live sentiment.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rnnserve.client.client import Client

REVIEW = "the first half is a slow , tedious slog , but the ending is wonderful and genuinely moving ."
SENTENCES = ["a gorgeous , witty , seductive movie .", "the plot is nothing but a dull mess ."]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("demo", help="train, export, serve and stream from a small LSTM LM")
    p.add_argument(
        "--data", default=None, help="text file or directory for the LM (default: Python's stdlib)"
    )
    p.add_argument(
        "--sentiment-data",
        type=Path,
        default=None,
        help="also train a live-sentiment classifier on SST-2's folder (train/dev.tsv) or a labelled TSV",
    )
    p.add_argument("--workdir", type=Path, default=Path("demo_out"), help="where runs/ and model_repo/ go")
    p.add_argument("--name", default="demo", help="model name in the repository")
    p.add_argument("--prompt", default="def ", help="text the model continues")
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="override the LM's default number of epochs")
    p.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train_lm(args: argparse.Namespace, repo: Path) -> None:
    from rnnserve.export.onnx_export import export_checkpoint
    from rnnserve.training.train import TrainConfig, train_language_model

    # force: a demo run starts afresh in its work directory each time.
    config = TrainConfig(data=args.data, out_dir=str(args.workdir / "runs" / args.name), force=True)
    if args.epochs is not None:
        config.epochs = args.epochs
    print(
        f"[train] a {config.layers}-layer {config.cell.upper()} ({config.hidden} hidden) "
        f"{config.tokenizer}-level LM on {args.data or 'the Python standard library'}",
        flush=True,
    )
    checkpoint = train_language_model(config)
    print(
        f"[export] {export_checkpoint(checkpoint, repo, args.name)} (validated against PyTorch)", flush=True
    )


def _train_sentiment(data: Path, workdir: Path, repo: Path) -> None:
    from rnnserve.export.onnx_export import export_checkpoint
    from rnnserve.training.classifier_train import train_classifier
    from rnnserve.training.config import ClassifierTrainConfig

    train, dev = (data / "train.tsv", data / "dev.tsv") if data.is_dir() else (data, None)
    # A unidirectional GRU streams: its running probabilities can follow a text as it is typed.
    config = ClassifierTrainConfig(
        train=str(train),
        dev=str(dev) if dev else None,
        cell="gru",
        bidirectional=False,
        hidden=128,
        emb=128,
        epochs=1,
        max_train_examples=30_000,
        out_dir=str(workdir / "runs" / "sentiment"),
        force=True,
    )
    print(f"[train] a streaming GRU sentiment classifier on {train}", flush=True)
    checkpoint = train_classifier(config)
    print(f"[export] {export_checkpoint(checkpoint, repo, 'sentiment')}", flush=True)


def _stream_lm(client: Client, args: argparse.Namespace) -> None:
    model = next(m for m in client.models() if m.name == args.name and m.latest)
    ppl = model.metrics.get("val_ppl", float("nan"))
    print(
        f"\n{model.name}@{model.version} on {model.provider} (val ppl {ppl:.2f}), "
        f"streaming a continuation of {args.prompt!r}:\n",
        flush=True,
    )
    with client.session(args.name) as session:
        print(args.prompt, end="", flush=True)
        stream = session.generate(
            args.prompt, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
        )
        for token in stream:
            print(token.text, end="", flush=True)
        print(f"\n\n[{len(stream.tokens)} tokens, finish reason: {stream.finish_reason}]")


def _show_sentiment(client: Client) -> None:
    model = next(m for m in client.models() if m.name == "sentiment" and m.latest)
    print(f"\nsentiment@{model.version}: dev accuracy {model.metrics.get('dev_accuracy', float('nan')):.3f}")
    for sentence, result in zip(SENTENCES, client.classify("sentiment", SENTENCES), strict=True):
        print(f"  {result.label:>8} {max(result.probs):.2f}  {sentence}")
    positive = model.labels.index("positive") if "positive" in model.labels else len(model.labels) - 1
    print(f"\nlive sentiment while a review is typed (P({model.labels[positive]}) after each word):")
    with client.session("sentiment") as session:
        for word in REVIEW.split():
            out = session.feed(word + " ").classification
            assert out is not None
            bar = "#" * round(out.probs[positive] * 20)
            print(f"  {out.probs[positive]:.2f} {bar:<20} {word}", flush=True)


def run(args: argparse.Namespace) -> int:
    from rnnserve.client.client import Client

    started = time.monotonic()
    repo = args.workdir / "model_repo"
    _train_lm(args, repo)
    if args.sentiment_data:
        _train_sentiment(args.sentiment_data, args.workdir, repo)
    port = _free_port()
    print(f"[serve] `rnnserve serve --repo {repo}` on 127.0.0.1:{port}", flush=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "rnnserve", "serve", "--repo", str(repo), "--port", str(port)],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        with Client(f"127.0.0.1:{port}") as client:
            while not client.wait_ready(timeout=1.0):
                if server.poll() is not None:
                    raise SystemExit(f"the server exited with code {server.returncode}")
            _stream_lm(client, args)
            if args.sentiment_data:
                _show_sentiment(client)
        print(f"\n[demo took {time.monotonic() - started:.0f}s]")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    return 0
