"""The docker-compose deployment for real: build the CPU server image, bring the stack up the way README
"Deploy" says, talk to it through the published port with the Python client, read the metrics (from the
server and through Prometheus), then `docker compose stop` and check the drain. `down -v` at the end,
whatever happened.

Docker is prepared with ../shared/tools/docker-local.sh where it exists (as root: it starts dockerd and
provides Compose v2 and the base images); elsewhere a working `docker compose` is used as it is.
Without either the tests skip, saying why, except under CI (CI=true), where they fail instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import free_port, scrape, value

from rnnserve.client import Client
from rnnserve.client.errors import NotFoundError, UnavailableError
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
DOCKER_LOCAL = ROOT.parent / "shared" / "tools" / "docker-local.sh"
SHUTTING_DOWN = "server is shutting down; retry on another replica"
SERVICE = "rnnserve.v1.RnnServe"


def _ok(*cmd: str) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _docker_unavailable() -> str | None:
    """None when `docker compose` works (after docker-local.sh where it exists), else why not."""
    if DOCKER_LOCAL.is_file():
        if os.geteuid() != 0:
            if not _ok("docker", "info"):
                return f"{DOCKER_LOCAL} must run as root to start dockerd (and docker does not answer)"
        else:
            done = subprocess.run(["bash", str(DOCKER_LOCAL)], capture_output=True, text=True, timeout=1200)
            if done.returncode != 0:
                return f"{DOCKER_LOCAL} failed ({done.returncode}): {done.stderr[-2000:]}"
    elif shutil.which("docker") is None:
        return "no docker here, and no ../shared/tools/docker-local.sh to install one"
    if not _ok("docker", "info"):
        return "the Docker engine does not answer (`docker info` fails)"
    if not _ok("docker", "compose", "version"):
        return "Compose v2 (`docker compose`) is missing"
    return None


@pytest.fixture(scope="module")
def docker_ready() -> None:
    reason = _docker_unavailable()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the docker tests: {reason}")
    pytest.skip(reason)


@dataclass
class Stack:
    """One compose project of the repository's docker-compose.yml, on free host ports."""

    project: str
    env: dict[str, str]
    port: int
    metrics_port: int
    prometheus_port: int
    token: str  # the stack's bearer token (the compose stack has authentication on)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cmd(self, *args: str) -> list[str]:
        return ["docker", "compose", "--project-directory", str(ROOT), "-p", self.project, *args]

    def compose(
        self, *args: str, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = self.cmd(*args)
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    def timed(self, step: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        t0 = time.monotonic()
        done = self.compose(*args, timeout=timeout)
        self.timings[step] = time.monotonic() - t0
        return done


def token_file(token: str) -> Path:
    """A token file (README "Deploy": `rnnserve auth add`) holding `token`'s hash, readable by the
    container's user."""
    directory = Path(tempfile.mkdtemp(prefix="rnnserve-tokens-"))
    path = directory / "tokens.toml"
    digest = hashlib.sha256(token.encode()).hexdigest()
    path.write_text(f'[[token]]\nname = "e2e"\nsha256 = "{digest}"\nmodels = ["*"]\n')
    directory.chmod(0o755)
    path.chmod(0o644)
    return path


def make_stack(models: str | Path, **env: str) -> Stack:
    port, metrics_port, prometheus_port = free_port(), free_port(), free_port()
    token = "rns_" + secrets.token_hex(16)
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")},
        "RNNSERVE_MODELS": str(models),
        "RNNSERVE_PUBLISH_PORT": str(port),
        "RNNSERVE_PUBLISH_METRICS_PORT": str(metrics_port),
        "PROMETHEUS_PUBLISH_PORT": str(prometheus_port),
        "RNNSERVE_HEALTHCHECK_INTERVAL": "2s",  # so `--wait` returns soon after the server is up
        "RNNSERVE_TOKENS": str(token_file(token)),
        "RNNSERVE_TOKEN": token,  # for the `rnnserve` commands run with this environment
        **env,
    }
    return Stack(f"rnnserve-e2e-{os.getpid()}", environment, port, metrics_port, prometheus_port, token)


@pytest.fixture(scope="module")
def model_repo(lm_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository exported on the host (the `tiny` LM), readable by the container's user:
    `rnnserve export CHECKPOINT --repo REPO --name tiny; chmod -R a+rX REPO`, as README "Deploy" says.
    """
    repo = tmp_path_factory.mktemp("compose-models")
    checkpoint = lm_repo.parent / "run" / "checkpoint.pt"  # where the `lm_repo` fixture trained it
    if checkpoint.is_file():
        cli = [sys.executable, "-m", "rnnserve", "export", str(checkpoint)]
        subprocess.run([*cli, "--repo", str(repo), "--name", "tiny"], check=True, capture_output=True)
    else:
        shutil.copytree(lm_repo / "tiny", repo / "tiny")
    for path in [repo, *repo.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return repo


@pytest.fixture
def stack(docker_ready: None, model_repo: Path) -> Iterator[Stack]:
    """README "Deploy" with a host directory: `RNNSERVE_MODELS=... docker compose up -d --build --wait`."""
    s = make_stack(model_repo)
    t0 = time.monotonic()
    try:
        s.timed("build + up --wait", "up", "-d", "--build", "--wait", "--wait-timeout", "180")
        yield s
    finally:
        logs = s.compose("logs", "--no-color", timeout=120, check=False).stdout
        s.compose("down", "-v", "--remove-orphans", timeout=300, check=False)
        s.timings["total"] = time.monotonic() - t0
        print(f"\ncompose e2e timings (s): { {k: round(v, 1) for k, v in s.timings.items()} }")
        print("--- docker compose logs (tail) ---\n" + logs[-6000:])


def prometheus_query(port: int, query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def health_status(url: str) -> str:
    with grpc.insecure_channel(url) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=2
            )
        except grpc.RpcError as error:
            return f"error {error.code().name}"  # type: ignore[attr-defined]
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


class Generation(threading.Thread):
    """A long Generate read in a thread over its own channel with a small HTTP/2 window: it reads the
    first message (`.started`), then nothing until `.proceed` is set, so the server cannot finish the
    generation meanwhile (it makes at most a window's worth of messages, then waits): the call is
    certainly in flight while the drain is checked, however fast the machine."""

    def __init__(self, client: Client, url: str, max_tokens: int, token: str) -> None:
        super().__init__(daemon=True)
        self.session = client.session("tiny")
        self.url = url
        self.metadata = (("authorization", f"Bearer {token}"),)  # the session's owner: the stack's token
        self.max_tokens = max_tokens
        self.started = threading.Event()
        self.proceed = threading.Event()
        self.count = 0
        self.finish_reason: int | None = None
        self.error: grpc.RpcError | None = None

    def run(self) -> None:
        options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
        request = pb.GenerateRequest(
            session_id=self.session.id,
            prompt_text="d",
            max_tokens=self.max_tokens,
            ignore_eos=True,
            max_tokens_per_message=1,  # many small messages: the window fills after a few dozen
        )
        with grpc.insecure_channel(self.url, options=options) as channel:
            try:
                stub = pb_grpc.RnnServeStub(channel)
                for message in stub.Generate(request, timeout=120, metadata=self.metadata):
                    self.count += len(message.token_ids)
                    self.finish_reason = message.finish_reason
                    if not self.started.is_set():
                        self.started.set()
                        assert self.proceed.wait(120), "the test never let the generation go on"
            except grpc.RpcError as exc:
                self.error = exc
            finally:
                self.started.set()


def test_compose_stack_serves_counts_and_drains(stack: Stack) -> None:
    # -- traffic through the published port, with the real client ------------------------------------
    with Client(stack.url, timeout=30, token=stack.token) as client:
        assert [m.name for m in client.models()] == ["tiny"]
        with client.session("tiny") as session:
            out = session.feed("def add(a, b):\n")  # 15 chars
            assert out.position == 15 and out.top
            tokens = list(session.generate("    ret", max_tokens=20, ignore_eos=True, seed=1))  # 7 + 20
            assert len(tokens) == 20 and tokens[-1].finish_reason == "length"
        with pytest.raises(NotFoundError):
            client.session("nope")

    # -- the server's own metrics counted exactly that ---------------------------------------------------
    m = scrape(stack.metrics_port)
    assert value(m, "rnnserve_tokens_in_total", model="tiny@1") == 15 + 7
    assert value(m, "rnnserve_tokens_out_total", model="tiny@1") == 20
    assert value(m, "rnnserve_requests_total", service=SERVICE, method="CreateSession", code="OK") == 1
    assert value(m, "rnnserve_requests_total", service=SERVICE, method="Generate", code="OK") == 1
    not_found = {"service": SERVICE, "method": "CreateSession", "code": "NOT_FOUND"}
    assert value(m, "rnnserve_request_errors_total", **not_found) == 1
    assert value(m, "rnnserve_sessions_created_total", model="tiny@1") == 1
    assert value(m, "rnnserve_sessions_active", model="tiny@1") == 0
    # feed, prompt, then 20 tokens in K=8 blocks of the plain generation graph (the CPU default): blocks
    # applying 1-8, 9-16 and 17-24 (which ends at 20), and the replay of 17-20 from that block's start
    runs = 1 + 1 + 3 + 1
    assert value(m, "rnnserve_batch_size_count", model="tiny@1") == runs
    assert value(m, "rnnserve_queue_wait_seconds_count", model="tiny@1") == runs
    assert value(m, "rnnserve_step_latency_seconds_count", model="tiny@1") == runs
    assert value(m, "rnnserve_model_loaded", model="tiny@1", provider="CPUExecutionProvider") == 1
    # Docker's health check asked the gRPC health service (not a TCP poke).
    health_ok = {"service": "grpc.health.v1.Health", "method": "Check", "code": "OK"}
    assert value(m, "rnnserve_requests_total", **health_ok) >= 1
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10).read()
    lint = subprocess.run(
        stack.cmd("exec", "-T", "prometheus", "promtool", "check", "metrics"),
        input=text,
        env=stack.env,
        capture_output=True,
        timeout=60,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr  # Prometheus' own linter accepts the names

    # -- Prometheus scraped the server (found through the `rnnserve` DNS alias) --------------------------
    deadline = time.monotonic() + 60
    while True:
        scraped = prometheus_query(stack.prometheus_port, 'sum(rnnserve_tokens_out_total{job="rnnserve"})')
        if scraped and float(scraped[0]["value"][1]) == 20:
            break
        assert time.monotonic() < deadline, f"Prometheus never scraped the traffic: {scraped}"
        time.sleep(1)
    up = prometheus_query(stack.prometheus_port, 'up{job="rnnserve"}')
    assert [float(r["value"][1]) for r in up] == [1.0]

    # -- `docker compose stop`: SIGTERM, drain, exit 0 ------------------------------------------------
    with Client(stack.url, timeout=30, token=stack.token) as client:
        idle = client.session("tiny")
        idle.feed("x")  # a Stream left open, waiting for its next message
        generations = [Generation(client, stack.url, 4096, stack.token) for _ in range(4)]
        for g in generations:
            g.start()
        assert all(g.started.wait(30) for g in generations)

        t0 = time.monotonic()
        stopping = subprocess.Popen(
            stack.cmd("stop", "server"),
            env=stack.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seen = []
        while (status := health_status(stack.url)) == "SERVING":
            assert time.monotonic() - t0 < 30, "health never left SERVING"
            time.sleep(0.02)
        seen.append(status)
        during = [g.is_alive() for g in generations]
        with pytest.raises(UnavailableError, match=SHUTTING_DOWN):
            client.session("tiny")  # new sessions are refused while the drain runs
        with pytest.raises(UnavailableError, match=SHUTTING_DOWN):
            idle.feed("y")  # the idle stream was ended with a clear status
        for g in generations:
            g.proceed.set()  # their readers go on: the drain waits for them to end
        out, _ = stopping.communicate(timeout=60)
        stack.timings["compose stop"] = time.monotonic() - t0
        for g in generations:
            g.join(timeout=30)

    assert stopping.returncode == 0, out
    assert seen == ["NOT_SERVING"]
    assert all(during), "a generation ended before the drain was checked"
    for g in generations:  # calls in flight finished: every generation ran to its end
        assert g.error is None and g.finish_reason == pb.FINISH_REASON_LENGTH and g.count == 4096, (
            g.error,
            g.count,
        )
    # Exit code 0: the server exited by itself (Docker's kill at stop_grace_period would give 137); how long
    # the drain took depends on the machine and is only reported (stack.timings).
    assert exit_code(stack.compose("ps", "-a", "-q", "server").stdout.strip()) == 0
    logs = stack.compose("logs", "--no-color", "server").stdout
    assert "draining (grace 20s)" in logs and "stopped;" in logs, logs[-3000:]


def exit_code(container: str) -> int:
    done = subprocess.run(["docker", "inspect", container], capture_output=True, text=True, check=True)
    return int(json.loads(done.stdout)[0]["State"]["ExitCode"])


TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu/torch/"


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


def _cpu_torch_wheel() -> Path | None:
    """A local CPU build of torch for the trainer image (this machine's pip find-links), if any."""
    dirs = [Path(d) for d in os.environ.get("PIP_FIND_LINKS", "").split()] + [Path("/opt/wheels")]
    for d in dirs:
        found = sorted(d.glob("torch-2.13.0+cpu-cp311-*.whl")) if d.is_dir() else []
        if found:
            return found[0]
    return None


def test_trainer_profile_trains_into_the_volume_then_serves(docker_ready: None) -> None:
    """README "Deploy", training inside compose: `docker compose --profile train up -d --build --wait`."""
    wheel = _cpu_torch_wheel()
    target = ROOT / "docker" / "wheels" / (wheel.name if wheel else "none")
    local = wheel is not None or any((ROOT / "docker" / "wheels").glob("torch-*+cpu-*.whl"))
    if not local and not _reachable(TORCH_CPU_INDEX):
        pytest.skip(f"no CPU torch wheel here for the trainer image, and {TORCH_CPU_INDEX} is out of reach")
    if wheel is not None and not target.exists():
        try:
            os.link(wheel, target)
        except OSError:
            shutil.copy(wheel, target)
    s = make_stack(
        "models",  # the named volume
        RNNSERVE_MODEL_NAME="py",
        RNNSERVE_TRAIN_ARGS="--layers 1 --hidden 32 --emb 16 --epochs 1 --max-steps-per-epoch 20 "
        "--max-chars 20000 --sample 0",
    )
    s.project += "-train"
    t0 = time.monotonic()
    try:
        s.timed("trainer: build + up --wait", "--profile", "train", "up", "-d", "--build", "--wait")
        with Client(s.url, timeout=30, token=s.token) as client, client.session("py") as session:
            assert len(list(session.generate("def ", max_tokens=10, ignore_eos=True))) == 10
        assert exit_code(s.compose("--profile", "train", "ps", "-a", "-q", "trainer").stdout.strip()) == 0
        image = subprocess.run(
            ["docker", "run", "--rm", "--entrypoint", "python", "rnnserve-trainer:latest", "-c",
             "import torch; print(torch.__version__, torch.version.cuda)"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert image.stdout.split() == ["2.13.0+cpu", "None"], image
    finally:
        logs = s.compose("--profile", "train", "logs", "--no-color", timeout=120, check=False).stdout
        s.compose("--profile", "train", "down", "-v", "--remove-orphans", timeout=300, check=False)
        s.timings["total"] = time.monotonic() - t0
        print(f"\ntrainer e2e timings (s): { {k: round(v, 1) for k, v in s.timings.items()} }")
        print("--- docker compose logs (tail) ---\n" + logs[-6000:])
