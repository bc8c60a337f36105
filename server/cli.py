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

from rnnserve.server.config import GENERATE_GRAPH_CHOICES, LOG_FORMATS, ServerConfig

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
    _add(
        p,
        "--http-port",
        d.http_port,
        "HTTP on http://HOST:PORT/: the playground page (try a model in a browser) and the KServe V2 "
        "REST routes under /v2 (0 = any free port; default -1 = off)",
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
        "--owner-lease-s",
        d.owner_lease_s,
        "with a Redis store shared by replicas: each session has one owner at a time, through a lease "
        "of this many seconds that the owner renews; a dead replica's sessions move to another after "
        "at most this long",
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
        "--tls-cert",
        None,
        "serve TLS with this certificate (PEM, the chain after it); with --tls-key (default: plaintext)",
        type=Path,
    )
    _add(p, "--tls-key", None, "the private key of --tls-cert (PEM)", type=Path)
    _add(
        p,
        "--tls-client-ca",
        None,
        "mTLS: every client must present a certificate this CA (PEM) signed",
        type=Path,
    )
    _add(
        p,
        "--grace",
        d.grace_s,
        f"seconds calls in flight get to finish on SIGTERM (default {d.grace_s:.0f})",
        type=float,
    )
    _add(
        p,
        "--log-format",
        d.log_format,
        "server logs as plain text lines, or one JSON object per line (time, level, logger, message, "
        "and fields such as request_id) (text|json)",
    )
    access = os.environ.get(env_name("--access-log"), "")
    p.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=d.access_log if access == "" else access.lower() not in ("0", "false", "no", "off"),
        help="one INFO line per call (logger rnnserve.access: method, code, duration, request id, session, "
        "model, caller's token name) [$RNNSERVE_ACCESS_LOG=1|0]",
    )
    _add(
        p,
        "--otel-endpoint",
        d.otel_endpoint,
        "send OpenTelemetry traces (a span per call and per model run) over OTLP/gRPC to this collector, "
        "e.g. http://localhost:4317; needs the otel extra (default: no tracing)",
    )
    _add(
        p,
        "--auth-tokens",
        None,
        "require bearer tokens: a TOML file of [[token]] entries (name, sha256, models, optional "
        "max_sessions / max_generates; `rnnserve auth add` makes them), re-read when it changes or on "
        "SIGHUP; RNNSERVE_AUTH_TOKEN_<NAME>=sha256:<hex> variables add tokens too (default: no "
        "authentication when neither is given)",
        type=Path,
    )
    _add(
        p,
        "--max-sessions-per-token",
        d.max_sessions_per_token,
        "open sessions one token may hold (0 = no limit but --max-sessions; a token's entry may set its own)",
        type=int,
    )
    _add(
        p,
        "--max-generates-per-token",
        d.max_generates_per_token,
        "Generate calls one token may have in flight at once (0 = no limit; a token's entry may set its own)",
        type=int,
    )
    _add(
        p,
        "--max-input-tokens",
        d.max_input_tokens,
        "most tokens in one Stream message or Generate prompt (longer input is refused; split it)",
        type=int,
    )
    _add(
        p, "--max-generate-tokens", d.max_generate_tokens, "largest max_tokens of one Generate call", type=int
    )
    p.set_defaults(func=run)

    _register_auth(subparsers)

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
    from rnnserve.client.cli import add_connection_flags

    add_connection_flags(h)  # a TLS server's health check: --tls-ca (in a container: $RNNSERVE_TLS_CA)
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
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_client_ca and not args.tls_cert):
        print(
            "rnnserve serve: --tls-cert and --tls-key go together, and --tls-client-ca needs both",
            file=sys.stderr,
        )
        return 2
    for flag in ("max_sessions_per_token", "max_generates_per_token"):
        if getattr(args, flag) < 0:
            print(f"rnnserve serve: --{flag.replace('_', '-')} must be >= 0 (0 = no limit)", file=sys.stderr)
            return 2
    for flag in ("max_input_tokens", "max_generate_tokens"):
        if getattr(args, flag) < 1:
            print(f"rnnserve serve: --{flag.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.log_format not in LOG_FORMATS:
        print(
            f"rnnserve serve: --log-format must be one of {', '.join(LOG_FORMATS)}, got {args.log_format!r}",
            file=sys.stderr,
        )
        return 2
    if args.otel_endpoint:
        from rnnserve.server.tracing import TracingUnavailable, require

        try:
            require()
        except TracingUnavailable as exc:
            print(f"rnnserve serve: --otel-endpoint: {exc}", file=sys.stderr)
            return 2
    from rnnserve.server import logs
    from rnnserve.server.app import serve_forever  # heavy imports only when serving

    logs.setup(args.log_format, access=args.access_log)
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
        owner_lease_s=args.owner_lease_s,
        max_message_bytes=args.max_message_bytes,
        grace_s=args.grace,
        watch_interval_s=args.watch_interval_s,
        auth_tokens=args.auth_tokens,
        auth_env=tuple((k, v) for k, v in sorted(os.environ.items()) if k.startswith("RNNSERVE_AUTH_TOKEN_")),
        max_sessions_per_token=args.max_sessions_per_token,
        max_generates_per_token=args.max_generates_per_token,
        max_input_tokens=args.max_input_tokens,
        max_generate_tokens=args.max_generate_tokens,
        log_format=args.log_format,
        access_log=args.access_log,
        otel_endpoint=args.otel_endpoint,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        metrics_port=METRICS_PORT if args.metrics_port is None else args.metrics_port,
        metrics_required=args.metrics_port is not None,
        http_port=args.http_port,
    )
    from rnnserve.server.auth import TokenFileError

    try:
        asyncio.run(serve_forever(config))
    except (OSError, TokenFileError) as exc:  # a port in use, a repository that isn't there, bad tokens
        logging.getLogger("rnnserve.server").error("cannot serve: %s", exc)
        return 1
    return 0


