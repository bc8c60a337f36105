"""The `rnnserve` command: one CLI for every role.

    rnnserve train lm --out runs/demo            # needs the `train` extra
    rnnserve export runs/demo/checkpoint.pt --repo model_repo --name demo
    rnnserve serve --repo model_repo             # needs the `serve` extra
    rnnserve generate --model demo --prompt "def main("
    rnnserve classify --model sst2 "a gorgeous, witty film" "a dull mess"
    rnnserve models
    rnnserve models validate model_repo        # offline: what is wrong with each bundle
    rnnserve session export SESSION_ID -o s.bin  # a session as bytes; `session import s.bin` restores it
    rnnserve session fork SESSION_ID             # a copy of a session (prints the new id)
    rnnserve reload                              # load model versions added to the server's repository
    rnnserve train dialogue --out runs/chat      # an HRED dialogue model on Tiny Shakespeare's speeches
    rnnserve chat --model chat                   # talk to it: a line in, the streamed reply out
    rnnserve demo                                # all of the above, end to end

Subcommands register their flags without importing torch or ONNX Runtime; those load only when the
subcommand runs, so a client-only install can still use `generate` and `models`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rnnserve.client.errors import RnnserveError

# The extras (pyproject.toml) a command needs beyond the client install, and which extra brings a module.
COMMAND_EXTRAS = {
    "train": "train",
    "sample": "train",
    "export": "train",
    "data": "train",
    "serve": "serve",
    "demo": "train,serve",  # it trains, exports and serves
}
MODULE_EXTRAS = {
    "torch": "train",
    "onnx": "train",
    "onnxscript": "train",
    "tqdm": "train",
    "onnxruntime": "serve",
    "tokenizers": "serve",
    "grpc_health": "serve",
    "grpc_reflection": "serve",
    "grpc_status": "serve",
    "prometheus_client": "serve",
}


def missing_extra(command: str, module: str | None) -> str | None:
    """The extra to install when `command` fails to import `module` (None: not a module of ours to name)."""
    top = (module or "").split(".")[0]
    if top not in MODULE_EXTRAS:
        return None
    return COMMAND_EXTRAS.get(command, MODULE_EXTRAS[top])


def register_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Every role's subcommands, in the order `rnnserve --help` lists them: THE list of registrations.

    Each role's `cli` module registers its flags without importing torch or ONNX Runtime. A new kind of
    model adds its lines here: its `rnnserve train KIND` goes on `train_kinds` (the subparsers under
    `rnnserve train`), a new top-level command on `subparsers` (as the dialogue model's two lines below).
    """
    from rnnserve import demo
    from rnnserve.client import chat
    from rnnserve.client import cli as client_cli
    from rnnserve.export import cli as export_cli
    from rnnserve.server import cli as server_cli
    from rnnserve.training import cli as training_cli
    from rnnserve.training import dialogue_cli

    train_kinds = training_cli.register(subparsers)  # train {lm,classifier}, sample, data
    dialogue_cli.register(train_kinds)  # train dialogue (docs/dialogue.md)
    export_cli.register(subparsers)  # export
    server_cli.register(subparsers)  # serve, auth, health
    models_commands = client_cli.register(subparsers)  # generate, classify, models, session, reload
    export_cli.register_models_validate(models_commands)  # models validate (offline)
    chat.register(subparsers)  # chat: a terminal conversation with a dialogue model
    demo.register(subparsers)  # demo: train, export, serve, stream


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnserve", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RnnserveError as error:
        print(f"rnnserve: {error}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as error:
        extra = missing_extra(args.command, error.name)
        if extra is None:
            raise
        print(
            f"rnnserve {args.command} needs {error.name}, which a client-only install lacks: "
            f"pip install 'rnnserve[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
