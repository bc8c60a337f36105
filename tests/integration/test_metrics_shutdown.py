"""Prometheus metrics count real traffic, and shutdown drains: in-process servers and a `rnnserve serve`
subprocess configured by environment variables alone (as in the container), stopped with SIGTERM.

The in-process tests wait for what they check through hooks in the server (the sweeper reporting an
eviction, the drain reporting that it began or cut its calls, model runs held in the ORT worker until
the test lets them go), never for a time to pass, so the outcome does not depend on machine speed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import HeldRuns, free_port, scrape, value

from rnnserve.client import Client
from rnnserve.client.errors import NotFoundError, UnavailableError
from rnnserve.server.app import RnnServeServer, background_server
from rnnserve.server.config import ServerConfig
from rnnserve.server.errors import SHUTTING_DOWN


def health(url: str) -> int:
    with grpc.insecure_channel(url) as channel:
        request = health_pb2.HealthCheckRequest(service="rnnserve.v1.RnnServe")
        return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=30).status)


@pytest.fixture(scope="module")
def tiny_repo(lm_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with only the `tiny` LM (fast to load)."""
    repo = tmp_path_factory.mktemp("tiny-only")
    shutil.copytree(lm_repo / "tiny", repo / "tiny")
    return repo


@pytest.fixture
def metered(tiny_repo: Path) -> Iterator[RnnServeServer]:
    config = ServerConfig(repo=tiny_repo, host="127.0.0.1", port=0, metrics_port=0)
    with background_server(config) as server:
        yield server


