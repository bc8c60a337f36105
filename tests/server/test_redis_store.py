"""RedisStore against a real redis-server (tests/redis_server.py starts them): round trips, expiry, one
round trip per save, and Redis going down and coming back under the same store object."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio.connection
from redis_server import RedisServer
from support import free_port

from rnnserve.server.redis_store import RedisStore
from rnnserve.server.store import StoredSession, StoreUnavailable, open_store

pytestmark = pytest.mark.redis
T = TypeVar("T")
_prefixes = itertools.count()


def prefix() -> str:
    """A key prefix of this test's own on the shared server."""
    return f"test:{next(_prefixes)}:"


def run(store: RedisStore, work: Callable[[RedisStore], Awaitable[T]]) -> T:
    async def go() -> T:
        try:
            return await work(store)
        finally:
            await store.aclose()

    return asyncio.run(go())


def record(session_id: str, data: bytes = b"snapshot", ttl: float = 600.0) -> StoredSession:
    return StoredSession(session_id=session_id, data=data, ttl_seconds=ttl)


def test_save_load_delete_count(redis_url: str) -> None:
    store = RedisStore(redis_url, key_prefix=prefix())
    other = RedisStore(redis_url, key_prefix=prefix())

    async def work(store: RedisStore) -> None:
        assert await store.count() == 0
        assert await store.load("a") is None
        await store.save([record("a", b"\x00one\xff"), record("b", b"two"), record("c", b"")])
        await other.save([record("a", b"someone else's")])
        assert await store.load("a") == b"\x00one\xff"
        assert await store.load("c") == b""
        assert await store.count() == 3  # the other prefix's key is not ours
        await store.save([record("a", b"newer")])  # replaces
        assert await store.load("a") == b"newer"
        await store.delete(["a", "never-saved"])
        await store.delete([])
        await store.save([])
        assert await store.load("a") is None
        assert await store.count() == 2
        assert await other.load("a") == b"someone else's"
        await other.aclose()

    run(store, work)


def test_count_escapes_glob_characters_in_the_prefix(redis_url: str) -> None:
    base = prefix()
    store = RedisStore(redis_url, key_prefix=base + "[x]*?:")
    lookalike = RedisStore(redis_url, key_prefix=base + "x-:")  # "[x]*?:" unescaped would match it

    async def work(store: RedisStore) -> None:
        await lookalike.save([record("s")])
        await store.save([record("s"), record("t")])
        assert await store.count() == 2
        await lookalike.aclose()

    run(store, work)


def test_ttl_expires_sessions_and_save_restarts_it(redis_url: str) -> None:
    store = RedisStore(redis_url, key_prefix=prefix())
    inspect = redis.Redis.from_url(redis_url)

    async def work(store: RedisStore) -> None:
        await store.save([record("short", ttl=0.05), record("long", ttl=600)])
        for _ in range(400):  # bounded: Redis expires the key within ~50 ms; allow up to ~20 s
            if await store.load("short") is None:
                break
            await asyncio.sleep(0.05)
        assert await store.load("short") is None
        assert await store.load("long") == b"snapshot"
        assert await store.count() == 1
        # The TTL is the session's, in milliseconds, and a save restarts it.
        assert 0 < inspect.pttl(f"{store._prefix}long") <= 600_000
        await store.save([record("long", ttl=3600)])
        assert 600_000 < inspect.pttl(f"{store._prefix}long") <= 3_600_000

    run(store, work)
    inspect.close()


def test_save_is_one_round_trip_however_many_sessions(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStore(redis_url, key_prefix=prefix())
    inspect = redis.Redis.from_url(redis_url)
    writes: list[int] = []
    send = redis.asyncio.connection.AbstractConnection.send_packed_command

    async def counting_send(self: Any, command: Any, check_health: bool = True) -> None:
        writes.append(1)
        await send(self, command, check_health)

    async def work(store: RedisStore) -> None:
        # Connects (HELLO/CLIENT SETINFO are not the save's) and loads the save's script into Redis
        # (later saves call it by its hash).
        await store.save([record("warm-up")])
        inspect.config_resetstat()
        monkeypatch.setattr(redis.asyncio.connection.AbstractConnection, "send_packed_command", counting_send)
        await store.save([record(f"s{i}", bytes([i]) * 100) for i in range(64)])
        monkeypatch.undo()
        assert len(writes) == 1, f"save of 64 sessions wrote {len(writes)} times, want one pipeline"
        # ... and Redis did get all 64 sessions from that one write (a SET of each and of its lease).
        assert inspect.info("commandstats")["cmdstat_set"]["calls"] == 2 * 64
        assert await store.count() == 64 + 1
        assert await store.load("s7") == bytes([7]) * 100

    run(store, work)
    inspect.close()


def test_redis_down_is_store_unavailable_and_the_same_store_recovers(redis_process: RedisServer) -> None:
    store = RedisStore(redis_process.url)  # made before any event loop runs, as the server does

    async def every_call_fails() -> None:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.save([record("a")]),
            lambda: store.load("a"),
            lambda: store.delete(["a"]),
            store.count,
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable) as raised:
                await call()
            message = str(raised.value)
            assert redis_process.url in message and "cannot be reached" in message, message
            assert "reconnects by itself" in message, message

    async def work(store: RedisStore) -> None:
        await store.save([record("a", b"before")])
        assert await store.load("a") == b"before"
        # A restart while idle: the pooled connection is dead, yet the very next call works.
        redis_process.stop()
        redis_process.start()
        assert await store.load("a") is None  # no persistence: the restart lost it
        await store.save([record("a", b"after restart")])
        # Down: every method says so, with the URL; back up: the same object works again.
        redis_process.stop()
        await every_call_fails()
        await every_call_fails()  # and keeps saying so, not a stuck or different error
        redis_process.start()
        await store.save([record("b", b"back")])
        assert await store.load("b") == b"back"
        assert await store.count() == 1
        await store.delete(["b"])
        assert await store.count() == 0

    run(store, work)


def test_store_works_across_event_loops_and_after_aclose(redis_url: str) -> None:
    store = RedisStore(redis_url, key_prefix=prefix())

    async def save(store: RedisStore) -> None:
        await store.save([record("x", b"1")])

    async def load(store: RedisStore) -> bytes | None:
        return await store.load("x")

    run(store, save)  # closes it at the end
    assert run(store, load) == b"1"  # a new loop, after aclose: a new client


def test_describe_hides_the_password() -> None:
    assert RedisStore("redis://:secret@host:1/0").describe() == "redis://host:1/0"
    assert RedisStore("redis://user:secret@host:1/2").describe() == "redis://user@host:1/2"
    assert RedisStore("redis://host:1/0?password=secret").describe() == "redis://host:1/0"
    assert RedisStore("redis://127.0.0.1:6390/0").describe() == "redis://127.0.0.1:6390/0"


def test_unreachable_message_names_the_store_without_its_password() -> None:
    port = free_port()  # nobody listens there
    store = RedisStore(f"redis://:secret@127.0.0.1:{port}/0")

    async def work(store: RedisStore) -> None:
        with pytest.raises(StoreUnavailable) as raised:
            await store.load("a")
        message = str(raised.value)
        assert f"redis://127.0.0.1:{port}/0" in message and "secret" not in message, message

    run(store, work)


def test_open_store_picks_redis_for_redis_urls() -> None:
    store = open_store("redis://127.0.0.1:6390/0")
    assert isinstance(store, RedisStore)
    assert store.durable is True
    assert store.describe() == "redis://127.0.0.1:6390/0"
