"""`rnnserve serve` and `rnnserve health`: the command-line front of the server.

Every `serve` flag mirrors a ServerConfig field and falls back to an environment variable named after
it (`--max-batch` ← `RNNSERVE_MAX_BATCH`), so a container is configured with environment variables
alone; a flag given on the command line wins over the variable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from rnnserve.server.config import GENERATE_GRAPH_CHOICES, ServerConfig

DEVICES = ("auto", "cuda", "cpu")
METRICS_PORT = 9464  # when neither --metrics-port nor RNNSERVE_METRICS_PORT says otherwise
HEALTH_SERVICE = "rnnserve.v1.RnnServe"


def env_name(flag: str) -> str:
    """The environment variable behind a flag: --max-batch -> RNNSERVE_MAX_BATCH."""
    return "RNNSERVE_" + flag.lstrip("-").replace("-", "_").upper()


def _add(p: argparse.ArgumentParser, flag: str, default: Any, help: str, **kwargs: Any) -> None:
    """A flag whose default comes from its environment variable when set (argparse applies `type`)."""
    name = env_name(flag)
    value = os.environ.get(name)
    p.add_argument(
        flag, default=default if value in (None, "") else value, help=f"{help} [${name}]", **kwargs
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve every model bundle in a repository over gRPC",
        description="Flags fall back to the environment variable in brackets; a given flag wins.",
    )
    d = ServerConfig(repo=Path("."))
    repo = os.environ.get(env_name("--repo"))
    p.add_argument(
        "--repo",
        type=Path,
        required=not repo,
        default=repo or None,
        help="model repository: <repo>/<name>/<version>/ [$RNNSERVE_REPO]",
    )
    _add(p, "--host", d.host, f"address to bind (default {d.host}; 0.0.0.0 for all)")
    _add(p, "--port", d.port, f"port (default {d.port}; 0 = any free port)", type=int)
    _add(
        p,
        "--metrics-port",
        None,
        f"Prometheus metrics on http://HOST:PORT/metrics (default {METRICS_PORT}, skipped with a warning if "
        "in use; a port given here must bind; 0 = any free port, -1 = off)",
        type=int,
    )
    _add(p, "--device", d.device, "ONNX Runtime device: auto uses CUDA when it really works (auto|cuda|cpu)")
    _add(
        p,
        "--intra-op-threads",
        d.intra_op_threads,
        "ORT threads per run (default, per model: all cores but one for the event loop; every core on "
        "a small machine for a model whose token costs >= 6 MFLOP, whose runs leave the loop gaps)",
        type=int,
    )
    _add(
        p,
        "--generate-graphs",
        d.generate_graphs,
        "K-step generation graphs (K tokens per run, sampled inside the graph): auto = every graph on "
        "CUDA, the plain ones (no top-k/top-p) on a CPU, where they beat host sampling; on; off",
    )
    _add(
        p,
        "--generate-steps",
        d.generate_steps,
        "K of the generation graphs used (a K the bundles have; 0 = each bundle's default)",
        type=int,
    )
    _add(p, "--max-batch", d.max_batch, "most sessions in one model run", type=int)
    _add(
        p,
        "--max-wait-ms",
        d.max_wait_ms,
        "extra time a batch that starts from idle waits for others to join (default 0: batches grow "
        "with load by themselves, from what arrives while a run is in flight)",
        type=float,
    )
    _add(
        p,
        "--inline-max-tokens",
        d.inline_max_tokens,
        "batches of at most this many tokens run on the event loop when fast (skips the ~0.2 ms hop "
        "to the ORT worker thread; 0 = always the worker)",
        type=int,
    )
    _add(
        p,
        "--generate-flush-ms",
        d.generate_flush_ms,
        "under load, how long a generated token may wait to share a message with the next ones "
        "(fewer, fuller messages: per-message cost is what limits many generating sessions; "
        "a request's flush_interval_ms overrides it; 0 = never wait)",
        type=float,
    )
    _add(
        p,
        "--generate-flush-min-sessions",
        d.generate_flush_min_sessions,
        "how many sessions must be generating on a model for --generate-flush-ms to apply "
        "(below it, every token is sent as soon as it is made)",
        type=int,
    )
    _add(p, "--max-sessions", d.max_sessions, "open sessions allowed", type=int)
    _add(p, "--session-ttl", d.session_ttl_s, "idle seconds before a session expires", type=float)
    _add(
        p,
        "--session-store",
        d.session_store,
        "where sessions live beyond memory: 'memory' (lost on restart) or redis://HOST:PORT/DB (sessions "
        "survive restarts and are shared by replicas)",
    )
    _add(
        p,
        "--persist-interval-ms",
        d.persist_interval_ms,
        "with a Redis store: write changed sessions every N ms (a crash loses at most the messages "
        "answered in the last N ms, which the client resends); 0 = write-through (a reply waits for its "
        "write; a crash loses nothing answered)",
        type=float,
    )
    _add(
        p,
        "--idle-ttl",
        d.idle_ttl_s,
        "seconds idle before a session leaves memory for the session store (it comes back on its next "
        "message; 0 = sessions stay in memory until --session-ttl)",
        type=float,
    )
    _add(
        p, "--max-message-bytes", d.max_message_bytes, "largest request message the server accepts", type=int
    )
    _add(
        p,
        "--watch-interval-s",
        d.watch_interval_s,
        "look for new model versions in the repository every N seconds and load them without a restart "
        "(0 = off; the ReloadModels call works either way)",
        type=float,
    )
    _add(
        p,
        "--grace",
        d.grace_s,
        f"seconds calls in flight get to finish on SIGTERM (default {d.grace_s:.0f})",
        type=float,
    )
    p.set_defaults(func=run)

    h = subparsers.add_parser(
        "health",
        help="ask a server's gRPC health service; exit 0 if SERVING (a container health check)",
    )
    h.add_argument(
        "--url",
        default=None,
        help="host:port (default: localhost:$RNNSERVE_PORT, else $RNNSERVE_URL, else localhost:50051)",
    )
    h.add_argument(
        "--service", default=HEALTH_SERVICE, help=f"service to ask about ('' = server; {HEALTH_SERVICE})"
    )
    h.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    h.set_defaults(func=run_health)


def run(args: argparse.Namespace) -> int:
    if args.device not in DEVICES:
        print(
            f"rnnserve serve: --device must be one of {', '.join(DEVICES)}, got {args.device!r}",
            file=sys.stderr,
        )
        return 2
    if args.generate_graphs not in GENERATE_GRAPH_CHOICES:
        print(
            f"rnnserve serve: --generate-graphs must be one of {', '.join(GENERATE_GRAPH_CHOICES)}, "
            f"got {args.generate_graphs!r}",
            file=sys.stderr,
        )
        return 2
    if not 0 <= args.generate_flush_ms <= 1000:
        print(
            f"rnnserve serve: --generate-flush-ms must be in [0, 1000], got {args.generate_flush_ms}",
            file=sys.stderr,
        )
        return 2
    from rnnserve.server.app import serve_forever  # heavy imports only when serving

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(
        repo=args.repo,
        host=args.host,
        port=args.port,
        device=args.device,
        intra_op_threads=args.intra_op_threads,
        generate_graphs=args.generate_graphs,
        generate_steps=args.generate_steps,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        inline_max_tokens=args.inline_max_tokens,
        generate_flush_ms=args.generate_flush_ms,
        generate_flush_min_sessions=args.generate_flush_min_sessions,
        max_sessions=args.max_sessions,
        session_ttl_s=args.session_ttl,
        session_store=args.session_store,
        persist_interval_ms=args.persist_interval_ms,
        idle_ttl_s=args.idle_ttl,
        max_message_bytes=args.max_message_bytes,
        grace_s=args.grace,
        watch_interval_s=args.watch_interval_s,
        metrics_port=METRICS_PORT if args.metrics_port is None else args.metrics_port,
        metrics_required=args.metrics_port is not None,
    )
    try:
        asyncio.run(serve_forever(config))
    except OSError as exc:  # a port in use, a repository that isn't there
        logging.getLogger("rnnserve.server").error("cannot serve: %s", exc)
        return 1
    return 0


def health_target(url: str | None) -> str:
    if url:
        return url
    if os.environ.get("RNNSERVE_PORT"):
        return f"localhost:{os.environ['RNNSERVE_PORT']}"
    return os.environ.get("RNNSERVE_URL") or "localhost:50051"


def run_health(args: argparse.Namespace) -> int:
    """Print the health status of `--service`; 0 if SERVING, 1 otherwise (or unreachable)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = health_target(args.url)
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"{target}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{target}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1
