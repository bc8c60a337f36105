"""Limits that protect the server (issue 16, item 4): sessions and concurrent Generates per token, input
and max_tokens limits as flags, and deadlines: a call whose deadline passed stops consuming the model.

Races are set up with hooks (model runs held in the ORT worker, the scheduler's queue watched), never
with sleeps; waits are bounded, and nothing asserts how long anything took.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from support import HeldRuns, run_engine_with, wait_for

from rnnserve.server import cli as server_cli
from rnnserve.server.app import RnnServeServer, background_server
from rnnserve.server.caller import CALLER, Caller
from rnnserve.server.config import ServerConfig
from rnnserve.server.engine import Engine, EngineLimits, GenerateRequest, StoreOptions
from rnnserve.server.errors import NotFound, ResourceExhausted
from rnnserve.server.repository import ModelRepository
from rnnserve.server.sampling import SamplingParams
from rnnserve.server.scheduler import SchedulerOptions
from rnnserve.server.sessions import SessionLimits, session_not_found
from rnnserve.server.work import StepRequest
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

T = TypeVar("T")


def run_engine(lm_repo: Path, work: Callable[[Engine], Awaitable[T]], **limits: Any) -> T:
    session_limits = {k: limits.pop(k) for k in ("max_sessions", "max_sessions_per_owner") if k in limits}

    def make() -> Engine:
        return Engine(
            ModelRepository.load(lm_repo),
            SessionLimits(**session_limits),
            SchedulerOptions(inline_max_tokens=0),  # every run through the queue and the worker
            EngineLimits(**limits),
        )

    return run_engine_with(make, work)


def as_caller(caller: Caller) -> None:
    """Make the running task's calls those of `caller` (what the auth interceptor does per call)."""
    CALLER.set(caller)


# -- sessions per token --------------------------------------------------------------------------------


def test_sessions_per_token_and_a_tokens_own_limit(lm_repo: Path) -> None:
    async def work(engine: Engine) -> None:
        as_caller(Caller("a"))
        first = engine.keeper.create("tiny")
        engine.keeper.create("tiny")
        with pytest.raises(
            ResourceExhausted, match=r"token 'a' holds its maximum of 2 open sessions"
        ) as info:
            engine.keeper.create("tiny")
        assert "close sessions you no longer need" in str(info.value) and "retry" in str(info.value)
        as_caller(Caller("b", max_sessions=3))  # its own limit, over the server's
        for _ in range(3):
            engine.keeper.create("tiny")
        with pytest.raises(ResourceExhausted, match="maximum of 3"):
            engine.keeper.create("tiny")
        as_caller(Caller("c", max_sessions=0))  # 0: no limit of its own (the global one stays)
        for _ in range(4):
            engine.keeper.create("tiny")
        as_caller(Caller("a"))
        await engine.keeper.close(first.id)  # room again for a
        engine.keeper.create("tiny")
        assert engine.sessions.owned_by("a") == 2 and engine.sessions.owned_by("b") == 3
        as_caller(Caller("d"))
        engine.keeper.create("tiny")  # the tenth
        with pytest.raises(ResourceExhausted, match="the server holds its maximum of 10 sessions"):
            engine.keeper.create("tiny")

    run_engine(lm_repo, work, max_sessions=10, max_sessions_per_owner=2)


def test_expired_sessions_leave_their_tokens_count(lm_repo: Path) -> None:
    async def work(engine: Engine) -> None:
        as_caller(Caller("a"))
        session = engine.keeper.create("tiny", ttl_seconds=1)
        assert engine.sessions.owned_by("a") == 1
        assert engine.sessions.expire(time.monotonic() + 5) == [session.id]
        assert engine.sessions.owned_by("a") == 0
        engine.keeper.create("tiny")

    run_engine(lm_repo, work, max_sessions_per_owner=1)


def test_a_session_keeps_its_owner_when_it_leaves_memory_and_comes_back(lm_repo: Path) -> None:
    """Parked in the (memory) store after its idle TTL, then revived: still alice's, and still counted as
    hers; for bob it is NOT_FOUND (a missing session's message) and bob's lookup does not make it his."""

    async def work(engine: Engine) -> None:
        as_caller(Caller("alice"))
        session = engine.keeper.create("tiny")
        await engine.feed(session.id, "de")
        assert await engine.keeper.sweep(now=session.last_used + 60) == (0, 1)  # parked
        assert session.id not in engine.sessions and engine.sessions.owned_by("alice") == 0
        as_caller(Caller("bob"))
        with pytest.raises(NotFound) as info:
            await engine.keeper.get(session.id)
        assert str(info.value) == str(session_not_found(session.id))
        assert engine.sessions.owned_by("bob") == 0
        as_caller(Caller("alice"))
        revived = await engine.keeper.get(session.id)
        assert revived.owner == "alice" and revived.position == 2 and engine.sessions.owned_by("alice") == 1

    def make() -> Engine:
        return Engine(ModelRepository.load(lm_repo), store_options=StoreOptions(idle_ttl_s=30))

    run_engine_with(make, work)


