"""One owner per session across replicas (issue 15, item 2), against a real Redis: a replica that does not
hold a session takes it from the store only when no other replica's lease is on it; and a replica whose
lease lapsed (paused, partitioned) can never write over the new owner's session, whatever it still holds
in memory: its writes are refused in the same atomic step that checks the lease, and it drops the session.

Two engines in one process play two replicas (distinct owner names); a lapsed lease is made by deleting
its key, which is exactly what its expiry does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis

from rnnserve.server.engine import Engine, StoreOptions
from rnnserve.server.errors import Unavailable
from rnnserve.server.redis_store import RedisStore
from rnnserve.server.repository import ModelRepository
from rnnserve.server.runtime import RuntimeOptions
from rnnserve.server.sessions import SessionLimits
from rnnserve.server.snapshot import parse_snapshot
from rnnserve.server.store import StoredSession

pytestmark = pytest.mark.redis
PREFIX = "rnnserve:owners-test:"


def replica(repo: Path, url: str, name: str, interval_s: float) -> Engine:
    store = RedisStore(url, key_prefix=PREFIX, owner=name, lease_s=60)  # no lease lapses by itself here
    engine = Engine(
        ModelRepository.load(repo, RuntimeOptions(device="cpu")),
        SessionLimits(max_sessions=16),
        store=store,
        store_options=StoreOptions(persist_interval_s=interval_s, lease_s=60),
    )
    engine.start()
    return engine


def run_replicas(
    repo: Path, url: str, interval_s: float, work: Callable[[Engine, Engine, redis.Redis], Awaitable[None]]
) -> None:
    inspect = redis.Redis.from_url(url)

    async def go() -> None:
        a, b = replica(repo, url, "replica-a", interval_s), replica(repo, url, "replica-b", interval_s)
        try:
            await work(a, b, inspect)
        finally:
            await a.stop()
            await b.stop()

    try:
        asyncio.run(go())
    finally:
        for key in inspect.scan_iter(match=PREFIX.rstrip(":") + "*"):
            inspect.delete(key)
        inspect.close()


def stored_position(inspect: redis.Redis, session_id: str) -> int:
    data = inspect.get(PREFIX + session_id)
    assert isinstance(data, bytes)
    return int(parse_snapshot(data).position)


@pytest.mark.parametrize("interval_s", [0, 3600], ids=["write-through", "write-behind"])
def test_a_replica_that_lost_its_lease_cannot_write_over_the_new_owner(
    cell_repo: Path, redis_url: str, interval_s: float
) -> None:
    async def work(a: Engine, b: Engine, inspect: redis.Redis) -> None:
        session = await a.keeper.open("lstm")
        await a.feed(session.id, "abc")
        if a.keeper.persister and not a.keeper.persister.write_through:
            await a.keeper.persister.flush()
        with pytest.raises(Unavailable, match="held by another replica \\(replica-a\\)"):
            await b.keeper.get(session.id)
        assert inspect.get(PREFIX.rstrip(":") + ".owner:" + session.id) == b"replica-a"

        inspect.delete(PREFIX.rstrip(":") + ".owner:" + session.id)  # a's lease lapses (a was paused)
        taken = await b.keeper.get(session.id)  # b takes it over, as it was written
        assert taken.position == 3
        await b.feed(session.id, "def")
        if b.keeper.persister and not b.keeper.persister.write_through:
            await b.keeper.persister.flush()
        assert stored_position(inspect, session.id) == 6

        # a still holds its old copy in memory; its writes are refused and it lets the session go.
        if interval_s == 0:
            with pytest.raises(Unavailable, match="moved to another replica"):
                await a.feed(session.id, "xyz")
        else:
            await a.feed(session.id, "xyz")  # answered from memory, then refused when written behind
            assert a.keeper.persister is not None
            await a.keeper.persister.flush()
        assert session.id not in a.sessions
        assert stored_position(inspect, session.id) == 6  # b's session, untouched
        with pytest.raises(Unavailable, match="replica-b"):
            await a.keeper.get(session.id)
        assert await a.keeper.store.renew([session.id]) == [session.id]  # a's renewals see it too
        assert (await b.feed(session.id, "g")).position == 7

    run_replicas(cell_repo, redis_url, interval_s, work)


def test_two_replicas_claiming_one_free_session_at_once_get_one_owner(
    cell_repo: Path, redis_url: str
) -> None:
    async def work(a: Engine, b: Engine, inspect: redis.Redis) -> None:
        ids = [f"free-{i}" for i in range(50)]
        for store, other in ((a.keeper.store, b.keeper.store), (b.keeper.store, a.keeper.store)):
            results = await asyncio.gather(*(c for i in ids for c in (store.claim(i), other.claim(i))))
            winners = [r is None for r in results]
            assert all(first != second for first, second in zip(winners[::2], winners[1::2], strict=True))
            await a.keeper.store.release(ids)
            await b.keeper.store.release(ids)
        # Saves are fenced the same way: only the owner's land.
        assert await a.keeper.store.claim("free-0") is None
        refused = await b.keeper.store.save([StoredSession("free-0", b"b's", 60)])
        assert refused == ["free-0"] and inspect.get(PREFIX + "free-0") is None

    run_replicas(cell_repo, redis_url, 0, work)
