"""The Redis session store (`--session-store redis://host:port/db`): one key per session, holding its
serialized SessionSnapshot, that Redis itself expires after the session's idle TTL, and one lease key
per session held by a replica (`<owner_prefix><id>` = the replica's name, expiring after the lease).

Writes are fenced: a Lua script checks the lease and writes in one atomic step (Redis runs a script
alone), so a replica that lost a session's lease can never overwrite what the new owner wrote. One
Redis server (or a primary): the scripts touch several sessions' keys at once, which Redis Cluster
would only allow within one hash slot."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
from collections.abc import Awaitable, Sequence
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
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


# KEYS: session key, lease key, for each session. ARGV: owner, lease ms, then data and ttl ms per session.
# Writes the sessions whose lease is ours or free (taking a free one; a held one is the renewer's to
# extend, so a save costs one GET and one SET); returns the 1-based indexes of the others.
_SAVE = """
local refused = {}
for i = 1, #KEYS / 2 do
  local holder = redis.call('GET', KEYS[2 * i])
  if holder == false or holder == ARGV[1] then
    if holder == false then
      redis.call('SET', KEYS[2 * i], ARGV[1], 'PX', ARGV[2])
    end
    redis.call('SET', KEYS[2 * i - 1], ARGV[2 * i + 1], 'PX', ARGV[2 * i + 2])
  else
    table.insert(refused, i)
  end
end
return refused
"""
# KEYS: lease keys. ARGV: owner, lease ms. Extends ours; returns the indexes of those not ours any more.
_RENEW = """
local lost = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
  else
    table.insert(lost, i)
  end
end
return lost
"""
# KEYS: session key, lease key, for each session. ARGV: owner. Deletes the sessions (and leases) that are
# ours or free; with ARGV[2] == "lease", only the leases that are ours.
_DROP = """
for i = 1, #KEYS / 2 do
  local holder = redis.call('GET', KEYS[2 * i])
  if holder == ARGV[1] then
    redis.call('DEL', KEYS[2 * i])
  end
  if ARGV[2] ~= 'lease' and (holder == false or holder == ARGV[1]) then
    redis.call('DEL', KEYS[2 * i - 1])
  end
end
return 0
"""


def replica_name() -> str:
    """This process's name in lease records: host and pid, unique among live processes. A server that
    restarts in place with the same name (a container's pid 1 on the same hostname) takes its sessions
    back at once: the process that held them is certainly dead. Any other waits for their leases."""
    return f"{socket.gethostname()}/{os.getpid()}"


class RedisStore:
    """Sessions as `<key_prefix><session id>` string keys with a PX expiry (the session's idle TTL), and
    leases as `<owner_prefix><session id>` keys (see the module's docstring). `owner`: this replica's
    name (default: replica_name())."""

    durable = True

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "rnnserve:session:",
        owner_prefix: str = "",
        owner: str = "",
        lease_s: float = 5.0,
    ) -> None:
        parse_url(url)  # a malformed URL is a ValueError at startup, not a StoreUnavailable per request
        self._url = url
        self._prefix = key_prefix
        # Leases beside the sessions, outside their prefix (count() scans the sessions'): by default
        # "rnnserve:session.owner:<id>" for "rnnserve:session:<id>".
        self._owner_prefix = owner_prefix or key_prefix.rstrip(":") + ".owner:"
        self.owner = owner or replica_name()
        self.lease_s = lease_s
        self._lease_ms = str(max(1, round(lease_s * 1000)))
        self._where = redact(url)
        self._scripts: dict[str, AsyncScript] = {}  # registered on the current client (EVALSHA)
        self._scripts_client: aioredis.Redis | None = None
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

    def _lease(self, session_id: str) -> str:
        return self._owner_prefix + session_id

    def _pairs(self, session_ids: Sequence[str]) -> list[str]:
        return [k for sid in session_ids for k in (self._key(sid), self._lease(sid))]

    async def _script(self, script: str, keys: Sequence[str], args: Sequence[str | bytes]) -> list[int]:
        """Run a script (by its hash: the text goes over the wire only the first time on a server)."""
        redis = self._redis()
        runner = self._scripts.get(script)
        if runner is None or self._scripts_client is not redis:
            if self._scripts_client is not redis:
                self._scripts, self._scripts_client = {}, redis
            runner = self._scripts[script] = redis.register_script(script)
        result = await self._call(runner(keys=keys, args=args))
        return [int(i) for i in result] if isinstance(result, list) else []

    async def save(self, records: Sequence[StoredSession]) -> list[str]:
        if not records:
            return []
        args: list[str | bytes] = [self.owner, self._lease_ms]
        for r in records:
            args += [r.data, str(max(1, round(r.ttl_seconds * 1000)))]
        # One script call: one round trip however many sessions, each written only if its lease is ours.
        refused = await self._script(_SAVE, self._pairs([r.session_id for r in records]), args)
        return [records[i - 1].session_id for i in refused]

    async def claim(self, session_id: str) -> str | None:
        lease = self._lease(session_id)

        async def take() -> str | None:
            redis = self._redis()
            if await redis.set(lease, self.owner, nx=True, px=int(self._lease_ms)):
                await redis.delete(self._want(session_id))  # wanted here: here it is
                return None
            holder = await redis.get(lease)
            if holder is None:  # expired between the two calls: try once more
                return None if await redis.set(lease, self.owner, nx=True, px=int(self._lease_ms)) else "?"
            holder = holder.decode() if isinstance(holder, bytes) else str(holder)
            if holder == self.owner:
                await redis.pexpire(lease, int(self._lease_ms))
                return None
            # Tell the holder that calls for this session come here now (see wanted()).
            await redis.set(self._want(session_id), self.owner, px=int(self._lease_ms))
            return holder

        return await self._call(take())

    async def renew(self, session_ids: Sequence[str]) -> list[str]:
        if not session_ids:
            return []
        lost = await self._script(_RENEW, [self._lease(s) for s in session_ids], [self.owner, self._lease_ms])
        return [session_ids[i - 1] for i in lost]

    def _want(self, session_id: str) -> str:
        return self._owner_prefix + "want:" + session_id

    async def wanted(self, session_ids: Sequence[str]) -> list[str]:
        if not session_ids:
            return []
        keys = [self._want(s) for s in session_ids]
        found = await self._call(self._redis().mget(keys))
        me = self.owner.encode()
        return [sid for sid, by in zip(session_ids, found, strict=True) if by is not None and by != me]

    async def release(self, session_ids: Sequence[str]) -> None:
        if session_ids:
            await self._script(_DROP, self._pairs(session_ids), [self.owner, "lease"])

    async def load(self, session_id: str) -> bytes | None:
        data = await self._call(self._redis().get(self._key(session_id)))
        return data.encode() if isinstance(data, str) else data  # str only if the URL asks decode_responses

    async def delete(self, session_ids: Sequence[str]) -> None:
        if session_ids:
            await self._script(_DROP, self._pairs(session_ids), [self.owner, "all"])

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