def _register_auth(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = subparsers.add_parser(
        "auth",
        help="make bearer tokens for `rnnserve serve --auth-tokens` (the file holds only their hashes)",
    )
    commands = a.add_subparsers(dest="auth_command", metavar="{add,hash}", required=True)
    add = commands.add_parser(
        "add",
        help="make a new random token: prints it once, and the [[token]] entry for the token file",
    )
    add.add_argument("name", help="the token's name (in logs, and who owns the sessions it creates)")
    add.add_argument("--models", default="*", help="comma-separated model names it may use (default * = all)")
    add.add_argument("--max-sessions", type=int, default=None, help="its own max open sessions")
    add.add_argument("--max-generates", type=int, default=None, help="its own max concurrent Generates")
    add.add_argument(
        "--file",
        type=Path,
        default=None,
        help="append the entry to this token file (a running server picks it up) instead of printing it",
    )
    add.set_defaults(func=run_auth_add)
    hashed = commands.add_parser(
        "hash", help="print the sha256 of a token read from stdin (for a token made elsewhere)"
    )
    hashed.set_defaults(func=run_auth_hash)


def token_entry_toml(name: str, digest: str, models: list[str], limits: dict[str, int | None]) -> str:
    """A [[token]] entry of the token file."""
    lines = ["[[token]]", f'name = "{name}"', f'sha256 = "{digest}"']
    lines.append("models = [" + ", ".join(f'"{m}"' for m in models) + "]")
    lines += [f"{key} = {value}" for key, value in limits.items() if value is not None]
    return "\n".join(lines) + "\n"


def run_auth_add(args: argparse.Namespace) -> int:
    from rnnserve.server.auth import TokenFileError, entry_of, hash_token, new_token

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    token = new_token()
    limits = {"max_sessions": args.max_sessions, "max_generates": args.max_generates}
    digest = hash_token(token)
    try:  # the checks the server makes
        entry_of({"name": args.name, "sha256": digest, "models": models, **limits}, "the new token")
    except TokenFileError as exc:
        print(f"rnnserve auth add: {exc}", file=sys.stderr)
        return 2
    entry = token_entry_toml(args.name, digest, models, limits)
    if args.file is not None:
        existing = args.file.read_text(encoding="utf-8") if args.file.exists() else ""
        separator = "\n" if existing and not existing.endswith("\n\n") else ""
        with args.file.open("a", encoding="utf-8") as f:
            f.write(("\n" if existing and not existing.endswith("\n") else "") + separator + entry)
        print(
            f"added token {args.name!r} to {args.file}; the token (shown once, keep it secret):",
            file=sys.stderr,
        )
        print(token)
    else:
        print(f"# token {args.name!r} (shown once, keep it secret; it is not in the entry below):")
        print(f"# {token}")
        print(entry, end="")
    return 0


def run_auth_hash(args: argparse.Namespace) -> int:
    from rnnserve.server.auth import hash_token

    token = sys.stdin.readline().strip()
    if not token:
        print("rnnserve auth hash: give the token on stdin (e.g. from a file: < token.txt)", file=sys.stderr)
        return 2
    print(hash_token(token))
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

    from rnnserve.client.channel import connection, open_channel
    from rnnserve.client.cli import connection_options
    from rnnserve.client.errors import from_rpc_error

    target = health_target(args.url)
    conn = connection(target, max_message_bytes=4 * 1024 * 1024, **connection_options(args))
    with open_channel(conn) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service),
                timeout=args.timeout,
                metadata=conn.metadata or None,
            )
        except grpc.RpcError as error:
            print(f"{target}: {from_rpc_error(error)}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{target}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1
