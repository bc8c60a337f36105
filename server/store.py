"""Session stores: where what a session *is* lives (a serialized SessionSnapshot per session), apart
from its hot state in the engine's slab.

    memory              in this process (the default): survives idle eviction, not a restart
    redis://host:port/db  a Redis server (redis_store.py): survives restarts, shared by replicas

The engine writes snapshots behind its sessions (persist.py) and reads one back when a session it
does not hold is asked for (after `--idle-ttl` eviction, a restart, or on another replica). A store
that cannot be reached raises StoreUnavailable (UNAVAILABLE to the client, who retries); it never
corrupts what the engine holds in memory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from rnnserve.server.errors import Unavailable


class StoreUnavailable(Unavailable):
    """The session store cannot be reached; the message says which store and what to do."""


@dataclass(frozen=True)
class StoredSession:
    """One session's snapshot as the store keeps it."""

    session_id: str
    data: bytes  # a serialized rnnserve.v1.SessionSnapshot
    ttl_seconds: float  # dropped after this long without a save (the session's idle TTL)


class SessionStore(Protocol):
    """The session-store seam. Every method may raise StoreUnavailable.

    Ownership: a store shared by replicas gives each session one owner at a time, the replica that
    holds it in memory, through a lease the owner renews. Only the owner's writes land: `save` and
    `delete` check the lease and change the session in one atomic step, so two replicas can never both
    advance one session, even when a paused replica's lease ran out and another took the session over
    (its late writes are refused, and it drops the session). A store of one process owns everything.
    """

    durable: bool  # whether what it holds survives this process (so the engine writes behind)
    owner: str  # this replica's name in ownership records

    async def save(self, records: Sequence[StoredSession]) -> list[str]:
        """Write snapshots (replacing older ones of the same sessions), restarting their TTLs and taking
        (or keeping) their leases, in one round trip however many there are. Returns the ids of the
        sessions another replica owns: those were not written."""
        ...

    async def claim(self, session_id: str) -> str | None:
        """Take (or keep) the lease on a session before loading it: None when it is ours now, else the
        name of the replica that holds it."""
        ...

    async def renew(self, session_ids: Sequence[str]) -> list[str]:
        """Extend our leases; returns the ids whose lease is no longer ours (taken over elsewhere)."""
        ...

    async def release(self, session_ids: Sequence[str]) -> None:
        """Give up our leases (the sessions left memory): another replica may take them at once."""
        ...

    async def wanted(self, session_ids: Sequence[str]) -> list[str]:
        """Those of our sessions another replica was refused lately (a `claim` that found our lease): it
        wants them, since calls for them go there now."""
        ...

    async def load(self, session_id: str) -> bytes | None:
        """A session's snapshot, or None if the store has none (never saved, closed or expired)."""
        ...

    async def delete(self, session_ids: Sequence[str]) -> None:
        """Forget sessions (closed or expired) and their leases; unknown ids, and sessions another
        replica owns, are left alone."""
        ...

    async def count(self) -> int:
        """Sessions held (for metrics and benchmarks)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...

    def describe(self) -> str:
        """Where it is, for logs and messages (never a password)."""
        ...


class MemoryStore:
    """Snapshots in a dict of this process: what an idle session evicted from the slab keeps."""

    durable = False
    owner = "this process"

    def __init__(self) -> None:
        self._records: dict[str, tuple[bytes, float]] = {}  # id -> (snapshot, monotonic expiry)
        self._prune_at = 1024  # expired records are dropped when the dict doubles past its last size

    async def save(self, records: Sequence[StoredSession]) -> list[str]:
        now = time.monotonic()
        for r in records:
            self._records[r.session_id] = (r.data, now + r.ttl_seconds)
        if len(self._records) >= self._prune_at:
            await self.count()
            self._prune_at = 2 * max(len(self._records), 512)
        return []  # one process: every session is ours

    async def claim(self, session_id: str) -> str | None:
        return None

    async def renew(self, session_ids: Sequence[str]) -> list[str]:
        return []

    async def release(self, session_ids: Sequence[str]) -> None:
        return None

    async def wanted(self, session_ids: Sequence[str]) -> list[str]:
        return []

    async def load(self, session_id: str) -> bytes | None:
        record = self._records.get(session_id)
        if record is None:
            return None
        if record[1] < time.monotonic():
            del self._records[session_id]
            return None
        return record[0]

    async def delete(self, session_ids: Sequence[str]) -> None:
        for session_id in session_ids:
            self._records.pop(session_id, None)

    async def count(self) -> int:
        now = time.monotonic()
        for session_id in [k for k, (_, expiry) in self._records.items() if expiry < now]:
            del self._records[session_id]
        return len(self._records)

    async def aclose(self) -> None:
        self._records.clear()

    def describe(self) -> str:
        return "memory"


def open_store(url: str, lease_s: float = 5.0) -> SessionStore:
    """The store a `--session-store` value names: "memory" or "redis://host:port/db" (whose session
    leases last `lease_s`: how long a dead replica's sessions wait before another takes them)."""
    if url in ("", "memory"):
        return MemoryStore()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from rnnserve.server.redis_store import RedisStore

        return RedisStore(url, lease_s=lease_s)
    raise ValueError(f"--session-store must be 'memory' or a redis://host:port/db URL, got {url!r}")


__all__ = ["MemoryStore", "SessionStore", "StoreUnavailable", "StoredSession", "open_store"]
