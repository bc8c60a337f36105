"""`rnnserve demo`: the main job end to end, on data every machine has.

Trains a small LSTM language model on the Python standard library's own source (or `--data PATH`),
exports it to a bundle, starts `rnnserve serve` in a separate process, and streams a sampled
continuation of a prompt through the Python client.
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


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("demo", help="train, export, serve and stream from a small LSTM LM")
    p.add_argument(
        "--data", default=None, help="text file or directory to train on (default: Python's stdlib)"
    )
    p.add_argument("--workdir", type=Path, default=Path("demo_out"), help="where runs/ and model_repo/ go")
    p.add_argument("--name", default="demo", help="model name in the repository")
    p.add_argument("--prompt", default="def ", help="text the model continues")
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="override the default number of epochs")
    p.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train_and_export(args: argparse.Namespace) -> Path:
    from rnnserve.export.onnx_export import export_checkpoint
    from rnnserve.training.train import TrainConfig, train_language_model

    config = TrainConfig(data=args.data, out_dir=str(args.workdir / "runs" / args.name))
    if args.epochs is not None:
        config.epochs = args.epochs
    print(
        f"[1/3] training a {config.layers}-layer {config.cell.upper()} ({config.hidden} hidden) "
        f"{config.tokenizer}-level LM on {args.data or 'the Python standard library'}",
        flush=True,
    )
    checkpoint = train_language_model(config)
    print("[2/3] exporting to ONNX (validated against PyTorch)", flush=True)
    bundle = export_checkpoint(checkpoint, args.workdir / "model_repo", args.name)
    print(f"      bundle: {bundle}", flush=True)
    return bundle


def run(args: argparse.Namespace) -> int:
    from rnnserve.client.client import Client

    started = time.monotonic()
    _train_and_export(args)
    port = _free_port()
    print(f"[3/3] starting `rnnserve serve` on 127.0.0.1:{port} and streaming from it", flush=True)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rnnserve.client.cli",
            "serve",
            "--repo",
            str(args.workdir / "model_repo"),
            "--port",
            str(port),
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        with Client(f"127.0.0.1:{port}") as client:
            while not client.wait_ready(timeout=1.0):
                if server.poll() is not None:
                    raise SystemExit(f"the server exited with code {server.returncode}")
            model = next(m for m in client.models() if m.name == args.name and m.latest)
            print(
                f"      serving {model.name}@{model.version} on {model.provider} "
                f"(val ppl {model.metrics.get('val_ppl', float('nan')):.2f})\n",
                flush=True,
            )
            with client.session(args.name) as session:
                print(args.prompt, end="", flush=True)
                stream = session.generate(
                    args.prompt, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
                )
                for token in stream:
                    print(token.text, end="", flush=True)
                print(
                    f"\n\n[{len(stream.tokens)} tokens streamed, finish reason: {stream.finish_reason}; "
                    f"demo took {time.monotonic() - started:.0f}s]"
                )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    return 0
