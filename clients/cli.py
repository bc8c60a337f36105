"""The client commands of the `rnnserve` CLI: generate, classify, models, session, reload.

`register(subparsers)` adds them; the `rnnserve` command itself (every role's subcommands) is
`rnnserve.cli`. This module imports only the client library (never the training, export or server roles),
and the connection helpers here (`add_connection_flags`, `connect`) serve every command that calls a server.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rnnserve.client.client import Client


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    """--token and the TLS flags, for every command that calls a server (read by `connection_options`)."""
    p.add_argument(
        "--token",
        default=None,
        help="bearer token sent with every call [$RNNSERVE_TOKEN, which keeps it out of `ps`]",
    )
    p.add_argument(
        "--tls-ca",
        default=None,
        metavar="FILE",
        help="connect with TLS, trusting server certificates this CA (PEM) signed [$RNNSERVE_TLS_CA]; "
        "--url https://HOST:PORT: TLS with the system's roots",
    )
    p.add_argument(
        "--tls-cert",
        default=None,
        metavar="FILE",
        help="mTLS: this client's certificate (PEM), with --tls-key [$RNNSERVE_CLIENT_CERT]",
    )
    p.add_argument(
        "--tls-key", default=None, metavar="FILE", help="mTLS: the key of --tls-cert [$RNNSERVE_CLIENT_KEY]"
    )


def connection_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `tls` and `token` arguments of a client, from the flags of `add_connection_flags`."""
    from rnnserve.client.channel import TLS

    return {"tls": TLS.from_env(args.tls_ca, args.tls_cert, args.tls_key), "token": args.token}


def connect(args: argparse.Namespace) -> Client:
    """A client for --url and the connection flags."""
    from rnnserve.client.client import Client

    return Client(args.url, **connection_options(args))


def _register_generate(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("generate", help="stream a sampled continuation of a prompt to the terminal")
    p.add_argument("--url", default=None, help="server host:port (default $RNNSERVE_URL or localhost:50051)")
    p.add_argument("--model", required=True, help="model name (see `rnnserve models`)")
    p.add_argument("--version", default="", help="model version (default: latest)")
    p.add_argument("--prompt", default=None, help="text to continue (default: start a new document)")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="same seed, same prompt => same text")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    add_connection_flags(p)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    with connect(args) as client, client.session(args.model, version=args.version) as session:
        if args.prompt:
            print(args.prompt, end="", flush=True)
        stream = session.generate(
            args.prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop,
        )
        for token in stream:
            print(token.text, end="", flush=True)
        print(f"\n[finish: {stream.finish_reason}, {len(stream.tokens)} tokens]", file=sys.stderr)
    return 0


def _register_classify(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("classify", help="classify texts with a classifier model (e.g. sentiment)")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify ('-' reads lines from stdin)")
    p.add_argument("--url", default=None, help="server host:port (default $RNNSERVE_URL or localhost:50051)")
    p.add_argument("--model", required=True, help="classifier model name (see `rnnserve models`)")
    p.add_argument("--version", default="", help="model version (default: latest)")
    add_connection_flags(p)
    p.set_defaults(func=run_classify)


def run_classify(args: argparse.Namespace) -> int:
    texts = [line.rstrip("\n") for line in sys.stdin] if args.texts == ["-"] else args.texts
    with connect(args) as client:
        for text, result in zip(texts, client.classify(args.model, texts, version=args.version), strict=True):
            probs = "  ".join(
                f"{label}={p:.3f}" for label, p in zip(result.labels, result.probs, strict=True)
            )
            print(f"{result.label}\t{probs}\t{text}")
    return 0


def _register_models(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    p = subparsers.add_parser(
        "models", help="list the models a server has loaded; `models validate REPO` checks bundles offline"
    )
    p.add_argument("--url", default=None, help="server host:port (default $RNNSERVE_URL or localhost:50051)")
    add_connection_flags(p)
    p.set_defaults(func=run_models)
    return p.add_subparsers(dest="models_command")


def run_models(args: argparse.Namespace) -> int:
    with connect(args) as client:
        for m in client.models():
            latest = " (latest)" if m.latest else ""
            metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(m.metrics.items()))
            kind = m.task if m.task == "lm" else f"classifier ({m.classifier_mode}, {m.pooling} pooling)"
            bi = "bi-" if m.num_directions == 2 else ""
            print(
                f"{m.name}@{m.version}{latest}: {kind} {bi}{m.cell} {m.num_layers}x{m.hidden_size}, "
                f"vocab {m.vocab_size} ({m.tokenizer}), {m.provider}; {metrics}"
            )
    return 0


URL_HELP = "server host:port (default $RNNSERVE_URL or localhost:50051)"


def _register_sessions(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("session", help="export, import or fork a session on a server")
    commands = p.add_subparsers(dest="session_command", required=True, metavar="{export,import,fork}")
    export = commands.add_parser(
        "export", help="write a session's snapshot (state, position, model) to a file"
    )
    export.add_argument("session_id", metavar="SESSION_ID")
    export.add_argument("-o", "--output", required=True, help="file to write ('-' for stdout)")
    imported = commands.add_parser("import", help="open a new session from an exported file; prints its id")
    imported.add_argument("file", metavar="FILE", help="a file `session export` wrote ('-' for stdin)")
    fork = commands.add_parser("fork", help="open a copy of a session; prints the new session's id")
    fork.add_argument("session_id", metavar="SESSION_ID")
    for command in (imported, fork):
        command.add_argument("--ttl-seconds", type=int, default=0, help="idle TTL (0: the source's)")
    for command in (export, imported, fork):
        command.add_argument("--url", default=None, help=URL_HELP)
        add_connection_flags(command)
        command.set_defaults(func=run_session)
    reload = subparsers.add_parser("reload", help="load model versions added to the server's repository")
    reload.add_argument("--url", default=None, help=URL_HELP)
    add_connection_flags(reload)
    reload.set_defaults(func=run_reload)


def run_session(args: argparse.Namespace) -> int:
    with connect(args) as client:
        if args.session_command == "export":
            snapshot = client.attach(args.session_id).export()
            if args.output == "-":
                sys.stdout.buffer.write(snapshot)
            else:
                with open(args.output, "wb") as f:
                    f.write(snapshot)
            return 0
        if args.session_command == "import":
            with sys.stdin.buffer if args.file == "-" else open(args.file, "rb") as f:
                session = client.import_session(f.read(), ttl_seconds=args.ttl_seconds)
        else:
            session = client.attach(args.session_id).fork(ttl_seconds=args.ttl_seconds)
        print(session.id)
        print(f"{session.model}@{session.version}, position {session.position}", file=sys.stderr)
    return 0


def run_reload(args: argparse.Namespace) -> int:
    with connect(args) as client:
        result = client.reload_models()
    for m in result.loaded:
        print(f"loaded {m.name}@{m.version}")
    for refused in result.refused:
        print(f"refused {refused.path}: {refused.reason}")
    for key in result.unloaded:
        print(f"unloaded {key}")
    if not (result.loaded or result.refused or result.unloaded):
        print("nothing changed", file=sys.stderr)
    return 1 if result.refused else 0


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """Add the client commands; returns the subcommands of `rnnserve models`, where offline model tools
    of other roles go (`models validate`, registered by `rnnserve.cli`)."""
    _register_generate(subparsers)
    _register_classify(subparsers)
    models_commands = _register_models(subparsers)
    _register_sessions(subparsers)
    return models_commands


if __name__ == "__main__":
    sys.exit("the `rnnserve` command is `python -m rnnserve` (rnnserve.cli), not rnnserve.client.cli")
