"""A real redis-server for tests (Debian's package; .ci/run installs it), and the pytest fixtures that
start one: `redis_url` (one server for the whole run) and `redis_process` (a test's own server, which it
may stop and start again on the same port to play Redis going down and coming back).

Enabled for the suite by tests/conftest.py (`pytest_plugins = ["redis_server"]`; tests/ is on sys.path).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import free_port


class RedisServer:
    """One redis-server on 127.0.0.1, without persistence, in its own temp dir."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start it (again, on the same port once it has one) and wait until it answers PING."""
        if self.running:
            return
        # A free port may be taken between choosing and binding it: choose again (only the first time:
        # a restart must keep its port, which is the point of a restart).
        for _ in range(1 if self.port else 5):
            port = self.port or free_port()
            if self._launch(port):
                self.port = port
                return
        log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server did not start on 127.0.0.1:{self.port or port}; its log:\n{log}")

    def _launch(self, port: int) -> bool:
        self._process = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log"),
             "--daemonize", "no"],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False  # e.g. the port was taken
            if _pings(port):
                return True
            time.sleep(0.02)
        self.stop()
        return False

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL if it lingers); its data goes with it (no persistence)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def redis_binary() -> str:
    """The redis-server executable, or a skip (a user's machine) / a failure (CI) saying what to do."""
    found = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.access(p, os.X_OK)), None
    )
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(
            "redis-server is not installed, but this is CI: .ci/run should have installed Debian's "
            "redis-server package (apt-get install -y redis-server) before `make test`",
            pytrace=False,
        )
    pytest.skip("needs redis-server on PATH (Debian/Ubuntu: sudo apt-get install redis-server)")


@contextmanager
def _serve(binary: str) -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix="rnnserve-redis-") as directory:
        server = RedisServer(binary, Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The URL of one redis-server shared by the whole run: use your own key prefix (or FLUSHDB)."""
    with _serve(redis_binary()) as server:
        yield server.url


@pytest.fixture
def redis_process() -> Iterator[RedisServer]:
    """A redis-server of the test's own (`.url`, `.stop()`, `.start()` again on the same port)."""
    with _serve(redis_binary()) as server:
        yield server
