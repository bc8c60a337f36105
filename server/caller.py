"""Who is calling: the identity the authentication interceptor (auth.py) gives each call, read by the
parts that decide what a caller may do (which models, which sessions, how much).

The interceptor sets `CALLER` for the duration of one call; code running for that call (handlers,
engine methods awaited by them) reads it with `current_caller()`. With authentication off every call
is `ANONYMOUS`, which may do everything.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    """An authenticated token's name and what it may use."""

    name: str  # the token's name ("" when authentication is off); never the token itself
    models: frozenset[str] | None = None  # model names it may use; None: all
    # This token's own limits (None: the server's --max-sessions-per-token / --max-generates-per-token).
    max_sessions: int | None = None
    max_generates: int | None = None

    def may_use(self, model_name: str) -> bool:
        return self.models is None or model_name in self.models

    def sees(self, owner: str) -> bool:
        """Whether a session created by `owner` is visible to this caller: its own only, except that
        with authentication off (the anonymous caller) every session is."""
        return not self.name or owner == self.name


ANONYMOUS = Caller("")
CALLER: ContextVar[Caller] = ContextVar("rnnserve_caller", default=ANONYMOUS)


def current_caller() -> Caller:
    return CALLER.get()
