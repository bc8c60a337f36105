"""Sessions and the in-memory session store.

A session is one conversation with one model version: its recurrent state (fixed size whatever the
history length), how many tokens it has consumed, and the next-token distribution after the last one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Callable
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

    It cannot be replayed token by token: a retry of it is refused, saying where it ended, and a retry
    of the message before it is refused too (the session moved on)."""

    start_position: int  # the session's position when the Generate began (before its prompt)


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
        if session.closed:  # closed while this request waited for the one before it
            self._release()
            raise session_not_found(session.id)
        session.touch()
        return session

    async def __aexit__(self, *exc: object) -> None:
        self.session.on_close = None
        self._release()

    def _release(self) -> None:
        session = self.session
        session.lock.release()
        session.free_slot_if_closed()


def session_not_found(session_id: str) -> NotFound:
    return NotFound(
        f"session {quote(session_id)} does not exist (closed, expired after its idle TTL, "
        "or created on another server); create a new one"
    )


@dataclass(frozen=True)
class SessionLimits:
    max_sessions: int = 10_000
    default_ttl_seconds: float = 600.0
    max_ttl_seconds: float = 24 * 3600.0


class SessionStore:
    """Sessions by id, with a size limit and idle expiry."""

    def __init__(self, limits: SessionLimits | None = None) -> None:
        self.limits = limits or SessionLimits()
        self._sessions: dict[str, Session] = {}
        self._slabs: dict[str, StateSlab] = {}

    def slab(self, model: LoadedModel) -> StateSlab:
        """The state slab of a model version, sized for max_sessions plus scratch slots."""
        slab = self._slabs.get(model.key)
        if slab is None:
            capacity = 2 * self.limits.max_sessions + CLASSIFY_SLOTS
            slab = self._slabs[model.key] = StateSlab(model.manifest.state, capacity)
        return slab

    def create(self, model: LoadedModel, ttl_seconds: float = 0) -> Session:
        """A new session at the model's initial state."""
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
        slab = self.slab(model)
        session = Session(
            id=uuid.uuid4().hex,
            model=model,
            slab=slab,
            slot=slab.allocate(),
            ttl_seconds=ttl_seconds or self.limits.default_ttl_seconds,
        )
        self._sessions[session.id] = session
        metrics.session_opened(model.key)
        return session

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
        session.close()
        metrics.session_closed(session.model.key)
        return session

    def evict_expired(self, now: float | None = None) -> int:
        """Drop idle sessions past their TTL at `now` (time.monotonic(), by default the present);
        returns how many were dropped."""
        now = time.monotonic() if now is None else now
        expired = [sid for sid, s in self._sessions.items() if s.expired(now)]
        for sid in expired:
            session = self._sessions.pop(sid)
            session.close()
            metrics.session_evicted(session.model.key)
        return len(expired)

    def __len__(self) -> int:
        return len(self._sessions)
