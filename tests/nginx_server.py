"""A real nginx (Debian's package; .ci/run installs it) on loopback in front of rnnserve replicas run as
subprocesses, for the balancer tests and bench/balancer.py.

nginx runs deploy/nginx.conf itself, the compose stack's configuration, with only its marked lines
rewritten (`render_config`): the listener (`# @listen`), the replicas (`# @replicas`), and the paths of
the pid file, the logs and the temp files. So what the tests check is what compose ships.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from support import free_port

from rnnserve.server.app import channel_ready

ROOT = Path(__file__).resolve().parents[1]
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
# A line of deploy/nginx.conf's `log_format rnnserve`.
LOG_LINE = re.compile(
    r'"POST /[\w.]+/(?P<method>\w+) [^"]*" (?P<status>\d+) session=(?P<session>\S+) '
    r"grpc_status=(?P<grpc_status>\S+) time=(?P<time>\S+) upstream=(?P<upstream>.*)$"
)


def nginx_binary() -> str | None:
    """The nginx executable, or None."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/bin/nginx") if os.access(p, os.X_OK)), None
    )


def render_config(listen: int, replicas: list[str], directory: Path, fail_timeout_s: int = 10) -> str:
    """deploy/nginx.conf for loopback: listening on 127.0.0.1:`listen`, balancing over `replicas`
    (host:port), with its pid, logs and temp files in `directory`. Fails if a marked line is missing
    (deploy/nginx.conf changed shape: update this too)."""
    text = NGINX_CONF.read_text()
    lines: list[str] = []
    replaced = {"@listen": 0, "@replicas": 0, "pid": 0, "access_log": 0, "user": 0}
    for line in text.splitlines():
        stripped = line.strip()
        indent = line[: len(line) - len(line.lstrip())]
        if stripped.endswith("# @replicas"):
            if not replaced["@replicas"]:
                lines += [f"{indent}server {r} max_fails=1 fail_timeout={fail_timeout_s}s;" for r in replicas]
            replaced["@replicas"] += 1
        elif stripped.endswith("# @listen"):
            lines.append(f"{indent}listen 127.0.0.1:{listen} http2;")
            replaced["@listen"] += 1
        elif stripped.startswith("pid "):
            lines.append(f"pid {directory / 'nginx.pid'};")
            replaced["pid"] += 1
        elif stripped.startswith("access_log "):
            lines.append(f"{indent}access_log {directory / 'access.log'} rnnserve;")
            replaced["access_log"] += 1
        elif stripped.startswith("user ") and os.geteuid() != 0:
            replaced["user"] += 1  # only root may switch users
        elif stripped == "http {":
            lines.append(line)
            for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
                lines.append(f"{indent}    {temp}_temp_path {directory / temp};")
        else:
            lines.append(line)
    missing = [k for k, n in replaced.items() if not n and k != "user"]
    assert not missing, f"deploy/nginx.conf has no line for {missing}: update tests/nginx_server.py"
    return "\n".join(lines) + "\n"


class Nginx:
    """nginx on 127.0.0.1:`port` in front of `replicas`; `log_lines()` reads its access log."""

    def __init__(self, binary: str, replicas: list[str], directory: Path, fail_timeout_s: int = 10) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.conf = directory / "nginx.conf"
        self.conf.write_text(render_config(self.port, replicas, directory, fail_timeout_s))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [self.binary, "-p", str(self.directory), "-c", str(self.conf), "-e", "stderr"]
        check = subprocess.run([*cmd, "-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"nginx -t refused the configuration:\n{check.stderr}"
        with (self.directory / "error.log").open("ab") as log:
            self.process = subprocess.Popen(
                [*cmd, "-g", "daemon off;"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        assert channel_ready(self.url, timeout=30), f"nginx did not listen: {self.error_log()}"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGQUIT)  # graceful: the access log is complete
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def log_lines(self) -> list[dict[str, str]]:
        """The access log, one dict per call: method, status, session ('-' when none), grpc_status
        (trailer/header), time, upstream (the replicas tried, comma-separated)."""
        path = self.directory / "access.log"
        calls = []
        for line in path.read_text().splitlines() if path.exists() else []:
            match = LOG_LINE.search(line)
            assert match is not None, f"an access log line of another format: {line!r}"
            calls.append(match.groupdict())
        return calls

    def __enter__(self) -> Nginx:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Replica:
    """`rnnserve serve` in a subprocess on loopback (gRPC and metrics on free ports), on a shared store."""

    def __init__(self, repo: Path, store: str, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.log = log
        self.command = [
            sys.executable, "-m", "rnnserve", "serve", "--repo", str(repo), "--host", "127.0.0.1",
            "--port", str(self.port), "--metrics-port", str(self.metrics_port), "--session-store", store,
            *extra,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def launch(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.tail()
            if channel_ready(self.address, timeout=2):
                return
        raise AssertionError(f"replica {self.address} did not start:\n{self.tail()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
