"""The client's log of a session's recent inputs, to put a session back where the client left it.

A server that persists sessions write-behind can come back from a restart with a session a few messages
behind the client. Every message a client sends carries the position it expects, so the server refuses
the next one (FAILED_PRECONDITION) and says where it is; the client then resends, in order, what it
sent from there. This module decides what to resend; it does no I/O, so both clients share it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from rnnserve.client.errors import SessionDiverged
from rnnserve.v1 import rnnserve_pb2 as pb

MAX_MESSAGES = 256
MAX_TOKENS = 65_536


@dataclass(frozen=True)
class LoggedInput:
    """A Stream message the server applied: from position `start` to `end`."""

    start: int
    end: int
    request: pb.StreamRequest  # with expected_position = start

    @property
    def what(self) -> str:
        return f"a feed of {self.end - self.start} tokens"


@dataclass(frozen=True)
class LoggedGeneration:
    """A Generate call that finished: resent as the identical request (same seed, same request_id), it
    makes the same tokens from the same state."""

    start: int
    end: int
    request: pb.GenerateRequest  # with expected_position = start, a seed and a request_id
    token_ids: tuple[int, ...]

    @property
    def what(self) -> str:
        return f"a generation of {len(self.token_ids)} tokens"


Entry = LoggedInput | LoggedGeneration


class SessionLog:
    """The last messages applied to one session, back to back, bounded by `max_messages` messages and
    `max_tokens` positions (the oldest go first). `floor` is the oldest position it can restore from."""

    def __init__(self, position: int, *, max_messages: int = MAX_MESSAGES, max_tokens: int = MAX_TOKENS):
        self.max_messages = max_messages
        self.max_tokens = max_tokens
        self._entries: deque[Entry] = deque()
        self._tokens = 0
        self.floor = position

    @property
    def end(self) -> int:
        """The position after the last logged message."""
        return self._entries[-1].end if self._entries else self.floor

    @property
    def entries(self) -> Sequence[Entry]:
        return tuple(self._entries)

    def reset(self, position: int) -> None:
        """Forget everything: the session is at `position`, from a source the log did not see."""
        self._entries.clear()
        self._tokens = 0
        self.floor = position

    def add(self, entry: Entry) -> None:
        if entry.start != self.end:  # not after the last one: what came between is unknown
            self.reset(entry.start)
        self._entries.append(entry)
        self._tokens += entry.end - entry.start
        while self._entries and (len(self._entries) > self.max_messages or self._tokens > self.max_tokens):
            old = self._entries.popleft()
            self._tokens -= old.end - old.start
            self.floor = old.end

    def resend_from(self, server_position: int, client_position: int) -> list[Entry] | None:
        """What to resend, in order, to bring a session the server has at `server_position` to
        `client_position`, where the client's next message starts.

        None when there is nothing to do about it: the server is not behind, or the client's message
        does not start where the log ends (a position the caller chose). SessionDiverged when the server
        is behind but the log cannot bridge the gap.
        """
        if server_position >= client_position or client_position != self.end:
            return None
        lost = (
            f"positions {server_position} to {client_position} ({client_position - server_position} tokens)"
        )
        if server_position < self.floor:
            raise SessionDiverged(
                f"the server lost {lost} of the session, and this client keeps its inputs only from "
                f"position {self.floor} (the last {self.max_messages} messages / {self.max_tokens} "
                "tokens): the session cannot be restored"
            )
        resend = [e for e in self._entries if e.start >= server_position]
        if not resend or resend[0].start != server_position:
            inside = next(e for e in self._entries if e.start < server_position < e.end)
            raise SessionDiverged(
                f"the server lost {lost} of the session, and its position falls inside {inside.what} "
                f"(positions {inside.start} to {inside.end}): the session cannot be restored"
            )
        return resend
