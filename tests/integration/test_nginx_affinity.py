"""Session affinity through a real nginx (Debian's package, running deploy/nginx.conf itself) in front of
three real `rnnserve serve` replicas that share a real Redis.

Every call on a session carries `x-rnnserve-session` (the clients send it) and nginx hashes it: all of
a session's calls land on one replica, while CreateSession (no header) is spread over the replicas. The
nginx access log says where each call went; each replica's own metrics agree with it.

Then one replica is killed (SIGKILL): the sessions it held continue on the others (through Redis),
and nginx sends them and new sessions to the live replicas.

Skipped, saying why, without nginx (`apt-get install -y nginx`); under CI (CI=true) that is a failure.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from nginx_server import Nginx, Replica, nginx_binary
from support import scrape, value, wait_for

from rnnserve.client import Client, RetryPolicy

pytestmark = [pytest.mark.redis, pytest.mark.timeout(600)]

REPLICAS = 3
SESSIONS = 30  # a replica gets no CreateSession with probability 3 * (2/3)**30 ~ 2e-5
SERVICE = "rnnserve.v1.RnnServe"
SESSION_METHODS = {"Stream", "Generate", "GetSession", "ExportSession", "CloseSession"}
# Patient: a session created on one replica and first used on another may wait for the first one's
# ownership lease to end (the server's --owner-lease-s), and a dead replica's sessions wait for theirs.
PATIENT = RetryPolicy(max_attempts=60, initial_backoff_s=0.05, max_backoff_s=0.5)


@pytest.fixture(scope="module")
def nginx() -> str:
    found = nginx_binary()
    if found:
        return found
    why = "needs nginx (Debian/Ubuntu: apt-get install -y nginx; the test runs it on loopback)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}, but this is CI: .ci/run should install it", pytrace=False)
    pytest.skip(why)


@pytest.fixture
def cluster(nginx: str, lm_repo: Path, redis_url: str) -> Iterator[tuple[Nginx, list[Replica]]]:
    import redis

    store = redis.Redis.from_url(redis_url)
    store.flushdb()
    with tempfile.TemporaryDirectory(prefix="rnnserve-nginx-") as tmp:
        directory = Path(tmp)
        replicas = [
            Replica(lm_repo, redis_url, directory / f"replica-{i}.log", "--persist-interval-ms", "0")
            for i in range(REPLICAS)
        ]
        balancer = Nginx(nginx, [r.address for r in replicas], directory)
        try:
            for r in replicas:
                r.launch()
            for r in replicas:
                r.wait_ready()
            balancer.start()
            yield balancer, replicas
        except BaseException:
            for r in replicas:
                print(f"--- {r.address} ---\n{r.tail()}")
            print(f"--- nginx ---\n{balancer.error_log()}")
            raise
        finally:
            balancer.stop()
            for r in replicas:
                r.stop()
            store.flushdb()
            store.close()


def use(client: Client, n: int) -> list[str]:
    """n sessions, each making every kind of session call; returns their ids."""
    ids = []
    for i in range(n):
        with client.session("tiny") as session:
            session.feed("def ")
            session.feed("add(a, b):")
            assert len(list(session.generate(max_tokens=4, ignore_eos=True, seed=i))) == 4
            session.info()
            session.export()
            ids.append(session.id)
    return ids


def test_every_call_of_a_session_lands_on_one_replica(cluster: tuple[Nginx, list[Replica]]) -> None:
    balancer, replicas = cluster
    with Client(balancer.url, timeout=30, retry=PATIENT) as client:
        assert "tiny" in [m.name for m in client.models()]  # (other tests add models to the shared repo)
        ids = use(client, SESSIONS)
    balancer.stop()  # a graceful stop writes the last access log lines
    calls = balancer.log_lines()

    by_session: dict[str, set[str]] = defaultdict(set)
    per_replica: Counter[tuple[str, str]] = Counter()
    for call in calls:
        assert call["status"] == "200", call
        if call["method"] in SESSION_METHODS:
            assert call["session"] != "-", call
            by_session[call["session"]].add(call["upstream"])
        else:
            assert call["session"] == "-", call  # CreateSession, ListModels: no routing header
        per_replica[(call["upstream"], call["method"])] += 1
    assert set(by_session) == set(ids)
    # Affinity: each session's calls (every retry included) all went to one replica ...
    assert all(len(upstreams) == 1 for upstreams in by_session.values()), by_session
    # ... and the sessions are spread over the replicas by the hash, as are new sessions (no header).
    homes = Counter(next(iter(u)) for u in by_session.values())
    creates = Counter(c["upstream"] for c in calls if c["method"] == "CreateSession")
    addresses = {r.address for r in replicas}
    assert set(homes) == addresses, homes
    assert set(creates) == addresses, creates
    print(f"\nsessions per replica by hash: {dict(homes)}; CreateSession per replica: {dict(creates)}")

    # Each replica's own count of calls agrees with where nginx says it sent them.
    for r in replicas:
        m = scrape(r.metrics_port)
        for method in (*SESSION_METHODS, "CreateSession"):
            served = sum(
                value(m, "rnnserve_requests_total", service=SERVICE, method=method, code=code)
                for code in ("OK", "UNAVAILABLE", "NOT_FOUND")
            )
            assert served == per_replica[(r.address, method)], (r.address, method)


def test_sessions_of_a_killed_replica_continue_on_the_others(cluster: tuple[Nginx, list[Replica]]) -> None:
    balancer, replicas = cluster
    victim, live = replicas[0], {r.address for r in replicas[1:]}
    with Client(balancer.url, timeout=30, retry=PATIENT) as client:
        sessions = [client.session("tiny") for _ in range(SESSIONS)]
        for s in sessions:
            s.feed("def ")
            s.info()  # unary: logged when it ends, so the log says where each session lives

        def homes_logged() -> dict[str, str]:
            return {c["session"]: c["upstream"] for c in balancer.log_lines() if c["method"] == "GetSession"}

        # nginx writes a call's line after the client has its answer: wait for the last ones.
        wait_for(lambda: len(homes_logged()) == len(sessions), "nginx to log every GetSession")
        homes = homes_logged()
        held = {s.id for s in sessions if homes[s.id] == victim.address}
        assert held, "the victim held no session"
        mark = len(balancer.log_lines())
        victim.kill()  # SIGKILL, with a Stream of each of its sessions open through nginx
        pauses = []
        for s in sessions:  # every session goes on where it was (write-through: nothing lost)
            t0 = time.monotonic()
            assert s.feed("add").position == 7, s.id
            pauses.append(time.monotonic() - t0)
        for s in sessions:
            s.close()
        for _ in range(6):
            with client.session("tiny") as s:
                s.feed("x")

    def logged_after() -> list[dict[str, str]]:
        return balancer.log_lines()[mark:]

    def all_logged() -> bool:  # every session's close and the 6 new sessions' creates
        closed = {c["session"] for c in logged_after() if c["method"] == "CloseSession"}
        return closed >= held and sum(c["method"] == "CreateSession" for c in logged_after()) >= 6

    wait_for(all_logged, "nginx to log the closes and creates")
    after = logged_after()
    # The victim's sessions moved to live replicas (their last call, the close, went there), and new
    # sessions were made on live replicas only (nginx passes a refused connection on to the next one).
    for session_id in held:
        closes = [c for c in after if c["session"] == session_id and c["method"] == "CloseSession"]
        assert closes and closes[-1]["upstream"].split(", ")[-1] in live, closes
    creates = [c["upstream"].split(", ")[-1] for c in after if c["method"] == "CreateSession"]
    assert len(creates) == 6 and set(creates) <= live, creates
    pauses.sort()
    print(
        f"\nkilled {victim.address} holding {len(held)}/{SESSIONS} sessions; first feed after the kill: "
        f"p50 {pauses[len(pauses) // 2]:.2f} s, max {pauses[-1]:.2f} s"
    )
