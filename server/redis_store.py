"""The Redis session store (`--session-store redis://host:port/db`): one key per session, holding its
serialized SessionSnapshot, that Redis itself expires after the session's idle TTL."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Sequence
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ConnectionError,
    RedisError,
    TimeoutError,
)

from rnnserve.server.store import StoredSession, StoreUnavailable

T = TypeVar("T")


def redact(url: str) -> str:
    """The URL without password or query (redis-py also reads `?password=`), for logs and messages."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RedisStore:
    """Sessions as `<key_prefix><session id>` string keys with a PX expiry (the session's idle TTL)."""

    durable = True

    def __init__(self, url: str, *, key_prefix: str = "rnnserve:session:") -> None:
        parse_url(url)  # a malformed URL is a ValueError at startup, not a StoreUnavailable per request
        self._url = url
        self._prefix = key_prefix
        self._where = redact(url)
        # The client is made on first use: redis.asyncio connections belong to the loop that opened
        # them, and the server builds its store before its event loop runs.
        self._client: aioredis.Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _redis(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            # (A client left on an earlier loop, e.g. of an earlier asyncio.run, cannot be closed from
            # this one; it is dropped.)
            self._client = aioredis.Redis.from_url(
                self._url,
                # Fail fast rather than stall the engine; StoreUnavailable tells the client to retry.
                socket_connect_timeout=2.0,
                socket_timeout=5.0,
                socket_keepalive=True,
                # A pooled connection idle this long is PINGed first, so a restarted Redis is noticed.
                health_check_interval=10,
                # Quick retries reconnect a connection that Redis dropped (restart, idle timeout),
                # so the first call after Redis is back succeeds.
                retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.25), retries=2),
            )
            self._loop = loop
        return self._client

    def _key(self, session_id: str) -> str:
        return self._prefix + session_id

    async def _call(self, op: Awaitable[T]) -> T:
        try:
            return await op
        except (RedisError, OSError) as e:
            raise self._unavailable(e) from e

    def _unavailable(self, e: BaseException) -> StoreUnavailable:
        at = f"the session store at {self._where}"
        if isinstance(e, AuthenticationError | AuthorizationError):
            return StoreUnavailable(f"{at} refused us ({e}); check the credentials in --session-store")
        if isinstance(e, BusyLoadingError):
            return StoreUnavailable(f"{at} is loading its data after a restart; retry in a moment")
        if isinstance(e, ConnectionError | TimeoutError | OSError):
            reason = str(e).rstrip(".") or type(e).__name__
            return StoreUnavailable(
                f"{at} cannot be reached ({reason}); retry: the server reconnects by itself"
            )
        return StoreUnavailable(f"{at} failed ({type(e).__name__}: {e}); retry, or check the Redis server")

    async def save(self, records: Sequence[StoredSession]) -> None:
        if not records:
            return

        async def write() -> None:
            # One pipeline: every SET goes out in one write, one round trip however many sessions.
            async with self._redis().pipeline(transaction=False) as pipe:
                for r in records:
                    pipe.set(self._key(r.session_id), r.data, px=max(1, round(r.ttl_seconds * 1000)))
                await pipe.execute()

        await self._call(write())

    async def load(self, session_id: str) -> bytes | None:
        data = await self._call(self._redis().get(self._key(session_id)))
        return data.encode() if isinstance(data, str) else data  # str only if the URL asks decode_responses

    async def delete(self, session_ids: Sequence[str]) -> None:
        if session_ids:
            await self._call(self._redis().delete(*(self._key(s) for s in session_ids)))

    async def count(self) -> int:
        # SCAN rather than DBSIZE: the database may hold other keys (other prefixes, other apps).
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self._prefix) + "*"

        async def scan() -> int:
            return sum([1 async for _ in self._redis().scan_iter(match=pattern, count=1000)])

        return await self._call(scan())

    async def aclose(self) -> None:
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):  # a Redis that is gone: nothing to close
                await client.aclose()

    def describe(self) -> str:
        return self._where


__all__ = ["RedisStore", "redact"]
