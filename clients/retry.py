"""When and how long the clients wait to try a call again (shared by the sync and asyncio clients)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Final

import grpc

from rnnserve.client.errors import RnnserveError

# A failed attempt with one of these may not have reached the server, or may have been applied with its
# reply lost; either way asking again (with the request's safeguards: expected_position, request_id) is
# safe. Every other status is an answer, and asking again would get it again.
RETRYABLE: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# And calls the transport cut, which are no answers either: a proxy (nginx in front of the replicas) whose
# replica died mid-call resets the client's HTTP/2 stream (gRPC: INTERNAL "Stream removed (RST_STREAM ...)")
# or ends it without a status (UNKNOWN "Stream removed (Data frame with END_STREAM flag received)"). The
# next attempt goes to another replica, which takes the session over.
CUT: Final = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
CUT_MARKERS: Final = ("Stream removed", "RST_STREAM")


def retryable(error: RnnserveError) -> bool:
    """Whether a failed attempt may be made again (see RETRYABLE and CUT)."""
    if error.code in RETRYABLE:
        return True
    return error.code in CUT and any(marker in error.message for marker in CUT_MARKERS)


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries a call that failed with UNAVAILABLE or DEADLINE_EXCEEDED.

    At most `max_attempts` attempts in all (1: no retry). Before retry n (from 0) the client waits a
    random time in [0, min(max_backoff_s, initial_backoff_s * multiplier**n)] ("full jitter", so that
    clients cut off together do not come back together).
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and the multiplier >= 1")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0 for the first)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)
        return random.uniform(0.0, cap)


class _Default:
    """The `retry` argument left out: the policy from the environment."""

    def __repr__(self) -> str:
        return "DEFAULT_RETRY"


DEFAULT_RETRY: Final = _Default()
RetryArg = RetryPolicy | None | _Default


def resolve_policy(retry: RetryArg) -> RetryPolicy | None:
    """The policy a client uses: the one given, None (no retries), or by default RetryPolicy() with
    max_attempts from $RNNSERVE_RETRY_ATTEMPTS when set (1 or 0: no retries)."""
    if not isinstance(retry, _Default):
        return retry
    attempts = os.environ.get("RNNSERVE_RETRY_ATTEMPTS", "").strip()
    if not attempts:
        return RetryPolicy()
    return RetryPolicy(max_attempts=int(attempts)) if int(attempts) > 1 else None


class Attempts:
    """The attempts of one operation: whether an error is retried, and after how long."""

    def __init__(self, policy: RetryPolicy | None) -> None:
        self.policy = policy
        self.made = 1  # attempts made so far, the one in progress included
        self.first: RnnserveError | None = None  # why the first attempt failed, once retried

    @property
    def retried(self) -> bool:
        """Whether an earlier attempt failed in a way that may have been applied anyway."""
        return self.made > 1

    def retry_after(self, error: RnnserveError) -> float | None:
        """Seconds to wait before the next attempt, or None: give up and raise `error`."""
        policy = self.policy
        if policy is None or not retryable(error) or self.made >= policy.max_attempts:
            return None
        delay = policy.backoff(self.made - 1)
        self.made += 1
        self.first = self.first or error
        return delay

    def last(self, error: RnnserveError) -> RnnserveError:
        """The error to raise when giving up: `error`, saying why the first attempt failed when that
        differs (a draining server says it is shutting down; the retries then find no server at all)."""
        first = self.first
        if first is None or first.message == error.message:
            return error
        note = f" (attempt {self.made}; the first failed with {first.code.name}: {first.message})"
        return type(error)(error.message + note, error.code)
