"""Writing sessions to the session store behind them (store.py), with a stated bound on what a crash
can lose:

- write-behind (`--persist-interval-ms N`, N > 0, the default with Redis): a session changed by a
  message is written at most about 2N ms after that message's reply (the next write, or the one after
  when a request held the session at the next one); a crash loses at most the messages answered in
  that window (plus a write in flight). The client learns the true position from the
  expected_position check and resends them (the Python client does that by itself).
- write-through (`--persist-interval-ms 0`): a message's reply goes out only after its session is in
  the store. A crash loses nothing that was answered. A Generate is written when it ends; a crash
  during one loses it, and the retried call (same request_id and seed) samples the same tokens again.

A session's snapshot is taken when a request lets go of it (and when it is created), so no run on its
state is in flight: its state, position and last applied message always go to the store together. At
most one snapshot per session waits for each write: later changes are taken at the write, or at the
next release if a request holds the session then, or as a long request (a Generate) takes it. Writes
are batched: one round trip for every session changed in an interval. All writes and deletes go through
one lock, so a close's delete is never overtaken by an older write of the same session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from rnnserve.server import metrics
from rnnserve.server.errors import LogLimiter, Unavailable
from rnnserve.server.sessions import Session
from rnnserve.server.snapshot import snapshot_of
from rnnserve.server.store import SessionStore, StoredSession, StoreUnavailable

log = logging.getLogger(__name__)

STORE_ERROR_LOG_INTERVAL_S = 30.0


def moved(session_id: str) -> Unavailable:
    return Unavailable(
        f"session {session_id} has moved to another replica (this one lost its lease, e.g. after a pause); "
        "retry: the call goes to its owner"
    )


def stored(session: Session) -> StoredSession:
    """The session's snapshot as the store keeps it (take it while no request holds the session)."""
    return StoredSession(session.id, snapshot_of(session).SerializeToString(), session.ttl_seconds)


class Persister:
    """Keeps the store up to date with the sessions in memory (see the module's docstring)."""

    def __init__(
        self, store: SessionStore, interval_s: float, on_lost: Callable[[list[str]], None] | None = None
    ) -> None:
        self.store = store
        self.interval_s = interval_s  # 0: write-through
        # Called with the sessions whose writes were refused: another replica owns them now.
        self.on_lost = on_lost
        self._dirty: dict[str, StoredSession] = {}  # snapshots not written yet, by session id
        self._stale: dict[str, Session] = {}  # changed since their snapshot in _dirty was taken
        self._lock = asyncio.Lock()
        self._errors = LogLimiter(STORE_ERROR_LOG_INTERVAL_S)
        self._task: asyncio.Task[None] | None = None

    @property
    def write_through(self) -> bool:
        return self.interval_s == 0

    @property
    def pending(self) -> int:
        """Sessions changed since their last write."""
        return len(self._dirty.keys() | self._stale.keys())

    def start(self) -> None:
        if not self.write_through and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop writing behind, after one last write of what changed (a clean shutdown loses nothing)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await self.flush()
        except StoreUnavailable as exc:
            log.error("%d session(s) changed since their last write are lost: %s", self.pending, exc)

    def changed(self, session: Session) -> None:
        """A session was created (no request holds it): write it behind."""
        self._dirty[session.id] = stored(session)

    async def released(self, session: Session, ok: bool) -> None:
        """A request let go of the session: write it behind, or now (before the reply goes out) when
        writing through and the request succeeded."""
        if session.closed:
            return
        if self.write_through and ok:
            async with self._lock:
                lost = await self._save([stored(session)])
            self._dirty.pop(session.id, None)
            if lost:
                raise moved(session.id)
        elif session.id in self._dirty:
            # A snapshot waits for the next write already: this change is taken at that write if no
            # request holds the session then, else at its next release (one snapshot per session per
            # interval, not one per message).
            self._stale[session.id] = session
        else:
            self._dirty[session.id] = stored(session)
            self._stale.pop(session.id, None)

    def holding_long(self, session: Session) -> None:
        """A request that may hold the session for long (a Generate) has just taken it: a change not in
        its pending snapshot yet is taken now, not after the request."""
        if self._stale.pop(session.id, None) is not None:
            self._dirty[session.id] = stored(session)

    async def flush(self) -> int:
        """Write every session changed since its last write; returns how many were written."""
        async with self._lock:
            for session_id, session in list(self._stale.items()):
                if session.closed:
                    del self._stale[session_id]
                elif not session.lock.locked():  # else: at its release, when no snapshot is pending
                    self._dirty[session_id] = stored(session)
                    del self._stale[session_id]
            records, self._dirty = self._dirty, {}
            if not records:
                return 0
            try:
                await self._save(list(records.values()))
            except StoreUnavailable:
                for session_id, record in records.items():  # again next time, unless superseded
                    self._dirty.setdefault(session_id, record)
                raise
        return len(records)

    async def write(self, sessions: Sequence[Session]) -> list[str]:
        """Write these sessions now (held by no request): new ones, and idle ones before they leave
        memory. Returns the ids another replica owns (not written; dropped here)."""
        async with self._lock:
            lost = await self._save([stored(s) for s in sessions])
        for s in sessions:
            self._dirty.pop(s.id, None)
            self._stale.pop(s.id, None)
        return lost

    async def forget(self, session_ids: Sequence[str]) -> None:
        """Sessions closed or expired: delete them from the store, after any write already begun."""
        for session_id in session_ids:
            self._dirty.pop(session_id, None)
            self._stale.pop(session_id, None)
        async with self._lock:
            try:
                await self.store.delete(session_ids)
            except StoreUnavailable:
                metrics.STORE_ERRORS.labels("delete").inc()
                raise

    async def _save(self, records: list[StoredSession]) -> list[str]:
        try:
            lost = await self.store.save(records)
        except StoreUnavailable:
            metrics.STORE_ERRORS.labels("save").inc()
            raise
        metrics.STORE_WRITES.inc(len(records) - len(lost))
        if lost and self.on_lost is not None:
            self.on_lost(lost)
        return lost

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush()
            except StoreUnavailable as exc:
                held = self._errors.allow()
                if held is not None:
                    log.warning(
                        "session store write failed (%d session(s) waiting, retried every %.0f ms; "
                        "%d similar failures not logged): %s",
                        self.pending,
                        self.interval_s * 1000,
                        held,
                        exc,
                    )
