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

from rnnserve.server.caller import Caller, current_caller
from rnnserve.server.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from rnnserve.server.persist import Persister, stored
from rnnserve.server.quoting import quote
from rnnserve.server.repository import LoadedModel, ModelRepository
from rnnserve.server.sessions import Session, SessionParked, SessionTable, session_not_found
from rnnserve.server.snapshot import parse_snapshot, restore, snapshot_of
from rnnserve.server.store import MemoryStore, SessionStore
from rnnserve.server.tasks import ModelTask
from rnnserve.v1 import rnnserve_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreOptions:
    """How sessions go to the session store (see persist.py for what a crash can lose)."""

    persist_interval_s: float = 0.05  # write-behind interval; 0: write-through (durable stores only)
    lease_s: float = 5.0  # a session's lease (shared stores): its owner renews it every third of this
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
            Persister(self.store, self.options.persist_interval_s, self._lost) if self.store.durable else None
        )
        if self.persister is not None:
            self.sessions.on_release = self.persister.released
        self._reviving: dict[str, asyncio.Task[Session]] = {}
        self._renewer: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.persister is not None:
            self.persister.start()
            self._renewer = asyncio.get_running_loop().create_task(self._renew_leases())

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        if self.persister is not None:
            await self.persister.stop()
            try:  # another replica may take our sessions at once, not after their leases run out
                await self.store.release(self.sessions.ids())
            except Unavailable as exc:
                log.warning("could not release the sessions' leases: %s", exc)
        await self.store.aclose()

    async def _renew_leases(self) -> None:
        """Keep the leases of the sessions held here, three times per lease; drop those taken over, and
        hand over the idle ones another replica asked for."""
        interval = self.options.lease_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                ids = self.sessions.ids()
                lost = await self.store.renew(ids)
                if lost:
                    self._lost(lost)
                wanted = await self.store.wanted(ids)
                if wanted:
                    await self._hand_over(wanted)
            except Unavailable as exc:
                log.warning("could not renew the sessions' leases: %s", exc)

    async def _hand_over(self, session_ids: list[str]) -> None:
        """Another replica was asked for these sessions (the balancer routes them there now, e.g. after
        replicas came or went): the ones no request holds leave memory for the store, lease released,
        so that replica takes them at its caller's next retry. Busy ones are handed over later."""
        idle = [
            s
            for s in (self.sessions.get(i) for i in session_ids if i in self.sessions)
            if not s.lock.locked() and not s.closed
        ]
        if not idle or self.persister is None:
            return
        await self.persister.write(idle)
        moving = [s for s in idle if not s.lock.locked() and not s.closed]  # not taken meanwhile
        for s in moving:
            self.sessions.park(s)
        await self.store.release([s.id for s in moving])

    def _lost(self, session_ids: list[str]) -> None:
        """Another replica owns these sessions now (ours lapsed, e.g. while this process was paused):
        they leave memory unwritten; a request waiting for one looks it up again and is told to retry."""
        log.warning("%d session(s) were taken over by another replica: dropped here", len(session_ids))
        for session_id in session_ids:
            if session_id in self.sessions:
                self.sessions.park(self.sessions.get(session_id))

    def create(self, model: str, version: str = "", ttl_seconds: float = 0) -> Session:
        """A new session in memory (`open` also writes it to a durable store)."""
        if not model:
            raise InvalidArgument("model is required (see ListModels for what is loaded)")
        caller = check_model(model)
        loaded = self.repository.get(model, version)
        self.tasks[loaded.key].check_session()
        session = self.sessions.create(
            loaded, ttl_seconds, owner=caller.name, owner_limit=caller.max_sessions
        )
        if self.persister is not None:
            self.persister.changed(session)
        return session

    async def open(self, model: str, version: str = "", ttl_seconds: float = 0) -> Session:
        """CreateSession: a new session, in the store before the answer."""
        session = self.create(model, version, ttl_seconds)
        await self._publish(session)
        return session

    async def _publish(self, session: Session) -> None:
        """A new session (created, forked or imported) is in a durable store before its id is answered,
        whatever the persistence mode: a crash can lose a session's last messages, which its client
        resends, but never the session itself, whose id only this answer could have told.

        It then leaves memory, with no owner: the replica that answered is any replica (a balancer
        spreads calls without a session), and the first call that uses the session, on the replica
        its id is routed to, loads it and becomes its owner."""
        if self.persister is None:
            return
        try:
            if await self.persister.write([session]):  # a fresh id is nobody's: cannot happen
                raise Unavailable(f"session {session.id} is owned elsewhere; retry")
        except Unavailable:
            self.sessions.close(session.id)  # never answered: nobody knows its id
            raise
        self.sessions.park(session)
        await self.store.release([session.id])

    async def get(self, session_id: str) -> Session:
        """The session, from memory or else from the store (after idle eviction, a restart, or written
        by another replica). NotFound if neither holds it, or if it is another token's (the same NotFound:
        a caller cannot tell another's session from a missing one); Unavailable if the store cannot be
        reached."""
        try:
            session = self.sessions.get(session_id)
        except NotFound:
            if current_caller().name:
                await self._check_stored_owner(session_id)
            session = await self._load(session_id)
        if not current_caller().sees(session.owner):
            raise session_not_found(session_id)
        return session

    async def _check_stored_owner(self, session_id: str) -> None:
        """NotFound, as for a missing session, when the stored session is another token's: checked before
        its lease is looked at, so a caller learns nothing of other tokens' sessions (not even that a
        replica holds one)."""
        data = await self.store.load(session_id)
        if data is not None and not current_caller().sees(parse_snapshot(data).owner):
            raise session_not_found(session_id)

    async def _load(self, session_id: str) -> Session:
        task = self._reviving.get(session_id)
        if task is None:  # one load per session, however many requests ask for it meanwhile
            task = asyncio.get_running_loop().create_task(self._revive(session_id))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no warning
            self._reviving[session_id] = task
        return await asyncio.shield(task)

    async def _revive(self, session_id: str) -> Session:
        try:
            holder = await self.store.claim(session_id)  # before loading: its owner writes no more
            if holder is not None:
                raise Unavailable(
                    f"session {quote(session_id)} is held by another replica ({holder}); retry: calls go "
                    f"to it, or here once its lease ({self.options.lease_s:g} s) runs out if it is gone"
                )
            data = await self.store.load(session_id)
            if data is None:
                raise session_not_found(session_id)
            if session_id in self.sessions:  # closed and recreated meanwhile cannot happen: ids are unique
                return self.sessions.get(session_id)
            snapshot = parse_snapshot(data)
            model = self._model_of(snapshot, f"session {quote(session_id)} is")
            session = self.sessions.create(
                model, snapshot.ttl_seconds, session_id=session_id, owner=snapshot.owner
            )
            try:
                restore(session, snapshot)
            except Exception:
                self.sessions.close(session_id)
                raise
            self.sessions.revived(session)
            return session
        finally:
            self._reviving.pop(session_id, None)

    def _model_of(self, snapshot: pb.SessionSnapshot, what: str) -> LoadedModel:
        """The model version a snapshot is of; FailedPrecondition when this server does not serve it."""
        try:
            return self.repository.get(snapshot.model, snapshot.version)
        except NotFound as exc:
            raise FailedPrecondition(
                f"{what} on model {snapshot.model} version {snapshot.version}, which this server does not "
                f"serve ({exc})"
            ) from None

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
        await self.store.release([s.id for s in parked])
        return len(expired), len(parked)

    async def fork(self, session_id: str, ttl_seconds: float = 0) -> Session:
        """ForkSession: a new session that starts as a copy of this one (state, position, history)."""
        source = await self.get(session_id)
        caller = check_model(source.model.manifest.name)
        async with self.use(source) as source:
            snapshot = snapshot_of(source)
            fork = self.sessions.create(
                source.model,
                ttl_seconds or source.ttl_seconds,
                owner=caller.name,
                owner_limit=caller.max_sessions,
            )
            restore(fork, snapshot, keep_applied=False)
        if self.persister is not None:
            self.persister.changed(fork)
        await self._publish(fork)
        return fork

    async def export(self, session_id: str) -> tuple[Session, bytes]:
        """ExportSession: the session as snapshot bytes (it stays open)."""
        session = await self.get(session_id)
        async with self.use(session) as session:
            return session, snapshot_of(session).SerializeToString()

    async def import_(self, data: bytes, ttl_seconds: float = 0) -> Session:
        """ImportSession: a new session (a new id) from exported bytes."""
        snapshot = parse_snapshot(data)
        caller = check_model(snapshot.model)
        model = self._model_of(snapshot, "the snapshot is")
        self.tasks[model.key].check_session()
        # The importer owns it, whoever exported it (the snapshot's owner is not kept).
        session = self.sessions.create(
            model, ttl_seconds or snapshot.ttl_seconds, owner=caller.name, owner_limit=caller.max_sessions
        )
        try:
            restore(session, snapshot, keep_applied=False)
        except Exception:
            self.sessions.close(session.id)
            raise
        if self.persister is not None:
            self.persister.changed(session)
        await self._publish(session)
        return session


def check_model(model: str) -> Caller:
    """The caller, if it may use `model` (by name); PermissionDenied otherwise (before the name is
    looked up: a token learns nothing about models it may not use)."""
    caller = current_caller()
    if not caller.may_use(model):
        allowed = ", ".join(sorted(caller.models or ())) or "none"
        raise PermissionDenied(
            f"token {quote(caller.name)} may not use model {quote(model)} (it may use: {allowed}); "
            "ask the server's operator to add the model to the token's entry"
        )
    return caller


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
