"""kill -9 mid-stream and mid-Generate (issue 14): a real `rnnserve serve` on a real Redis is killed
while sessions stream one token per message and generate, and started again on the same port and Redis.
The real client retries by itself; every session continues, and everything it saw (each reply's
next-token candidates, every generated token) equals an uninterrupted run of the same inputs on a
server that was never killed. Write-through loses nothing answered; write-behind loses the last
messages, which the client resends from its log.

The kill is driven by events (after the first messages went through), not by time; the client's retry
budget covers the restart (model load) on a loaded machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import free_port

from rnnserve.client import Client, RetryPolicy
from rnnserve.server.app import background_server, channel_ready
from rnnserve.server.config import ServerConfig

pytestmark = pytest.mark.redis

SESSIONS = 3
STREAM_TEXT = "def add(a, b):\n    return a + b\n" * 2  # fed one character per message
GENERATE_TOKENS = 120
PATIENT = RetryPolicy(max_attempts=80, initial_backoff_s=0.05, max_backoff_s=0.5)  # ~40 s of retries


class Server:
    """`rnnserve serve` in a subprocess, killable with SIGKILL and startable again on the same port."""

    def __init__(self, repo: Path, redis_url: str, interval_ms: int, log: Path) -> None:
        self.port = free_port()
        self.log = log  # both runs' output, shown when the test fails
        self.command = [
            sys.executable, "-m", "rnnserve", "serve", "--repo", str(repo), "--host", "127.0.0.1",
            "--port", str(self.port), "--metrics-port", "-1", "--session-store", redis_url,
            "--persist-interval-ms", str(interval_ms),
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        assert channel_ready(f"127.0.0.1:{self.port}", timeout=120), "the server did not start"

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


@pytest.fixture
def flushed_redis(redis_url: str) -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield redis_url
    client.flushdb()
    client.close()


class Pause:
    """Where a session's client stops to let the test kill the server: `reached` is set when it gets
    there, and it goes on when `resume` is set (a real client, cut off mid-call)."""

    def __init__(self) -> None:
        self.reached, self.resume = threading.Event(), threading.Event()

    def __call__(self) -> None:
        self.reached.set()
        assert self.resume.wait(180)


def workload(client: Client, pauses: list[Pause], index: int) -> list[object]:
    """What one session does: a prompt, a seeded generation, then text one character per message; what
    it saw (candidates after each message, the generated tokens) is returned for comparison. It stops at
    pauses[0] a third into the generation (mid-Generate) and at pauses[1] a third into the text
    (mid-stream)."""
    seen: list[object] = []
    with client.session("tiny") as session:
        seen.append([c.id for c in session.feed("def ").top])
        generation = session.generate(max_tokens=GENERATE_TOKENS, seed=100 + index, ignore_eos=True)
        for i, token in enumerate(generation):
            seen.append((token.id, round(token.logprob, 5), token.position))
            if i == GENERATE_TOKENS // 3:
                pauses[0]()
        for i, char in enumerate(STREAM_TEXT):
            out = session.feed(char)
            seen.append((out.position, [c.id for c in out.top]))
            if i == len(STREAM_TEXT) // 3:
                pauses[1]()
        seen.append(session.info().position)
    return seen


@pytest.mark.parametrize("interval_ms", [0, 50], ids=["write-through", "write-behind"])
def test_kill_9_mid_stream_and_mid_generate_loses_no_session(
    lm_repo: Path, flushed_redis: str, interval_ms: int, tmp_path: Path
) -> None:
    no_pause = [Pause(), Pause()]
    for pause in no_pause:
        pause.resume.set()
    with (
        background_server(ServerConfig(repo=lm_repo, port=0)) as reference_server,
        Client(f"127.0.0.1:{reference_server.port}") as client,
    ):
        expected = [workload(client, no_pause, i) for i in range(SESSIONS)]

    server = Server(lm_repo, flushed_redis, interval_ms, tmp_path / "server.log")
    server.start()
    try:
        results: list[list[object] | BaseException | None] = [None] * SESSIONS
        pauses = [[Pause(), Pause()] for _ in range(SESSIONS)]

        def run(i: int) -> None:
            try:
                with Client(f"127.0.0.1:{server.port}", retry=PATIENT, timeout=60) as client:
                    results[i] = workload(client, pauses[i], i)
            except BaseException as exc:  # reported below
                results[i] = exc
                for pause in pauses[i]:
                    pause.reached.set()

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(SESSIONS)]
        for t in threads:
            t.start()
        for stage in (0, 1):  # mid-Generate, then mid-stream
            for session_pauses in pauses:
                assert session_pauses[stage].reached.wait(180)
            server.kill()
            server.start()
            for session_pauses in pauses:
                session_pauses[stage].resume.set()
        for t in threads:
            t.join(180)
        assert not any(t.is_alive() for t in threads)
        for i, result in enumerate(results):
            assert not isinstance(result, BaseException), f"session {i}: {result!r}\n{server.log.read_text()}"
            assert result == expected[i], f"session {i} differs from the uninterrupted run"
    finally:
        server.stop()
