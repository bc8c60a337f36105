"""Sessions beyond one process's memory (issue 14): snapshots round-trip exactly for every cell, idle
sessions leave memory and come back identical, a restarted engine on the same Redis continues every
session exactly, a retried Generate (same request_id) returns the tokens already made and goes on, and
a Redis that goes away gives UNAVAILABLE without corrupting anything, then recovers by itself.

Engines run in-process (no gRPC) on the small untrained LMs of conftest.cell_repo; a "restart" is a new
engine on the same store, with the first one dropped without any shutdown (nothing flushed: kill -9).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from support import CELLS

from rnnserve.server.engine import Engine, GeneratedToken, GenerateRequest, StoreOptions
from rnnserve.server.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from rnnserve.server.redis_store import RedisStore
from rnnserve.server.repository import ModelRepository
from rnnserve.server.runtime import RuntimeOptions
from rnnserve.server.sampling import SamplingParams
from rnnserve.server.sessions import AppliedGeneration, SessionLimits
from rnnserve.server.store import MemoryStore, SessionStore

T = TypeVar("T")
K8 = RuntimeOptions(device="cpu", generate_graphs="on", generate_steps=8)
WRITE_THROUGH = StoreOptions(persist_interval_s=0)
SEEDED = SamplingParams(temperature=1.0, seed=11)
CUT = SamplingParams(temperature=0.9, top_k=5, seed=12)


def make_engine(repo: Path, store: SessionStore | None = None, options: StoreOptions | None = None) -> Engine:
    return Engine(
        ModelRepository.load(repo, K8), SessionLimits(max_sessions=64), store=store, store_options=options
    )


def run(work: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(work())  # type: ignore[arg-type]


async def started(engine: Engine) -> Engine:
    engine.start()
    return engine


async def generate(engine: Engine, session_id: str, request: GenerateRequest) -> list[GeneratedToken]:
    return [t async for tokens in engine.generate(session_id, request) for t in tokens]


def ids(tokens: list[GeneratedToken]) -> list[int]:
    return [t.token_id for t in tokens]


def generate_request(sampling: SamplingParams, max_tokens: int = 20, **fields: Any) -> GenerateRequest:
    return GenerateRequest(sampling, max_tokens=max_tokens, ignore_eos=True, **fields)


async def history(engine: Engine, session_id: str) -> tuple[list[int], np.ndarray]:
    """A session's future, as a test can see it: a seeded generation and the distribution after it."""
    tokens = ids(await generate(engine, session_id, generate_request(SEEDED, 12)))
    result = await engine.feed(session_id, "x = 1\n")
    return tokens, np.array([lp for _, _, lp in result.top])


@pytest.mark.parametrize("cell", CELLS)
def test_an_exported_session_imports_into_an_exact_copy(cell_repo: Path, cell: str) -> None:
    async def work() -> None:
        engine = await started(make_engine(cell_repo))
        try:
            source = engine.create_session(cell)
            await engine.feed(source.id, "def add(a, b):")
            await generate(engine, source.id, generate_request(CUT, 9))
            _, data = await engine.keeper.export(source.id)
            copy = await engine.keeper.import_(data)
            fork = await engine.keeper.fork(source.id)
            assert copy.id != source.id and fork.id != source.id
            for other in (copy, fork):
                assert other.position == source.position
                for name, value in source.state.items():
                    np.testing.assert_array_equal(other.state[name], value)
            expected = await history(engine, source.id)
            for other in (copy, fork):
                got = await history(engine, other.id)
                assert got[0] == expected[0]
                np.testing.assert_array_equal(got[1], expected[1])
        finally:
            await engine.stop()

    run(work)


def test_import_refuses_what_does_not_fit(cell_repo: Path) -> None:
    async def work() -> None:
        engine = await started(make_engine(cell_repo))
        try:
            lstm = engine.create_session("lstm")
            await engine.feed(lstm.id, "abc")
            _, data = await engine.keeper.export(lstm.id)
            with pytest.raises(InvalidArgument, match="not a session snapshot"):
                await engine.keeper.import_(b"\x00garbage" * 10)
            from rnnserve.v1 import rnnserve_pb2 as pb

            snapshot = pb.SessionSnapshot.FromString(data)
            snapshot.model = "gru"  # a GRU has no c state: the shapes say so
            with pytest.raises(FailedPrecondition, match="model gru@1 does not have"):
                await engine.keeper.import_(snapshot.SerializeToString())
            snapshot.model, snapshot.version = "lstm", "7"
            with pytest.raises(FailedPrecondition, match="version 7, which this server does not serve"):
                await engine.keeper.import_(snapshot.SerializeToString())
        finally:
            await engine.stop()

    run(work)


