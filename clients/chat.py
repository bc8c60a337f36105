"""`rnnserve chat`: talk to a dialogue model in the terminal (docs/dialogue.md).

    rnnserve chat --model chat                  # type a line, read the reply as it is generated
    printf 'hello\\nhow are you?\\n' | rnnserve chat --model chat --seed 1 --temperature 0

Each line read from stdin is one turn (`Session.say`: the text, then <eos>); the model's turn is streamed
to stdout as it is generated (`Session.reply`: a Generate that closes the turn), one line per reply. The
conversation is one session on the server: its state is the whole conversation, a fixed size however
long it gets. Commands: `/reset` starts a new conversation (a new session), `/quit` (or end of input)
ends. Works with piped stdin: no prompt is written unless stdin is a terminal.

Also runnable before it is registered in the `rnnserve` command: `python -m rnnserve.client.chat ...`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from rnnserve.client.cli import add_connection_flags, connect
from rnnserve.client.errors import RnnserveError

if TYPE_CHECKING:
    from rnnserve.client.session import Session

QUIT = "/quit"
RESET = "/reset"
PROMPT = "you> "  # written to stderr, and only when stdin is a terminal


def add_chat_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="server host:port (default $RNNSERVE_URL or localhost:50051)")
    p.add_argument("--model", required=True, help="dialogue model name (see `rnnserve models`)")
    p.add_argument("--version", default="", help="model version (default: latest)")
    p.add_argument("--max-tokens", type=int, default=100, help="most tokens of one reply")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument(
        "--seed", type=int, default=None, help="seed of every reply (same conversation => same replies)"
    )
    add_connection_flags(p)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `rnnserve chat`."""
    p = subparsers.add_parser(
        "chat",
        help="chat with a dialogue model in the terminal (a line in, the streamed reply out)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_chat_flags(p)
    p.set_defaults(func=run_chat)


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """The chat loop: each line of stdin is said, the reply streamed to stdout."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty()
    with connect(args) as client:
        session = client.session(args.model, version=args.version)
        try:
            while True:
                if interactive:
                    print(PROMPT, end="", file=sys.stderr, flush=True)
                line = stdin.readline()
                text = line.strip()
                if not line or text == QUIT:
                    break
                if text == RESET:
                    session.close()
                    session = client.session(args.model, version=args.version)
                    print("[a new conversation]", file=sys.stderr, flush=True)
                elif text:
                    _turn(session, text, args, stdout)
        finally:
            session.close()
    return 0


def _turn(session: Session, text: str, args: argparse.Namespace, stdout: TextIO) -> None:
    """Say `text`, then stream the model's reply to stdout (one line)."""
    session.say(text)
    reply = session.reply(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    for token in reply:
        stdout.write(token.text)
        stdout.flush()
    stdout.write("\n")
    stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """`rnnserve chat` on its own (the flags as `rnnserve chat --help` lists them)."""
    parser = argparse.ArgumentParser(
        prog="rnnserve chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_chat_flags(parser)
    args = parser.parse_args(argv)
    try:
        return run_chat(args)
    except RnnserveError as exc:
        print(f"rnnserve chat: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
