"""One error hierarchy for the client, and the single place gRPC statuses are mapped onto it."""

from __future__ import annotations

import grpc


class RnnserveError(Exception):
    """A call failed; `code` is the gRPC status code, `message` the server's explanation."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgumentError(RnnserveError):
    """The request was wrong (bad token id, empty input, bad sampling parameter)."""


class NotFoundError(RnnserveError):
    """No such model, version or session."""


class FailedPreconditionError(RnnserveError):
    """The session is not where the request expected it to be, or the model cannot do this."""


class SessionDiverged(FailedPreconditionError):
    """The server's session lost messages the client cannot send again (they are older than, or do not
    line up with, the client's log of recent inputs), or a resent generation made other tokens: the
    session on the server is no longer the one this client fed. The message says what was lost."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION) -> None:
        super().__init__(message, code)


class ResourceExhaustedError(RnnserveError):
    """A server limit was hit (sessions, message size)."""


class UnavailableError(RnnserveError):
    """The server cannot be reached or is shutting down; safe to retry idempotent calls."""


class DeadlineExceededError(RnnserveError):
    """The call took longer than its timeout."""


_BY_CODE: dict[grpc.StatusCode, type[RnnserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def tls_hint(details: str) -> str:
    """gRPC's report of a failed TLS handshake (UNAVAILABLE, "...: Tls handshake failed (...): ...") led by
    what is likely wrong; other details as they are."""
    if "handshake failed" not in details.lower():
        return details
    if "WRONG_VERSION_NUMBER" in details:
        return f"TLS handshake failed: does the server serve TLS? ({details})"
    return f"TLS handshake failed: is the CA right? ({details})"


def from_rpc_error(error: grpc.RpcError) -> RnnserveError:
    """The client exception for a failed gRPC call."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    if code == grpc.StatusCode.UNAVAILABLE and details:
        details = tls_hint(details)
    return _BY_CODE.get(code, RnnserveError)(details or code.name, code)
