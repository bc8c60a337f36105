"""Every fenced code block of README.md runs here, so the README cannot drift from the code.

How each block is handled, by its language:
- ```python: run as written in a fresh interpreter against the server the README's bash blocks started,
  with one substitution: `localhost:50051` becomes that server's loopback address.
- ```bash: each command (backslash continuations joined, comments dropped) must match a rule in `RULES`
  (README section + command pattern): run it, run it with small-size flags appended (`SMALL_FLAGS`:
  argparse keeps the last value of a repeated flag, so the README's own flags stay and only the work
  shrinks), start it as the background server, or skip it with the reason written next to it (where else
  it is covered). A command no rule knows fails the test: a new command needs a decision here.
- untagged blocks: figures (box-drawing diagrams), checked to be nothing else.
Any other language fails the test too.

The commands run in a temporary directory laid out like a fresh clone: `runs/` and `model_repo/` are
created there, `../shared/data` is the shared data sets when this machine has them, else a synthetic data
set of the same layout (SST-2's `train.tsv`/`dev.tsv`), so the sentiment commands run everywhere.
`rnnserve serve ... --port 50051` listens on a free port instead, and the client commands find it through
`RNNSERVE_URL` (their documented fallback). A server loads its model repository at start, so after an
`rnnserve export` the harness restarts it, as a user would.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import SHARED_DATA, synthetic_sentiment_tsv
from support import free_port

from rnnserve.client import Client

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_ADDRESS = "localhost:50051"

# Appended to commands that would otherwise train for minutes (CI time), keeping what the README shows.
SMALL_FLAGS = {
    "rnnserve train lm": "--max-steps 20 --max-chars 200000 --max-eval-tokens 4000 --sample 20 --no-progress "
    "--no-plot",
    "rnnserve train classifier": "--max-steps 10 --max-train-examples 1000 --threads 2 --no-progress",
    "rnnserve train dialogue": "--steps 3 --batch-size 4 --hidden 32 --emb 16 --no-progress",
}

COMPOSE_TEST = "tests/deploy/test_compose.py"


@dataclass(frozen=True)
class Rule:
    section: str  # regex on the README section (its ## heading) the block sits in
    command: str  # regex matched at the start of the command
    action: str  # "run" | "small" (run with SMALL_FLAGS) | "serve" | "venv" | "skip"
    reason: str = ""  # why it is skipped, and where it is covered instead


RULES = [
    Rule("Two commands", r"make demo\b", "skip",
         "trains for minutes (the README states the time); its steps (train lm, export, serve, generate) "
         "are the 'Using it' commands run here, and `rnnserve demo` is the same code in clients/demo.py"),
    Rule("Two commands", r"make test\b", "skip", "runs the whole suite, this test included"),
    Rule("Two commands", r"\.venv/bin/rnnserve demo --sentiment-data\b", "skip",
         "trains an LM and an SST-2 classifier for minutes; the classifier commands of 'Sentiment "
         "classifiers' are run here instead"),
    Rule("Using it", r"\. \.venv/bin/activate$", "venv"),
    Rule("Using it", r"rnnserve train (lm|classifier|dialogue)\b", "small"),
    Rule("Using it", r"rnnserve chat\b", "skip",
         "interactive (reads the terminal); tests/integration/test_dialogue_serving.py drives "
         "`rnnserve chat` through piped stdin against a real server"),
    Rule("Using it", r"rnnserve export \S+/checkpoint\.pt --repo model_repo --name \w+$", "run"),
    Rule("Using it", r"rnnserve serve --repo model_repo --port 50051$", "serve"),
    Rule("Using it", r"rnnserve (models|generate|classify)\b", "run"),
    Rule("Deploy", r"(rnnserve export|chmod -R|rnnserve auth add|RNNSERVE_MODELS=\S+ docker compose|"
         r"rnnserve generate --url localhost:50051|curl -s localhost:9464/metrics|"
         r"docker compose (stop|down))", "skip",
         f"needs Docker: {COMPOSE_TEST} runs these for real (marker `docker`), against a model repository "
         "of its own"),
]  # fmt: skip


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    section: str  # the ## heading above it

    def where(self) -> str:
        return f"README.md:{self.line} ({self.section}, {self.lang or 'untagged'} block)"


def readme_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, with the ## section each one is in."""
    blocks, section, fence = [], "", None
    lines: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if fence is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif line.startswith("```"):
                fence, lines = (line[3:].strip(), number), []
        elif line.startswith("```"):
            blocks.append(Block(fence[0], "\n".join(lines) + "\n", fence[1], section))
            fence = None
        else:
            lines.append(line)
    assert fence is None, f"README.md:{fence[1]}: unclosed code block"
    return blocks


