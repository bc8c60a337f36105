"""The `rnnserve` command lives at the namespace root (rnnserve/cli.py) and the client package imports
no other role."""

from __future__ import annotations

import subprocess
import sys

from rnnserve.cli import build_parser


def test_one_parser_registers_every_role() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert commands is not None
    for name in ("train", "sample", "data", "export", "serve", "auth", "health", "generate", "classify",
                 "models", "session", "reload", "demo"):  # fmt: skip
        assert name in commands, name
    args = parser.parse_args(["models", "validate", "repo"])
    assert args.repo == "repo"  # the export role's offline check, under the client's `models`


def test_the_client_commands_import_no_other_role() -> None:
    code = (
        "import sys, argparse\n"
        "from rnnserve.client import cli\n"
        "cli.register(argparse.ArgumentParser().add_subparsers())\n"
        "roles = [m for m in sys.modules if m.split('.')[:2] in (['rnnserve', 'training'],"
        " ['rnnserve', 'export'], ['rnnserve', 'server'])]\n"
        "assert not roles, roles\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_python_m_rnnserve_is_the_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rnnserve", "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    assert "serve" in out.stdout and "generate" in out.stdout