# -- concurrent Generates per token --------------------------------------------------------------------


def request(max_tokens: int = 3) -> GenerateRequest:
    return GenerateRequest(
        sampling=SamplingParams(seed=1), max_tokens=max_tokens, ignore_eos=True, prompt="d"
    )


def test_concurrent_generates_per_token(lm_repo: Path) -> None:
    async def work(engine: Engine) -> None:
        as_caller(Caller("a"))
        sessions = [engine.keeper.create("tiny") for _ in range(3)]
        first = engine.generate(sessions[0].id, request())
        await first.__anext__()  # in flight
        with pytest.raises(
            ResourceExhausted, match=r"token 'a' has its maximum of 1 Generate calls in flight"
        ):
            await engine.generate(sessions[1].id, request()).__anext__()
        as_caller(Caller("b", max_generates=2))  # its own limit
        second = engine.generate(engine.keeper.create("tiny").id, request())
        await second.__anext__()
        as_caller(Caller("a"))
        await first.aclose()  # ended: room again
        async for _ in engine.generate(sessions[2].id, request()):
            pass
        await second.aclose()
        assert engine.generates.in_flight == {}

    run_engine(lm_repo, work, max_generates_per_token=1)


def test_without_authentication_generates_are_not_counted(lm_repo: Path) -> None:
    async def work(engine: Engine) -> None:
        sessions = [engine.keeper.create("tiny") for _ in range(2)]
        first = engine.generate(sessions[0].id, request())
        await first.__anext__()
        async for _ in engine.generate(sessions[1].id, request()):
            pass
        await first.aclose()
        assert engine.generates.in_flight == {}

    run_engine(lm_repo, work, max_generates_per_token=1)


# -- flags -----------------------------------------------------------------------------------------------


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    server_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", "--repo", ".", *argv])


def test_limit_flags_and_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    args = serve_args()
    assert (args.max_sessions_per_token, args.max_generates_per_token) == (0, 0)
    assert (args.max_input_tokens, args.max_generate_tokens, args.auth_tokens) == (65_536, 4096, None)
    monkeypatch.setenv("RNNSERVE_MAX_SESSIONS_PER_TOKEN", "7")
    monkeypatch.setenv("RNNSERVE_MAX_INPUT_TOKENS", "100")
    monkeypatch.setenv("RNNSERVE_AUTH_TOKENS", "/etc/rnnserve/tokens.toml")
    args = serve_args("--max-generates-per-token", "2", "--max-generate-tokens", "50")
    assert (args.max_sessions_per_token, args.max_generates_per_token) == (7, 2)
    assert (args.max_input_tokens, args.max_generate_tokens) == (100, 50)
    assert args.auth_tokens == Path("/etc/rnnserve/tokens.toml")
    for bad in (
        ("--max-sessions-per-token", "-1"),
        ("--max-input-tokens", "0"),
        ("--max-generate-tokens", "0"),
    ):
        assert server_cli.run(serve_args(*bad)) == 2


def test_input_and_max_tokens_limits_are_configurable(lm_repo: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(lm_repo / "tiny", tmp_path / "tiny")
    config = ServerConfig(repo=tmp_path, port=0, max_input_tokens=8, max_generate_tokens=5)
    with background_server(config) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.RnnServeStub(channel)
        sid = stub.CreateSession(pb.CreateSessionRequest(model="tiny"), timeout=30).session_id
        feed = lambda text: list(  # noqa: E731
            stub.Stream(iter([pb.StreamRequest(session_id=sid, text=text)]), timeout=30)
        )
        assert feed("12345678")[-1].position == 8
        with pytest.raises(grpc.RpcError) as info:
            feed("123456789")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "more than the limit of 8" in (info.value.details() or "")
        generate = lambda n: list(  # noqa: E731
            stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=n), timeout=30)
        )
        assert sum(len(r.token_ids) for r in generate(5)) <= 5
        with pytest.raises(grpc.RpcError) as info:
            generate(6)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_tokens must be in [1, 5]" in (info.value.details() or "")


# -- deadlines -------------------------------------------------------------------------------------------


@pytest.fixture
def held_server(lm_repo: Path, tmp_path: Path) -> Iterator[RnnServeServer]:
    import shutil

    shutil.copytree(lm_repo / "tiny", tmp_path / "tiny")
    config = ServerConfig(repo=tmp_path, port=0, inline_max_tokens=0)  # every run in the worker
    with background_server(config) as server:
        yield server


DEADLINE_S = 3.0  # the short client deadline (its call's step is queued well before it passes)