def bash_commands(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(shlex.join(words) if words[0] != "." else " ".join(words))
    return commands


class UnknownBlock(AssertionError):
    pass


def rule_for(section: str, command: str) -> Rule:
    """The rule for a bash command in a README section; UnknownBlock when none applies."""
    for rule in RULES:
        if re.search(rule.section, section) and re.match(rule.command, command):
            return rule
    raise UnknownBlock(
        f"README section {section!r}: no rule in tests/test_readme.py knows the command {command!r}: "
        "add one (run it, shrink it, or skip it saying where else it is covered)"
    )


def check_block(block: Block) -> list[tuple[str, Rule | None]]:
    """What will be done with a block: (command or code, rule); UnknownBlock for what no rule covers."""
    if block.lang == "python":
        return [(block.code, None)]
    if block.lang == "bash":
        return [(command, rule_for(block.section, command)) for command in bash_commands(block.code)]
    if block.lang == "":
        if "──" not in block.code and "─►" not in block.code:
            raise UnknownBlock(f"{block.where()}: an untagged block that is not a figure; tag its language")
        return []
    raise UnknownBlock(f"{block.where()}: no handler for {block.lang!r} blocks in tests/test_readme.py")


def test_every_block_of_the_readme_has_a_handler() -> None:
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert {b.lang for b in blocks} >= {"bash", "python"}
    for block in blocks:
        for _, rule in check_block(block):
            if rule is not None and rule.action == "skip":
                assert rule.reason, block.where()
    assert (ROOT / COMPOSE_TEST).is_file()


def test_a_block_the_harness_does_not_know_fails() -> None:
    with pytest.raises(UnknownBlock, match="no rule"):
        check_block(
            Block("bash", "rnnserve serve --repo model_repo --port 50051 --new-flag\n", 1, "Using it")
        )
    with pytest.raises(UnknownBlock, match="no rule"):
        check_block(Block("bash", "make demo\n", 1, "Using it"))  # a rule holds in its own section only
    with pytest.raises(UnknownBlock, match="no handler"):
        check_block(Block("sh", "echo hi\n", 1, "Using it"))
    with pytest.raises(UnknownBlock, match="not a figure"):
        check_block(Block("", "rnnserve models\n", 1, "Using it"))
    assert bash_commands("a b \\\n   c  # note\n\n# only a comment\nd 'e f'\n") == ["a b c", "d 'e f'"]


@dataclass
class Walkthrough:
    """A fresh-clone-like directory, the environment the commands run in, and the server they started."""

    clone: Path
    env: dict[str, str]
    log: Path
    serve_argv: list[str] | None = None
    server: subprocess.Popen[str] | None = None
    url: str | None = None
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def run(self, argv: list[str], where: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(argv, cwd=self.clone, env=self.env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{where}: {shlex.join(argv)} exited {done.returncode}:\n{done.stderr}"
        return done

    def start_server(self, argv: list[str], where: str) -> None:
        self.serve_argv = argv
        with self.log.open("a") as log:
            self.server = subprocess.Popen(
                argv, cwd=self.clone, env=self.env, stdout=log, stderr=subprocess.STDOUT, text=True
            )
        assert self.url is not None
        with Client(self.url) as client:
            while not client.wait_ready(timeout=1.0):
                assert self.server.poll() is None, f"{where}: the server exited:\n{self.log.read_text()}"

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            self.server.wait(timeout=60)
        self.server = None


@pytest.fixture
def walkthrough(tmp_path: Path) -> Iterator[Walkthrough]:
    clone = tmp_path / "clone"
    clone.mkdir()
    data = tmp_path / "shared" / "data"
    data.parent.mkdir()
    if SHARED_DATA.is_dir():
        data.symlink_to(SHARED_DATA, target_is_directory=True)
    else:  # data sets of the same layout, so the sentiment and dialogue commands run without ../shared
        (data / "sst-2").mkdir(parents=True)
        synthetic_sentiment_tsv(data / "sst-2" / "train.tsv", 600, seed=1)
        synthetic_sentiment_tsv(data / "sst-2" / "dev.tsv", 100, seed=2)
        (data / "tiny-shakespeare").mkdir()  # and of Tiny Shakespeare's, for the dialogue commands
        speeches = [
            f"{('FIRST', 'SECOND')[i % 2]} CITIZEN:\nSpeech number {i}, my lord.\n" for i in range(200)
        ]
        (data / "tiny-shakespeare" / "input.txt").write_text("\n".join(speeches), encoding="utf-8")
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # the venv this suite runs in, as if activated
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    env["RNNSERVE_URL"] = f"127.0.0.1:{port}"  # the client commands' fallback for --url
    state = Walkthrough(clone, env, tmp_path / "server.log", url=f"127.0.0.1:{port}")
    try:
        yield state
    finally:
        state.stop_server()


@pytest.mark.slow
def test_every_readme_block_runs(walkthrough: Walkthrough) -> None:
    w = walkthrough
    assert w.url is not None
    for block in readme_blocks(README.read_text(encoding="utf-8")):
        for item, rule in check_block(block):
            if rule is None:  # a Python block, against the server started above
                assert w.server is not None, f"{block.where()}: a Python block before any server"
                code = item.replace(README_ADDRESS, w.url)
                w.run([sys.executable, "-c", code], block.where())
                w.ran.append(f"{block.where()}: python")
                continue
            if rule.action == "skip":
                w.skipped.append(f"{item}: {rule.reason}")
                continue
            if rule.action == "venv":
                continue  # the suite runs inside the venv: its bin/ is first on PATH
            started = time.monotonic()
            argv = shlex.split(item)
            if rule.action == "small":
                argv += shlex.split(next(v for k, v in SMALL_FLAGS.items() if item.startswith(k)))
            if rule.action == "serve":
                argv[argv.index("--port") + 1] = w.url.rsplit(":", 1)[1]
                w.start_server(argv, block.where())
            else:
                done = w.run(argv, block.where())
                if argv[:2] == ["rnnserve", "generate"]:
                    assert done.stdout.startswith(argv[argv.index("--prompt") + 1]), done.stdout
                if argv[:2] == ["rnnserve", "export"] and w.serve_argv is not None:
                    # The server reads its repository at start: restart it to serve the export.
                    w.stop_server()
                    w.start_server(w.serve_argv, block.where())
            w.ran.append(f"{shlex.join(argv)}  [{time.monotonic() - started:.0f} s]")
    print("ran:", *w.ran, "skipped:", *w.skipped, sep="\n  ")
    assert any(r.startswith("rnnserve generate") for r in w.ran)
    assert sum(r.endswith("python") for r in w.ran) == sum(
        b.lang == "python" for b in readme_blocks(README.read_text(encoding="utf-8"))
    )
