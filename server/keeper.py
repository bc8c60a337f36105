"""The session keeper: where sessions come from and where they go. It creates them, finds them (in
memory, or else in the session store: after idle eviction, a restart, or from another replica), closes
them, moves idle ones out of memory, and forks, exports and imports them. The store is written behind
the sessions by its Persister (persist.py); a session's content changes only in the output processor
(output.py) and, when it is made from a snapshot, in snapshot.restore.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from rnnserve.server.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from rnnserve.server.persist import Persister, stored
from rnnserve.server.quoting import quote
from rnnserve.server.repository import ModelRepository
from rnnserve.server.sessions import Session, SessionParked, SessionTable, session_not_found
from rnnserve.server.snapshot import parse_snapshot, restore, snapshot_of
from rnnserve.server.store import MemoryStore, SessionStore
from rnnserve.server.tasks import ModelTask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreOptions:
    """How sessions go to the session store (see persist.py for what a crash can lose)."""

    persist_interval_s: float = 0.05  # write-behind interval; 0: write-through (durable stores only)
    # Sessions idle this long leave memory for the store, and come back on their next message
    # (0: they stay in memory until their TTL).
    idle_ttl_s: float = 0.0


class SessionKeeper:
    """Sessions by id, wherever they are (see the module's docstring)."""

    def __init__(
        self,
        repository: ModelRepository,
        sessions: SessionTable,
        tasks: dict[str, ModelTask],
        store: SessionStore | None = None,
        options: StoreOptions | None = None,
    ) -> None:
        self.repository = repository
        self.sessions = sessions
        self.tasks = tasks  # the engine's, by model key (what each model allows)
        self.store = store or MemoryStore()
        self.options = options or StoreOptions()
        # Only a store that outlives this process is written behind the sessions (a memory store holds
        # the idle sessions moved out of the slab, nothing else).
        self.persister = (
            Persister(self.store, self.options.persist_interval_s) if self.store.durable else None
        )
        if self.persister is not None:
            self.sessions.on_release = self.persister.released
        self._reviving: dict[str, asyncio.Task[Session]] = {}

    def start(self) -> None:
        if self.persister is not None:
            self.persister.start()

    async def stop(self) -> None:
        if self.persister is not None:
            await self.persister.stop()
        await self.store.aclose()

    def create(self, model: str, version: str = "", ttl_seconds: float = 0) -> Session:
        """A new session in memory (`open` also writes it to a durable store)."""
        if not model:
            raise InvalidArgument("model is required (see ListModels for what is loaded)")
        loaded = self.repository.get(model, version)
        self.tasks[loaded.key].check_session()
        session = self.sessions.create(loaded, ttl_seconds)
        if self.persister is not None:
            self.persister.changed(session)
        return session

    async def open(self, model: str, version: str = "", ttl_seconds: float = 0) -> Session:
        """CreateSession: a new session, in the store before the answer."""
        session = self.create(model, version, ttl_seconds)
        await self._write_through(session)
        return session

    async def _write_through(self, session: Session) -> None:
        """A new session (created, forked or imported) is in a durable store before its id is answered,
        whatever the persistence mode: a crash can lose a session's last messages, which its client
        resends, but never the session itself, whose id only this answer could have told."""
        if self.persister is not None:
            try:
                await self.persister.write([session])
            except Unavailable:
                self.sessions.close(session.id)  # never answered: nobody knows its id
                raise

    async def get(self, session_id: str) -> Session:
        """The session, from memory or else from the store (after idle eviction, a restart, or written
        by another replica). NotFound if neither holds it; Unavailable if the store cannot be reached."""
        try:
            return self.sessions.get(session_id)
        except NotFound:
            pass
        task = self._reviving.get(session_id)
        if task is None:  # one load per session, however many requests ask for it meanwhile
            task = asyncio.get_running_loop().create_task(self._revive(session_id))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no warning
            self._reviving[session_id] = task
        return await asyncio.shield(task)

    async def _revive(self, session_id: str) -> Session:
        try:
            data = await self.store.load(session_id)
            if data is None:
                raise session_not_found(session_id)
            if session_id in self.sessions:  # closed and recreated meanwhile cannot happen: ids are unique
                return self.sessions.get(session_id)
            snapshot = parse_snapshot(data)
            try:
                model = self.repository.get(snapshot.model, snapshot.version)
            except NotFound as exc:
                raise FailedPrecondition(
                    f"session {quote(session_id)} is on model {snapshot.model} version {snapshot.version}, "
                    f"which this server does not serve ({exc})"
                ) from None
            session = self.sessions.create(model, snapshot.ttl_seconds, session_id=session_id)
            try:
                restore(session, snapshot)
            except Exception:
                self.sessions.close(session_id)
                raise
            self.sessions.revived(session)
            return session
        finally:
            self._reviving.pop(session_id, None)

    def use(self, session: Session) -> _Use:
        """`async with keeper.use(session) as session:` holds the session for one request, reviving
        it if it left memory meanwhile (see SessionTable.park)."""
        return _Use(self, session)

    async def close(self, session_id: str) -> int:
        """CloseSession: closes it in memory, then deletes it from the store; returns its final position.
        Closed in memory first, so that no request can write it again. If the store cannot be reached
        the call fails (UNAVAILABLE); a retry loads it back from the store and closes it again."""
        if not session_id:
            raise InvalidArgument("session_id is required")
        await self.get(session_id)  # NotFound if neither memory nor the store has it
        position = self.sessions.close(session_id).position
        await self._forget([session_id])
        return position

    async def _forget(self, session_ids: list[str]) -> None:
        if self.persister is not None:
            await self.persister.forget(session_ids)
        else:
            await self.store.delete(session_ids)

    async def sweep(self, now: float | None = None) -> tuple[int, int]:
        """Drop sessions past their TTL (here and in the store) and move sessions idle for idle_ttl
        into the store; returns (expired, parked). `now`: time.monotonic(), by default the present."""
        now = time.monotonic() if now is None else now
        expired = self.sessions.expire(now)
        if expired:
            try:
                await self._forget(expired)
            except Unavailable as exc:  # the store's own TTL drops them anyway
                log.warning("could not delete %d expired session(s) from the store: %s", len(expired), exc)
        idle_ttl = self.options.idle_ttl_s
        if not idle_ttl:
            return len(expired), 0
        idle = self.sessions.idle(now, idle_ttl)
        if not idle:
            return len(expired), 0
        used = {s.id: s.last_used for s in idle}
        if self.persister is not None:
            await self.persister.write(idle)
        else:
            await self.store.save([stored(s) for s in idle])
        # Only those still idle: a request that took one meanwhile keeps it in memory.
        parked = [s for s in idle if not s.lock.locked() and s.last_used == used[s.id] and not s.closed]
        for s in parked:
            self.sessions.park(s)
        return len(expired), len(parked)

    async def fork(self, session_id: str, ttl_seconds: float = 0) -> Session:
        """ForkSession: a new session that starts as a copy of this one (state, position, history)."""
        source = await self.get(session_id)
        async with self.use(source) as source:
            snapshot = snapshot_of(source)
            fork = self.sessions.create(source.model, ttl_seconds or source.ttl_seconds)
            restore(fork, snapshot, keep_applied=False)
        if self.persister is not None:
            self.persister.changed(fork)
        await self._write_through(fork)
        return fork

    async def export(self, session_id: str) -> tuple[Session, bytes]:
        """ExportSession: the session as snapshot bytes (it stays open)."""
        session = await self.get(session_id)
        async with self.use(session) as session:
            return session, snapshot_of(session).SerializeToString()

    async def import_(self, data: bytes, ttl_seconds: float = 0) -> Session:
        """ImportSession: a new session (a new id) from exported bytes."""
        snapshot = parse_snapshot(data)
        try:
            model = self.repository.get(snapshot.model, snapshot.version)
        except NotFound as exc:
            raise FailedPrecondition(
                f"the snapshot is of model {snapshot.model} version {snapshot.version}, which this server "
                f"does not serve ({exc})"
            ) from None
        self.tasks[model.key].check_session()
        session = self.sessions.create(model, ttl_seconds or snapshot.ttl_seconds)
        try:
            restore(session, snapshot, keep_applied=False)
        except Exception:
            self.sessions.close(session.id)
            raise
        if self.persister is not None:
            self.persister.changed(session)
        await self._write_through(session)
        return session


class _Use:
    """SessionKeeper.use: holds a session for one request; one that left memory for the store meanwhile
    (SessionParked) is revived and held instead (a class: this runs once per message)."""

    __slots__ = ("_held", "_keeper", "_session")

    def __init__(self, keeper: SessionKeeper, session: Session) -> None:
        self._keeper = keeper
        self._session = session
        self._held: AbstractAsyncContextManager[Session] | None = None

    async def __aenter__(self) -> Session:
        session = self._session
        while True:
            self._held = session.use()
            try:
                return await self._held.__aenter__()
            except SessionParked:
                session = await self._keeper.get(session.id)

    async def __aexit__(self, *exc: Any) -> bool | None:
        assert self._held is not None
        return await self._held.__aexit__(*exc)