@pytest.mark.parametrize("store_kind", ["memory", "redis"])
def test_an_idle_session_leaves_memory_and_comes_back_identical(
    cell_repo: Path, store_kind: str, request: pytest.FixtureRequest
) -> None:
    store_url = request.getfixturevalue("redis_url") if store_kind == "redis" else "memory"

    async def work() -> None:
        store: SessionStore = MemoryStore() if store_url == "memory" else RedisStore(store_url)
        engine = await started(make_engine(cell_repo, store, StoreOptions(idle_ttl_s=30)))
        try:
            idle, twin = engine.create_session("gru"), engine.create_session("gru")
            for s in (idle, twin):
                await engine.feed(s.id, "class Point:")
            expired, parked = await engine.keeper.sweep(now=idle.last_used + 60)  # both idle past 30 s
            assert (expired, parked) == (0, 2)
            assert idle.id not in engine.sessions and len(engine.sessions) == 0
            assert engine.sessions.slab(idle.model).in_use == 0  # their slots are free
            info = await engine.keeper.get(idle.id)  # revived by a lookup
            start = info.position
            assert start == len("class Point:")
            got = await history(engine, idle.id)
            expected = await history(engine, twin.id)  # revived by its next message
            assert got[0] == expected[0]
            np.testing.assert_array_equal(got[1], expected[1])
            assert await engine.keeper.close(idle.id) == start + 12 + len("x = 1\n")
            with pytest.raises(NotFound):
                await engine.keeper.get(idle.id)
        finally:
            await engine.stop()

    run(work)


@pytest.mark.redis
@pytest.mark.parametrize("cell", ["lstm", "rnn_relu"])
def test_a_restarted_engine_continues_every_session_exactly(
    cell_repo: Path, redis_url: str, cell: str
) -> None:
    """Write-through: everything answered survives a crash. The reference runs uninterrupted."""

    async def work() -> None:
        reference = await started(make_engine(cell_repo))
        first = await started(make_engine(cell_repo, RedisStore(redis_url), WRITE_THROUGH))
        second: Engine | None = None
        try:
            ref, s = reference.create_session(cell), await first.keeper.open(cell)
            for engine, sid in ((reference, ref.id), (first, s.id)):
                await engine.feed(sid, "def add(a, b):")
                await generate(engine, sid, generate_request(CUT, 10))
            # kill -9: the first engine is never stopped, nothing more is written
            second = await started(make_engine(cell_repo, RedisStore(redis_url), WRITE_THROUGH))
            assert (await second.keeper.get(s.id)).position == ref.position
            got, expected = await history(second, s.id), await history(reference, ref.id)
            assert got[0] == expected[0]
            np.testing.assert_array_equal(got[1], expected[1])
        finally:
            await reference.stop()
            if second is not None:
                await second.stop()
            for scheduler in first.schedulers.values():  # only its threads, not its store
                await scheduler.stop()

    run(work)


@pytest.mark.redis
def test_write_behind_persists_within_its_interval_and_on_a_clean_stop(
    cell_repo: Path, redis_url: str
) -> None:
    async def work() -> None:
        store = RedisStore(redis_url, key_prefix="rnnserve:behind:")
        engine = await started(make_engine(cell_repo, store, StoreOptions(persist_interval_s=3600)))
        session = engine.create_session("lstm")
        await engine.feed(session.id, "abc")
        assert engine.keeper.persister is not None and engine.keeper.persister.pending == 1
        assert await engine.keeper.persister.flush() == 1  # what the hourly timer would do
        await engine.feed(session.id, "def")
        await engine.stop()  # a clean stop writes what changed since
        restarted = await started(
            make_engine(cell_repo, RedisStore(redis_url, key_prefix="rnnserve:behind:"))
        )
        try:
            assert (await restarted.keeper.get(session.id)).position == 6
        finally:
            await restarted.stop()

    run(work)