def test_metrics_count_the_traffic(metered: RnnServeServer) -> None:
    before = scrape(metered.metrics_port)
    with Client(f"127.0.0.1:{metered.port}") as client:
        with client.session("tiny") as session:
            session.feed("def add(")  # 8 chars: 8 tokens in
            session.feed([1, 2, 3])
            generated = list(session.generate("a", max_tokens=12, ignore_eos=True, seed=1))
        with pytest.raises(NotFoundError):
            client.session("nope")
    # A call is counted when its handler ends, which may be just after its client saw the status (an
    # error, or a Stream the client cancelled): wait until the server has no call in flight.
    assert metered.loop is not None
    idle = asyncio.run_coroutine_threadsafe(metered.calls.wait_finished(60), metered.loop)
    assert idle.result(timeout=90), "calls still in flight on the server"
    after = scrape(metered.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    svc = {"service": "rnnserve.v1.RnnServe"}
    assert delta("rnnserve_requests_total", **svc, method="CreateSession", code="OK") == 1
    assert delta("rnnserve_requests_total", **svc, method="CreateSession", code="NOT_FOUND") == 1
    assert delta("rnnserve_request_errors_total", **svc, method="CreateSession", code="NOT_FOUND") == 1
    assert delta("rnnserve_request_errors_total", **svc, method="CreateSession", code="OK") == 0
    assert delta("rnnserve_requests_total", **svc, method="Generate", code="OK") == 1
    assert delta("rnnserve_requests_total", **svc, method="CloseSession", code="OK") == 1
    # The client half-closes its Stream (then cancels it) when the session closes.
    streams = [delta("rnnserve_requests_total", **svc, method="Stream", code=c) for c in ("OK", "CANCELLED")]
    assert sum(streams) == 1
    assert delta("rnnserve_tokens_in_total", model="tiny@1") == 8 + 3 + 1  # two feeds and the prompt
    assert len(generated) == 12
    assert delta("rnnserve_tokens_out_total", model="tiny@1") == 12
    assert delta("rnnserve_sessions_created_total", model="tiny@1") == 1
    assert delta("rnnserve_sessions_active", model="tiny@1") == 0  # opened, then closed
    # 2 feeds + prompt, then the 12 sampled tokens (no top-k/top-p cut, so K-step blocks of the plain
    # generation graph, K=8): a block applying tokens 1-8, one applying 9-16 that ends at 12, and the
    # replay of 9-12 from that block's start state = 6 model runs of batch 1, each waited in the queue.
    runs = 3 + 2 + 1
    assert delta("rnnserve_batch_size_count", model="tiny@1") == runs
    assert delta("rnnserve_batch_size_sum", model="tiny@1") == runs
    assert delta("rnnserve_queue_wait_seconds_count", model="tiny@1") == runs
    assert delta("rnnserve_step_latency_seconds_count", model="tiny@1") == runs
    assert delta("rnnserve_step_latency_seconds_sum", model="tiny@1") > 0
    assert value(after, "rnnserve_model_loaded", model="tiny@1", provider="CPUExecutionProvider") == 1
    assert value(after, "rnnserve_draining") == 0


def test_expired_sessions_count_as_evicted(tiny_repo: Path) -> None:
    """The server's own sweeper drops a session idle past its TTL, and counts it as evicted."""
    config = ServerConfig(repo=tiny_repo, port=0, metrics_port=0, session_ttl_s=0.2)
    with background_server(config) as server:
        store = server.engine.sessions
        swept, dropped = threading.Event(), []
        expire = store.expire

        def reporting(now: float | None = None) -> list[str]:  # what the sweeper calls, on the server's loop
            expired = expire(now)
            if expired:
                dropped.append(len(expired))
                swept.set()
            return expired

        store.expire = reporting  # type: ignore[method-assign]
        before = scrape(server.metrics_port)
        with Client(f"127.0.0.1:{server.port}", timeout=60) as client:
            idle = client.session("tiny")  # the server's default TTL: 0.2 s
            assert swept.wait(60), "the sweeper never dropped the idle session"
            with pytest.raises(NotFoundError):
                idle.info()
            client.session("tiny", ttl_seconds=600)  # still open when the metrics are read
        after = scrape(server.metrics_port)
    assert dropped == [1]
    labels = {"model": "tiny@1", "reason": "idle_ttl"}
    assert (
        value(after, "rnnserve_sessions_evicted_total", **labels)
        - value(before, "rnnserve_sessions_evicted_total", **labels)
        == 1
    )
    assert (
        value(after, "rnnserve_sessions_active", model="tiny@1")
        - value(before, "rnnserve_sessions_active", model="tiny@1")
        == 1
    )


def test_a_metrics_port_in_use_is_fatal_only_when_asked_for(tiny_repo: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        config = ServerConfig(repo=tiny_repo, port=0, metrics_port=busy, metrics_required=False)
        with background_server(config) as server:  # the CLI's default port: skipped with a warning
            assert server.metrics_port == 0 and health(f"127.0.0.1:{server.port}") == 1  # SERVING
        explicit = ServerConfig(repo=tiny_repo, port=0, metrics_port=busy)  # asked for: must bind
        with (
            pytest.raises(OSError, match=f"could not serve metrics on 127.0.0.1:{busy}"),
            background_server(explicit),
        ):
            pass


@pytest.fixture
def drainable(tiny_repo: Path) -> Iterator[RnnServeServer]:
    """A server whose model runs all go to the ORT worker thread (inline_max_tokens=0), where a test
    can hold them (see HeldRuns) without holding the event loop."""
    config = ServerConfig(repo=tiny_repo, host="127.0.0.1", port=0, metrics_port=0, inline_max_tokens=0)
    with background_server(config) as server:
        yield server


def reporting(obj: Any, method: str, before: Callable[[], None] | None = None) -> threading.Event:
    """Wrap obj.method (an instance attribute from now on): the event is set once it has been called
    (after calling `before`, then the method)."""
    called = threading.Event()
    real = getattr(obj, method)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before()
        try:
            return real(*args, **kwargs)
        finally:
            called.set()

    setattr(obj, method, wrapper)
    return called


class Generation(threading.Thread):
    """A Generate call consumed in a thread; `.first` is set at the first token."""

    def __init__(self, client: Client, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.session = client.session("tiny")
        self.max_tokens = max_tokens
        self.first = threading.Event()
        self.tokens: list[Any] = []
        self.error: Exception | None = None
        self.finish_reason: str | None = None

    def run(self) -> None:
        stream = self.session.generate("d", max_tokens=self.max_tokens, ignore_eos=True, seed=2)
        try:
            for token in stream:
                self.tokens.append(token)
                self.first.set()
            self.finish_reason = stream.finish_reason
        except Exception as exc:
            self.error = exc
        finally:
            self.first.set()


def test_drain_finishes_calls_in_flight_and_refuses_new_work(drainable: RnnServeServer) -> None:
    """A Generate is in flight (its next model run held) when the server drains: health turns
    NOT_SERVING, new work and the idle stream are refused, lookups answered; once its runs go on, the
    Generate runs to its end and the drain ends with it, well inside the grace period."""
    server = drainable
    drain_began = reporting(server.calls, "begin_drain")
    calls_cut = reporting(server.calls, "cancel_all")  # only when the grace period runs out
    url = f"127.0.0.1:{server.port}"
    assert server.loop is not None
    with Client(url, timeout=60) as client:
        idle = client.session("tiny")
        idle.feed("x")  # its Stream stays open, waiting for the next message
        with HeldRuns(server, start=3) as runs:  # the prompt and a first run of tokens; the next waits
            generation = Generation(client, max_tokens=60)
            generation.start()
            assert runs.held.wait(60) and generation.first.wait(60)

            stopping = asyncio.run_coroutine_threadsafe(server.stop(grace=60), server.loop)
            assert drain_began.wait(60), "the drain never began"
            assert health(url) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(UnavailableError, match=SHUTTING_DOWN):
                client.session("tiny")
            with pytest.raises(UnavailableError, match=SHUTTING_DOWN):
                idle.feed("y")  # the idle stream was ended by the drain
            assert idle.info().position == 1  # lookups still work while draining
            assert metrics_of(server)["draining"] == 1
            assert generation.is_alive() and not stopping.done()  # the drain waits for the Generate

            runs.release()
            stopping.result(timeout=120)  # (a guard against a hang: the Generate needs ~50 tiny runs)
        generation.join(timeout=60)
    assert generation.error is None
    assert len(generation.tokens) == 60 and generation.finish_reason == "length"  # it ran to its end
    assert not calls_cut.is_set()  # the drain ended with its last call, not at the grace period's end


def metrics_of(server: RnnServeServer) -> dict[str, float]:
    samples = scrape(server.metrics_port)
    return {"draining": value(samples, "rnnserve_draining")}


def test_grace_period_ends_what_is_left_with_unavailable(drainable: RnnServeServer) -> None:
    """A Generate whose model run is held past the grace period is ended with UNAVAILABLE when the
    period runs out (its held run is let go at that moment, so it can end)."""
    server = drainable
    with Client(f"127.0.0.1:{server.port}", timeout=60) as client, HeldRuns(server, start=10) as runs:
        calls_cut = reporting(server.calls, "cancel_all", before=runs.release)
        generation = Generation(client, max_tokens=500)
        generation.start()
        assert runs.held.wait(60) and generation.first.wait(60)
        assert server.loop is not None
        # The drain waits out grace - margin (min(1 s, grace / 4)), then cuts what is left; the margin
        # is for the cut calls to end (here: the held run, released when they are cut, and its hand-over).
        asyncio.run_coroutine_threadsafe(server.stop(grace=4.0), server.loop).result(120)
        generation.join(timeout=60)
    assert calls_cut.is_set()
    assert isinstance(generation.error, UnavailableError), generation.error
    assert SHUTTING_DOWN in str(generation.error)
    assert 0 < len(generation.tokens) < 500


def test_serve_configured_by_environment_drains_on_sigterm(tiny_repo: Path) -> None:
    """`rnnserve serve` with no flags, configured like the container; SIGTERM mid-generation exits 0."""
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "RNNSERVE_REPO": str(tiny_repo),
        "RNNSERVE_HOST": "127.0.0.1",
        "RNNSERVE_PORT": str(port),
        "RNNSERVE_METRICS_PORT": str(metrics_port),
        "RNNSERVE_GRACE": "15",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "rnnserve", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"127.0.0.1:{port}"
        with Client(url, timeout=10) as client:
            assert client.wait_ready(timeout=60), "server did not come up"
            health_cmd = [sys.executable, "-m", "rnnserve", "health"]
            ok = subprocess.run(health_cmd, env=env, capture_output=True, text=True)
            assert ok.returncode == 0 and "SERVING" in ok.stdout, ok
            with client.session("tiny") as session:
                session.feed("class ")
                assert len(list(session.generate(max_tokens=5, ignore_eos=True))) == 5
            samples = scrape(metrics_port)  # a fresh process: exact counts
            assert value(samples, "rnnserve_tokens_in_total", model="tiny@1") == 6
            assert value(samples, "rnnserve_tokens_out_total", model="tiny@1") == 5
            assert value(samples, "rnnserve_sessions_active", model="tiny@1") == 0
            ok_labels = {"service": "rnnserve.v1.RnnServe", "code": "OK"}
            assert value(samples, "rnnserve_requests_total", method="Generate", **ok_labels) == 1
            # The health check above asked the standard health service: counted too.
            health_labels = {"service": "grpc.health.v1.Health", "method": "Check", "code": "OK"}
            assert value(samples, "rnnserve_requests_total", **health_labels) >= 1

            generation = Generation(client, max_tokens=4000)
            generation.start()
            assert generation.first.wait(60)
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
            generation.join(timeout=10)
            down = subprocess.run(health_cmd, env=env, capture_output=True, text=True)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "draining" in out and "stopped" in out, out
    # The generation either ran to its end inside the grace period or was ended with UNAVAILABLE.
    assert generation.finish_reason == "length" or isinstance(generation.error, UnavailableError), out
    assert down.returncode == 1  # nothing answers any more
