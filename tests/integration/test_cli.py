"""The `rnnserve` CLI for real: `serve` in a subprocess, `models` and `generate` against it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import free_port

from rnnserve.client import Client

CLI = [sys.executable, "-m", "rnnserve"]


@pytest.fixture(scope="module")
def served(lm_repo: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "serve", "--repo", str(lm_repo), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"127.0.0.1:{port}"
    try:
        with Client(url) as client:
            assert client.wait_ready(timeout=60), "server did not come up"
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        # The server logs which execution provider it uses, and never loads torch.
        assert "on CPUExecutionProvider" in out


def test_serve_never_imports_torch(lm_repo: Path) -> None:
    code = (
        "import sys, pathlib\n"
        "from rnnserve.server.app import RnnServeServer\n"
        "from rnnserve.server.config import ServerConfig\n"
        f"RnnServeServer(ServerConfig(repo=pathlib.Path({str(lm_repo)!r})))\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_models_command(served: str) -> None:
    out = subprocess.run([*CLI, "models", "--url", served], capture_output=True, text=True, check=True)
    assert "tiny@1 (latest): lm lstm 2x32" in out.stdout


def test_generate_command_streams_to_the_terminal(served: str) -> None:
    args = [
        *CLI,
        "generate",
        "--url",
        served,
        "--model",
        "tiny",
        "--prompt",
        "def ",
        "--max-tokens",
        "30",
        "--seed",
        "3",
    ]
    first = subprocess.run(args, capture_output=True, text=True, check=True)
    second = subprocess.run(args, capture_output=True, text=True, check=True)
    assert first.stdout.startswith("def ") and len(first.stdout) > len("def ")
    assert first.stdout == second.stdout  # seeded: reproducible
    assert "finish:" in first.stderr


def test_generate_against_unknown_model_says_so(served: str) -> None:
    out = subprocess.run(
        [*CLI, "generate", "--url", served, "--model", "nope"],
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert out.returncode == 1
    assert "NOT_FOUND: model 'nope' is not loaded" in out.stderr


def test_demo_end_to_end_on_small_data(tmp_path: Path) -> None:
    """`rnnserve demo` as a user runs it, on small data so it takes seconds: LM stream + live sentiment."""
    from conftest import TINY_CORPUS, synthetic_sentiment_tsv

    from rnnserve.demo import REVIEW

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TINY_CORPUS))
    labelled = synthetic_sentiment_tsv(tmp_path / "labelled.tsv", 400, seed=3)
    out = subprocess.run(
        [
            *CLI,
            "demo",
            "--data",
            str(corpus),
            "--sentiment-data",
            str(labelled),
            "--workdir",
            str(tmp_path / "w"),
            "--max-tokens",
            "40",
            "--prompt",
            "def ",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "streaming a continuation of 'def '" in out.stdout
    assert "[40 tokens, finish reason: length]" in out.stdout
    assert "live sentiment while a review is typed" in out.stdout
    live_lines = [line for line in out.stdout.splitlines() if line.startswith(("  0.", "  1."))]
    assert [line.split()[-1] for line in live_lines] == REVIEW.split()  # one reading per typed word


def test_serve_refuses_a_flush_interval_out_of_range(lm_repo: Path) -> None:
    env = {**os.environ, "RNNSERVE_GENERATE_FLUSH_MS": "5000"}  # set the way a container sets it
    out = subprocess.run(
        [*CLI, "serve", "--repo", str(lm_repo), "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--generate-flush-ms must be in [0, 1000], got 5000" in out.stderr