@pytest.mark.parametrize("cell", CELLS)
def test_a_retried_generate_returns_the_tokens_made_and_goes_on(cell_repo: Path, cell: str) -> None:
    """The reader goes away after some tokens (a lost connection); the retry under the same request_id
    gets the same tokens from the first, then the rest, as one uninterrupted call would."""

    async def work() -> None:
        engine = await started(make_engine(cell_repo))
        try:
            whole = engine.create_session(cell)
            cut = engine.create_session(cell)
            for s in (whole, cut):
                await engine.feed(s.id, "def ")
            sampling = SamplingParams(temperature=1.0)  # no seed: the server picks one and keeps it
            call = generate_request(sampling, 40, request_id="call-1", expected_position=4, prompt="a")
            stream = engine.generate(cut.id, call)
            first = await anext(stream)
            await stream.aclose()  # the reader went away after its first message
            made = cut.position - 5
            retried = await generate(engine, cut.id, call)
            assert retried[: len(first)] == first
            assert len(retried) == 40 and [t.position for t in retried] == list(range(6, 46))
            assert cut.position == 45 and made < 40
            again = await generate(engine, cut.id, call)  # a finished call: the same tokens again
            assert ids(again) == ids(retried) and cut.position == 45
            assert "".join(t.text for t in again) == "".join(t.text for t in retried)
            # One uninterrupted call with the seed the server chose makes the same tokens.
            assert isinstance(cut.last_applied, AppliedGeneration)
            seeded = SamplingParams(temperature=1.0, seed=cut.last_applied.seed)
            assert ids(await generate(engine, whole.id, generate_request(seeded, 40, prompt="a"))) == ids(
                retried
            )
            with pytest.raises(FailedPrecondition, match="a retry must send the same request"):
                await generate(engine, cut.id, generate_request(SEEDED, 40, request_id="call-1"))
        finally:
            await engine.stop()

    run(work)


@pytest.mark.redis
def test_redis_going_away_gives_unavailable_and_recovers_by_itself(
    cell_repo: Path, redis_process: Any
) -> None:
    async def work() -> None:
        engine = await started(make_engine(cell_repo, RedisStore(redis_process.url), WRITE_THROUGH))
        try:
            session = await engine.keeper.open("lstm")
            await engine.feed(session.id, "abc")
            redis_process.stop()
            with pytest.raises(Unavailable, match="cannot be reached"):
                await engine.feed(session.id, "def", expected_position=3)
            with pytest.raises(Unavailable, match="cannot be reached"):
                await engine.keeper.open("lstm")
            with pytest.raises(Unavailable):
                await engine.keeper.get("not-in-memory")
            assert len(engine.sessions) == 1  # the refused create left nothing behind
            redis_process.start()
            # The message was applied in memory before its write failed: the retry is answered again.
            replay = await engine.feed(session.id, "def", expected_position=3)
            assert replay.replayed and replay.position == 6
            assert (await engine.feed(session.id, "g", expected_position=6)).position == 7
        finally:
            await engine.stop()

    run(work)


@pytest.mark.redis
def test_a_new_session_moved_out_by_the_idle_sweep_while_it_is_published(
    cell_repo: Path, redis_url: str
) -> None:
    """CreateSession writes the new session, then lets it leave memory; the idle sweep may move it out
    across that write's await (a CreateSession once failed INTERNAL on this): both are fine."""

    async def work() -> None:
        store = RedisStore(redis_url, key_prefix="rnnserve:publish-race:")
        engine = await started(make_engine(cell_repo, store, StoreOptions(idle_ttl_s=1)))
        persister = engine.keeper.persister
        assert persister is not None
        write, swept, sweeping = persister.write, [], []

        async def write_then_sweep(sessions: Any) -> list[str]:
            lost = await write(sessions)
            if not sweeping:  # the sweep's own write comes back here: once is enough
                sweeping.append(True)
                swept.append(await engine.keeper.sweep(now=time.monotonic() + 60))
            return lost

        persister.write = write_then_sweep  # type: ignore[method-assign]
        try:
            session = await engine.keeper.open("lstm")
            assert swept == [(0, 1)]  # the sweep moved it out first
            assert (await engine.feed(session.id, "abc")).position == 3
        finally:
            persister.write = write  # type: ignore[method-assign]
            await engine.stop()

    run(work)