def test_a_queued_step_whose_deadline_passed_never_runs(held_server: RnnServeServer) -> None:
    """A's run is held in the worker; B's message queues behind it with a short deadline. The deadline
    passes: grpc.aio cancels B's handler, its queued step is dropped. Once A's run goes on, B's step
    never runs: B's session is where it was, and A's run was the only one."""
    server = held_server
    scheduler = server.engine.schedulers["tiny@1"]
    queued: list[StepRequest] = []
    enqueue = scheduler._enqueue

    def watched(request: Any) -> None:
        queued.append(request)
        enqueue(request)

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.RnnServeStub(channel)
        a, b = (
            stub.CreateSession(pb.CreateSessionRequest(model="tiny"), timeout=30).session_id for _ in "ab"
        )
        answered: list[Any] = []
        with HeldRuns(server) as runs:
            scheduler._enqueue = watched  # type: ignore[method-assign]
            feeder = threading.Thread(
                target=lambda: answered.extend(
                    stub.Stream(iter([pb.StreamRequest(session_id=a, text="d")]), timeout=60)
                ),
                daemon=True,
            )
            feeder.start()
            assert runs.held.wait(60)  # A's step is in the worker
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Stream(iter([pb.StreamRequest(session_id=b, text="d")]), timeout=DEADLINE_S))
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert len(queued) == 2, "B's step was not queued behind A's"  # A's and B's
            b_step = queued[1]
            wait_for(b_step.future.done, "the server to cancel B's call")  # its handler was cancelled
            assert b_step.future.cancelled() and not b_step.taken
            runs.release()
            feeder.join(60)
        scheduler._enqueue = enqueue  # type: ignore[method-assign]
        assert answered and answered[-1].position == 1
        assert runs.runs == 1  # A's; B's step was dropped, never run
        assert not b_step.taken
        assert stub.GetSession(pb.GetSessionRequest(session_id=b), timeout=30).position == 0
        # B's session is free and whole: the next message runs
        assert (
            list(stub.Stream(iter([pb.StreamRequest(session_id=b, text="d")]), timeout=60))[-1].position == 1
        )


def test_a_generate_whose_deadline_passed_stops_generating(held_server: RnnServeServer) -> None:
    """A Generate of up to 4,000 tokens has a run held when its deadline passes: the run in flight
    finishes (its state is committed), and no further run is made for it."""
    server = held_server
    scheduler = server.engine.schedulers["tiny@1"]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.RnnServeStub(channel)
        sid = stub.CreateSession(pb.CreateSessionRequest(model="tiny"), timeout=30).session_id
        got: list[pb.GenerateResponse] = []
        with HeldRuns(server, start=4) as runs:  # the prompt and a few tokens run; then one is held
            call = stub.Generate(
                pb.GenerateRequest(session_id=sid, prompt_text="d", max_tokens=4000, ignore_eos=True),
                timeout=DEADLINE_S,
            )
            with pytest.raises(grpc.RpcError) as info:
                for response in call:
                    got.append(response)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert runs.held.is_set()
            session = server.engine.sessions.get(sid)

            def cancelled() -> bool:  # (read across threads: the loop may be changing it)
                try:
                    generations = list(scheduler._generations)
                except RuntimeError:
                    return False
                return bool(generations) and not any(g.active for g in generations)

            wait_for(cancelled, "the server to cancel the Generate")  # its handler was cancelled
            held_at = runs.runs
            runs.release()
            wait_for(
                lambda: scheduler.generating == 0 and not session.lock.locked(), "the generation to leave"
            )
        assert runs.runs - held_at <= 1  # at most a block's rollback replay; none of the runs it asked for
        position = stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=30).position
        assert 1 + sum(len(r.token_ids) for r in got) <= position < 4000
        assert list(stub.Stream(iter([pb.StreamRequest(session_id=sid, text="d")]), timeout=60))[
            -1
        ].position == (position + 1)


def test_a_cancel_that_comes_after_the_step_was_committed_does_not_hang(lm_repo: Path) -> None:
    """The caller's task is cancelled in the very commit of its step (its future still pending): the step
    is delivered, so the caller must not wait for a settlement that already happened."""

    async def work(engine: Engine) -> None:
        session = engine.keeper.create("tiny")
        scheduler = engine.schedulers[session.model.key]
        committed: list[bool] = []

        def commit(_: Any) -> None:
            committed.append(True)
            task.cancel()

        tokens = np.asarray([1, 2], dtype=np.int64)
        task = asyncio.ensure_future(
            scheduler.step(tokens, session.slot, session.slot, last=True, commit=commit)
        )
        done, _ = await asyncio.wait([task], timeout=60)
        assert done, "the cancelled caller hung waiting for its step's settlement"
        assert task.cancelled() and committed == [True]

    run_engine(lm_repo, work)
