"""`rnnserve serve`: the command-line front of the server (flags mirror ServerConfig)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from rnnserve.server.config import ServerConfig


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("serve", help="serve every model bundle in a repository over gRPC")
    d = ServerConfig(repo=Path("."))
    p.add_argument("--repo", type=Path, required=True, help="model repository: <repo>/<name>/<version>/")
    p.add_argument("--host", default=d.host, help=f"address to bind (default {d.host}; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port}; 0 = any free port)")
    p.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default=d.device,
        help="ONNX Runtime device: auto uses CUDA when it really works (default auto)",
    )
    p.add_argument(
        "--intra-op-threads",
        type=int,
        default=d.intra_op_threads,
        help="ORT threads per run (default: all cores but one for the event loop)",
    )
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="most sessions in one model run")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=d.max_wait_ms,
        help="how long a step may wait for others to batch with (default 0)",
    )
    p.add_argument("--max-sessions", type=int, default=d.max_sessions, help="open sessions allowed")
    p.add_argument(
        "--session-ttl", type=float, default=d.session_ttl_s, help="idle seconds before a session expires"
    )
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes, help="largest gRPC message")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rnnserve.server.app import serve_forever  # heavy imports only when serving

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(
        repo=args.repo,
        host=args.host,
        port=args.port,
        device=args.device,
        intra_op_threads=args.intra_op_threads,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_sessions=args.max_sessions,
        session_ttl_s=args.session_ttl,
        max_message_bytes=args.max_message_bytes,
    )
    asyncio.run(serve_forever(config))
    return 0
