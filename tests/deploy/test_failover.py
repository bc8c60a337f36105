"""Scale-out for real (issue 15): the compose `scale` profile (3 replicas, Redis, nginx with session
affinity, Prometheus) built and brought up the way README "Deploy" says; 64 sessions stream and generate
(seeded sampling) through nginx, and one replica is killed (`docker kill`, SIGKILL) mid-stream. Every
session goes on, on another replica, and everything each one saw (candidates after each feed, every
generated token) equals an uninterrupted run of the same work on the same stack before the kill.

Persistence is the compose default, write-behind (50 ms): the replica that takes a session over may
find it a little behind, and the client resends what it lost from its log (issue 14).

The pause each session saw is the longest gap between two consecutive replies across the kill; its p50
and p99 over the sessions are printed (about one ownership lease plus the retry backoff for the sessions
of the killed replica), never asserted. Everything is bounded: counts, retries, compose timeouts.

Docker is prepared as in test_compose.py (skip without it, fail under CI).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nginx_server import LOG_LINE
from support import free_port
from test_compose import Stack, docker_ready, make_stack, model_repo, prometheus_query  # noqa: F401

from rnnserve.client import AsyncClient, RetryPolicy

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1500)]

REPLICAS = ("replica-1", "replica-2", "replica-3")
VICTIM = "replica-2"
SERVICES = (*REPLICAS, "redis", "nginx", "prometheus")
SESSIONS = 64
ROUNDS = 10  # each: a seeded generation, then a feed
GATE = 3  # the kill comes once every session has done this many rounds (none has finished)
TOKENS = 12
TEXT = "    return a + b\n"
# ~60 s of retries: the victim's sessions wait for its leases to run out (5 s) after a restart-free kill.
PATIENT = RetryPolicy(max_attempts=120, initial_backoff_s=0.05, max_backoff_s=0.5)


@pytest.fixture
def scale_stack(docker_ready: None, model_repo: Path) -> Iterator[Stack]:  # noqa: F811
    """README "Deploy", scaled: `docker compose --profile scale up -d --build --wait replica-1 ...`."""
    s = make_stack(model_repo, RNNSERVE_LB_PUBLISH_PORT=str(free_port()))
    s.project += "-scale"
    t0 = time.monotonic()
    try:
        s.timed(
            "build + up --wait", "--profile", "scale", "up", "-d", "--build", "--wait",
            "--wait-timeout", "300", *SERVICES, timeout=1200,
        )  # fmt: skip
        yield s
    finally:
        logs = s.compose(
            "--profile", "scale", "logs", "--no-color", *REPLICAS, timeout=120, check=False
        ).stdout
        s.compose("--profile", "scale", "down", "-v", "--remove-orphans", timeout=300, check=False)
        s.timings["total"] = time.monotonic() - t0
        print(f"\nscale e2e timings (s): { {k: round(v, 1) for k, v in s.timings.items()} }")
        print("--- docker compose logs of the replicas (tail) ---\n" + logs[-5000:])


class Run:
    """One pass of the work over SESSIONS sessions; `kill` (if given) is called once all passed GATE."""

    def __init__(self, url: str, token: str, kill: Any = None) -> None:
        self.url = url
        self.token = token
        self.kill = kill
        self.seen: list[list[object]] = [[] for _ in range(SESSIONS)]
        self.stamps: list[list[float]] = [[] for _ in range(SESSIONS)]
        self.ids: list[str] = [""] * SESSIONS
        self.killed_at: float | None = None
        self._gate = 0
        self._gate_open = asyncio.Event()

    async def session(self, client: AsyncClient, i: int) -> None:
        seen, stamps = self.seen[i], self.stamps[i]
        async with client.session("tiny") as session:
            self.ids[i] = session.id
            out = await session.feed("def add(a, b):\n")
            seen.append([c.id for c in out.top])
            stamps.append(time.monotonic())
            for r in range(ROUNDS):
                if r == GATE:
                    self._gate += 1
                    if self._gate == SESSIONS:
                        self._gate_open.set()
                    await asyncio.wait_for(self._gate_open.wait(), 300)
                    stamps.append(time.monotonic())  # waiting at the gate is no pause: count from here
                generation = session.generate(
                    max_tokens=TOKENS,
                    temperature=0.9,
                    seed=1000 * i + r,
                    ignore_eos=True,
                    flush_interval_ms=0,
                )
                async for token in generation:
                    seen.append((token.id, token.position))
                    stamps.append(time.monotonic())
                for char in TEXT[r % 4 :: 4]:  # a few one-character messages on the open Stream
                    out = await session.feed(char)
                    seen.append((out.position, [c.id for c in out.top]))
                    stamps.append(time.monotonic())
            seen.append((await session.info()).position)

    async def killer(self) -> None:
        await asyncio.wait_for(self._gate_open.wait(), 300)
        await asyncio.sleep(0.5)  # the sessions are streaming and generating again
        self.killed_at = time.monotonic()
        await asyncio.to_thread(self.kill)

    async def main(self) -> None:
        async with AsyncClient(self.url, timeout=30, retry=PATIENT, token=self.token) as client:
            work = [self.session(client, i) for i in range(SESSIONS)]
            await asyncio.wait_for(asyncio.gather(*work, *([self.killer()] if self.kill else [])), 600)

    def pauses(self) -> list[float]:
        """Per session: the longest gap between consecutive replies (or the gate and the next reply)."""
        return [max(b - a for a, b in itertools.pairwise(s)) for s in self.stamps]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def container_ip(stack: Stack, service: str) -> str:
    container = stack.compose("--profile", "scale", "ps", "-q", service).stdout.strip()
    done = subprocess.run(["docker", "inspect", container], capture_output=True, text=True, check=True)
    networks = json.loads(done.stdout)[0]["NetworkSettings"]["Networks"]
    return str(next(iter(networks.values()))["IPAddress"])


def test_kill_a_replica_mid_stream_behind_nginx(scale_stack: Stack) -> None:
    s = scale_stack
    url = f"127.0.0.1:{s.env['RNNSERVE_LB_PUBLISH_PORT']}"

    # Prometheus scrapes every replica (they share the network alias `rnnserve`).
    deadline = time.monotonic() + 60
    while len(up := prometheus_query(s.prometheus_port, 'up{job="rnnserve"} == 1')) < 3:
        assert time.monotonic() < deadline, up
        time.sleep(2)
    assert len(up) == 3, up

    reference = Run(url, s.token)
    asyncio.run(reference.main())

    victim = s.compose("--profile", "scale", "ps", "-q", VICTIM).stdout.strip()
    victim_ip = container_ip(s, VICTIM)
    run = Run(url, s.token, kill=lambda: subprocess.run(["docker", "kill", victim], check=True, timeout=60))
    t0 = time.monotonic()
    asyncio.run(run.main())
    s.timings["work with the kill"] = time.monotonic() - t0
    state = json.loads(subprocess.run(["docker", "inspect", victim], capture_output=True, text=True).stdout)
    assert state[0]["State"]["ExitCode"] == 137, state[0]["State"]  # it really was SIGKILLed

    # Nothing lost: every session saw exactly what the uninterrupted run saw.
    for i in range(SESSIONS):
        assert run.seen[i] == reference.seen[i], f"session {i} differs after the kill"
    assert len(run.seen[0]) == len(reference.seen[0]) > ROUNDS * TOKENS

    # Which sessions lived on the victim: nginx's access log says where their calls went before the kill.
    log = s.compose("--profile", "scale", "logs", "--no-color", "--no-log-prefix", "nginx").stdout
    routed = [m.groupdict() for line in log.splitlines() if (m := LOG_LINE.search(line))]
    ids = set(run.ids)
    on_victim = {
        c["session"] for c in routed if c["session"] in ids and c["upstream"] == f"{victim_ip}:50051"
    }
    assert on_victim, "the victim held none of the sessions"
    moved = [p for i, p in enumerate(run.pauses()) if run.ids[i] in on_victim]
    stayed = [p for i, p in enumerate(run.pauses()) if run.ids[i] not in on_victim]
    everyone = run.pauses()
    print(
        f"\nfailover: {len(on_victim)}/{SESSIONS} sessions were on {VICTIM}; longest gap between replies "
        f"per session, all: p50 {percentile(everyone, 0.5):.2f} s p99 {percentile(everyone, 0.99):.2f} s; "
        f"moved: p50 {percentile(moved, 0.5):.2f} s p99 {percentile(moved, 0.99):.2f} s; "
        f"others: p50 {percentile(stayed, 0.5):.2f} s p99 {percentile(stayed, 0.99):.2f} s "
        f"(uninterrupted run: p99 {percentile(reference.pauses(), 0.99):.2f} s); "
        f"{sum(len(x) for x in run.seen)} replies compared, none lost or different"
    )
