"""Sessions and the in-memory session store.

A session is one conversation with one model version: its recurrent state (fixed size whatever the
history length), how many tokens it has consumed, and the next-token distribution after the last one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rnnserve.server import metrics
from rnnserve.server.errors import InvalidArgument, NotFound, ResourceExhausted
from rnnserve.server.quoting import quote
from rnnserve.server.repository import LoadedModel
from rnnserve.server.slab import State, StateSlab

RECENT_TOKENS = 8  # context kept so generated text joins the prompt correctly (e.g. word spacing)
# Slots beyond one per session, for work in flight that is not a session yet: a long input runs into a
# scratch slot before it is committed (at most one per session: a request holds its session), and a
# streaming Classify runs each text in one (at most CLASSIFY_SLOTS at once per model; more texts wait
# for a slot, see tasks.StreamingClassifierTask). So no request ever fails for want of a slot while
# sessions are under max_sessions. The slab's pages are touched only as rows are used (see slab.py).
CLASSIFY_SLOTS = 256


@dataclass
class AppliedInput:
    """The last input applied to a session, kept so a retry of it is answered without re-applying."""

    start_position: int
    tokens: tuple[int, ...]
    result: Any


@dataclass
class AppliedGeneration:
    """A Generate was the last message applied to a session (its prompt or any token of it).

    A retry with its request_id (and the same request: `digest`) gets the tokens it made, from the
    start, and goes on if it was cut short: the tokens are recorded as they are applied, with what
    rebuilds their text (`recent_before`) and what continues sampling exactly (`seed`: the sampler's
    stream after n tokens is the seed's stream after n draws). Without a request_id, a retry of it is
    refused, saying where it ended, and a retry of the message before it is refused too."""

    start_position: int  # the session's position when the Generate began (before its prompt)
    request_id: str = ""
    digest: bytes = b""  # of the request as sent (see generation.request_digest)
    seed: int = 0  # the sampler's seed (the server's choice when the request gave none)
    first_position: int = -1  # after the prompt, before the first generated token (-1: not yet)
    recent_before: tuple[int, ...] = ()  # recent tokens at first_position
    token_ids: list[int] = field(default_factory=list)  # the tokens made so far, in order
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # set with its last token
    # end_turn: the last of token_ids is the <eos> appended after the generation finished (not sampled)
    appended_eos: bool = False


Applied = AppliedInput | AppliedGeneration


@dataclass(slots=True)
class Session:
    """Server-side state of one client conversation with one model version.

    Its recurrent state is row `slot` of the model's state slab (see slab.py).
    """

    id: str
    model: LoadedModel
    slab: StateSlab = field(repr=False)
    slot: int
    ttl_seconds: float
    position: int = 0
    # Log-probabilities of the next token after the last consumed one: [vocab]; None before any token.
    next_logprobs: np.ndarray | None = None
    # A streaming classifier's class probabilities for the text so far: [classes]; None before any token.
    class_probs: np.ndarray | None = None
    recent_tokens: deque[int] = field(default_factory=lambda: deque(maxlen=RECENT_TOKENS))
    # The last message applied, recorded in the same synchronous step that changes state and position.
    last_applied: Applied | None = None
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    # One request at a time per session: two streams on one session apply their inputs in turn.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False  # closed or expired; its slot is freed once no request holds the session
    # Called once when the session closes while a request holds it (a Generate stops generating).
    on_close: Callable[[], None] | None = None
    # Called when a request lets go of the session, with whether it succeeded (persist.py writes it).
    on_release: Callable[[Session, bool], Awaitable[None]] | None = field(default=None, repr=False)
    parked: bool = False  # it left memory for the session store (see SessionTable.park)
    # The name of the token that created it ("" with authentication off): only that token sees it.
    owner: str = ""

    @property
    def state(self) -> State:
        """A copy of the session's state in the graph's layout: name -> [layers * directions, 1, hidden]."""
        return self.slab.read(self.slot)

    def use(self) -> _Held:
        """`async with session.use():` holds the session for one request (one at a time), and counts as
        a use (the idle TTL starts again). Raises NotFound if the session is closed by the time the
        request gets it (requests queued behind a request that was holding it when it closed); a close
        while held frees its slot when the request ends."""
        return _Held(self)

    def close(self) -> None:
        """Mark closed (once); the slot goes back to the slab now, or when the request holding it ends.
        Requests still waiting for the session get NotFound."""
        if self.closed:
            return
        self.closed = True
        if not self.lock.locked():
            self.free_slot_if_closed()
        elif self.on_close is not None:
            self.on_close()

    def free_slot_if_closed(self) -> None:
        """The one place a session's slot goes back to the slab: exactly once, when it is closed and no
        request holds it."""
        if self.closed and self.slot >= 0:
            slot, self.slot = self.slot, -1
            self.slab.free(slot)

    def touch(self) -> None:
        self.last_used = time.monotonic()

    @property
    def expires_at(self) -> float:
        """Unix time after which the session may be dropped if left idle."""
        return time.time() + self.ttl_seconds - (time.monotonic() - self.last_used)

    def expired(self, now: float) -> bool:
        return now - self.last_used > self.ttl_seconds and not self.lock.locked()


class _Held:
    """The context manager of Session.use (a class: cheaper than a generator, once per message)."""

    __slots__ = ("session",)

    def __init__(self, session: Session) -> None:
        self.session = session

    async def __aenter__(self) -> Session:
        session = self.session
        await session.lock.acquire()
        if session.closed:  # closed (or parked) while this request waited for the one before it
            self._release()
            if session.parked:
                raise SessionParked(session.id)
            raise session_not_found(session.id)
        session.touch()
        return session

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        session = self.session
        session.on_close = None
        try:
            if session.on_release is not None:
                await session.on_release(session, exc_type is None)
        finally:
            self._release()

    def _release(self) -> None:
        session = self.session
        session.lock.release()
        session.free_slot_if_closed()


class SessionParked(NotFound):
    """The session left memory for the session store while a request waited for it: the request
    looks it up again (Engine._use), which revives it."""


def session_not_found(session_id: str) -> NotFound:
    return NotFound(
        f"session {quote(session_id)} does not exist (closed, expired after its idle TTL, "
        "or created on another server); create a new one"
    )


@dataclass(frozen=True)
class SessionLimits:
    max_sessions: int = 10_000
    # Sessions one token (a session owner) may hold at once; 0: no limit but max_sessions. A token's
    # own limit (Caller.max_sessions) overrides it.
    max_sessions_per_owner: int = 0
    default_ttl_seconds: float = 600.0
    max_ttl_seconds: float = 24 * 3600.0


class SessionTable:
    """The sessions held in memory (hot: their state in a slab row), by id, with a size limit and idle
    expiry. What a session is outside memory lives in the session store (store.py, persist.py)."""

    def __init__(self, limits: SessionLimits | None = None) -> None:
        self.limits = limits or SessionLimits()
        self._sessions: dict[str, Session] = {}
        self._slabs: dict[str, StateSlab] = {}
        self._owned: dict[str, int] = {}  # sessions in memory by owner (those with an owner)
        # Given to every session: called when a request lets go of it (persist.Persister.released).
        self.on_release: Callable[[Session, bool], Awaitable[None]] | None = None

    def slab(self, model: LoadedModel) -> StateSlab:
        """The state slab of a model version, sized for max_sessions plus scratch slots."""
        slab = self._slabs.get(model.key)
        if slab is None:
            capacity = 2 * self.limits.max_sessions + CLASSIFY_SLOTS
            slab = self._slabs[model.key] = StateSlab(model.manifest.state, capacity)
        return slab

    def drop_slab(self, model_key: str) -> None:
        """Forget a model version's slab (it is unloaded: no session is left on it)."""
        self._slabs.pop(model_key, None)

    def count_for(self, model_key: str) -> int:
        """Open sessions on a model version (O(sessions): for reloads, not per request)."""
        return sum(1 for s in self._sessions.values() if s.model.key == model_key)

    def create(
        self,
        model: LoadedModel,
        ttl_seconds: float = 0,
        session_id: str = "",
        owner: str = "",
        owner_limit: int | None = None,
    ) -> Session:
        """A new session at the model's initial state (with `session_id`: one revived from the store).
        `owner`: the token creating it; a new one is refused when that owner already holds its limit
        (`owner_limit`, else the table's max_sessions_per_owner; 0 = none)."""
        if ttl_seconds < 0 or ttl_seconds > self.limits.max_ttl_seconds:
            raise InvalidArgument(
                f"ttl_seconds must be in [0, {self.limits.max_ttl_seconds:.0f}] (0 = server default), "
                f"got {ttl_seconds}"
            )
        # The server's sweeper drops expired sessions every few seconds; a full store sweeps first here
        # too (an O(sessions) scan, so not on every create).
        if len(self._sessions) >= self.limits.max_sessions:
            self.evict_expired()
        if len(self._sessions) >= self.limits.max_sessions:
            raise ResourceExhausted(
                f"the server holds its maximum of {self.limits.max_sessions} sessions; "
                "close sessions you no longer need or retry later"
            )
        if owner and not session_id:
            self._check_owner_limit(owner, owner_limit)
        slab = self.slab(model)
        session = Session(
            id=session_id or uuid.uuid4().hex,
            model=model,
            slab=slab,
            slot=slab.allocate(),
            ttl_seconds=ttl_seconds or self.limits.default_ttl_seconds,
            on_release=self.on_release,
            owner=owner,
        )
        self._sessions[session.id] = session
        if owner:
            self._owned[owner] = self._owned.get(owner, 0) + 1
        metrics.SESSIONS_ACTIVE.labels(model.key).inc()
        if not session_id:
            metrics.SESSIONS_CREATED.labels(model.key).inc()
        return session

    def _check_owner_limit(self, owner: str, owner_limit: int | None) -> None:
        limit = self.limits.max_sessions_per_owner if owner_limit is None else owner_limit
        if limit and self._owned.get(owner, 0) >= limit:
            self.evict_expired()  # (an O(sessions) scan, only for a token at its limit)
        if limit and self._owned.get(owner, 0) >= limit:
            raise ResourceExhausted(
                f"token {quote(owner)} holds its maximum of {limit} open sessions "
                "(max sessions per token); close sessions you no longer need, or retry once idle ones "
                f"expire (after their TTL, default {self.limits.default_ttl_seconds:g} s)"
            )

    def owned_by(self, owner: str) -> int:
        """Sessions in memory created by this owner (token name)."""
        return self._owned.get(owner, 0)

    def _disown(self, session: Session) -> None:
        if session.owner:
            left = self._owned.get(session.owner, 0) - 1
            if left > 0:
                self._owned[session.owner] = left
            else:
                self._owned.pop(session.owner, None)

    def revived(self, session: Session) -> None:
        metrics.SESSIONS_REVIVED.labels(session.model.key).inc()

    def ids(self) -> list[str]:
        return list(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def idle(self, now: float, idle_seconds: float) -> list[Session]:
        """Sessions no request holds, unused for more than idle_seconds at `now` (time.monotonic())."""
        return [
            s for s in self._sessions.values() if now - s.last_used > idle_seconds and not s.lock.locked()
        ]

    def park(self, session: Session) -> None:
        """The session is in the store: let it leave memory (its slot is freed). A request that was
        waiting for it gets SessionParked and revives it. Parking a session that already left (two
        parts of the server moving it out across an await, e.g. the idle sweep and a new session's
        publication) does nothing."""
        if self._sessions.get(session.id) is not session:
            return
        del self._sessions[session.id]
        self._disown(session)
        session.parked = True
        session.close()
        metrics.SESSIONS_ACTIVE.labels(session.model.key).dec()
        metrics.SESSIONS_PARKED.labels(session.model.key).inc()

    def get(self, session_id: str) -> Session:
        if not session_id:
            raise InvalidArgument("session_id is required")
        session = self._sessions.get(session_id)
        if session is None:
            raise session_not_found(session_id)
        # A lookup is not a use: it does not restart the idle TTL (see GetSession in the .proto).
        return session

    def close(self, session_id: str) -> Session:
        session = self.get(session_id)
        del self._sessions[session_id]
        self._disown(session)
        session.close()
        metrics.session_closed(session.model.key)
        return session

    def evict_expired(self, now: float | None = None) -> int:
        """Drop idle sessions past their TTL at `now` (time.monotonic(), by default the present);
        returns how many were dropped."""
        return len(self.expire(now))

    def expire(self, now: float | None = None) -> list[str]:
        """Drop idle sessions past their TTL at `now` (time.monotonic(), by default the present);
        returns their ids."""
        now = time.monotonic() if now is None else now
        expired = [sid for sid, s in self._sessions.items() if s.expired(now)]
        for sid in expired:
            session = self._sessions.pop(sid)
            self._disown(session)
            session.close()
            metrics.session_evicted(session.model.key)
        return expired

    def __len__(self) -> int:
        return len(self._sessions)
