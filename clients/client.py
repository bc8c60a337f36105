"""The synchronous Python client.

A `Session` keeps one bidirectional Stream open to the server and sends every `feed` on it, so a
message costs one round trip, not a new call. If the stream fails (an error status ends a gRPC
stream), the next `feed` opens a new one: the session's state lives on the server and is unharmed.
Calls that fail with UNAVAILABLE or DEADLINE_EXCEEDED are retried (see `RetryPolicy`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import grpc

from rnnserve.client.channel import DEFAULT_URL, TLS, TLSArg, connection, open_channel, with_metadata
from rnnserve.client.errors import NotFoundError, from_rpc_error
from rnnserve.client.requests import call_metadata, classify_request
from rnnserve.client.retry import DEFAULT_RETRY, Attempts, RetryArg, resolve_policy
from rnnserve.client.session import GenerateStream, Session
from rnnserve.client.types import Classification, ModelInfo, ReloadResult, SessionInfo
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

__all__ = ["DEFAULT_URL", "TLS", "Client", "GenerateStream", "Session"]


class Client:
    """Connection to an rnnserve server.

    Args:
        url: host:port of the server (default: $RNNSERVE_URL, else localhost:50051); https://host:port
            means TLS with the system's CA roots.
        tls: a `TLS` (CA file, client certificate for mTLS, server name); True: TLS with the system's
            roots; False: plaintext; None (default): TLS when $RNNSERVE_TLS_CA, $RNNSERVE_CLIENT_CERT or
            $RNNSERVE_CLIENT_KEY is set or the URL is https://, else plaintext.
        token: sent as `authorization: Bearer <token>` with every call (default $RNNSERVE_TOKEN).
        timeout: seconds for unary calls (None = no deadline), per attempt.
        max_message_bytes: largest message sent or received.
        retry: how calls that fail with UNAVAILABLE or DEADLINE_EXCEEDED (a server restarting, a
            connection dropped mid-call) are tried again: by default `RetryPolicy()`, with max_attempts
            from $RNNSERVE_RETRY_ATTEMPTS when set; None: never. Other errors are answers and are raised
            at once.

    What a retry does: lookups (models, classify, info, export, reload_models) are asked again as they
    are. A session's feeds and generations carry the position they expect (and a generation a
    request_id and a seed), so the server applies each once (see `Session.feed`). A retried
    `session()`, `fork()` or `import_session()` whose first attempt was applied but whose reply was lost
    leaves that first session orphaned on the server until its TTL expires. A retried close that finds
    the session gone (NOT_FOUND) counts as closed: an earlier attempt closed it.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: float | None = 30.0,
        max_message_bytes: int = 4 * 1024 * 1024,
        retry: RetryArg = DEFAULT_RETRY,
        tls: TLSArg = None,
        token: str | None = None,
    ) -> None:
        conn = connection(url, tls=tls, token=token, max_message_bytes=max_message_bytes)
        self.url = conn.target
        self.timeout = timeout
        self.retry = resolve_policy(retry)
        self.metadata = conn.metadata  # what every call carries besides its own (the token, in plaintext)
        self._channel = open_channel(conn)
        self.stub = pb_grpc.RnnServeStub(self._channel)

    def _call(self, method: Any, request: Any, *, gone_is_done: bool = False) -> Any:
        """One unary call, retried by the policy. `gone_is_done`: NOT_FOUND after a retried attempt
        is success (None), for calls that make something go away. A call on a session carries its id
        as metadata (`call_metadata`)."""
        attempts, metadata = Attempts(self.retry), with_metadata(self.metadata, call_metadata(request))
        while True:
            try:
                return method(request, timeout=self.timeout, metadata=metadata)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
            if gone_is_done and attempts.retried and isinstance(error, NotFoundError):
                return None
            delay = attempts.retry_after(error)
            if delay is None:
                raise attempts.last(error)
            time.sleep(delay)

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """True once the server accepts connections (False after `timeout` seconds)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
            return True
        except grpc.FutureTimeoutError:
            return False

    def models(self) -> list[ModelInfo]:
        """Every model version the server has loaded."""
        response = self._call(self.stub.ListModels, pb.ListModelsRequest())
        return [ModelInfo.from_pb(m) for m in response.models]

    def classify(
        self, model: str, texts: Sequence[str] | Sequence[Sequence[int]], *, version: str = ""
    ) -> list[Classification]:
        """Class probabilities for each text (or token id list), with a classifier model."""
        response = self._call(self.stub.Classify, classify_request(model, texts, version))
        return [Classification.from_pb(c, response.labels) for c in response.results]

    def session(self, model: str, *, version: str = "", ttl_seconds: int = 0) -> Session:
        """Open a session on `model` (latest version unless given). Use it as a context manager.

        A retry after a lost reply may leave the first attempt's session orphaned until its TTL."""
        info = self._call(
            self.stub.CreateSession,
            pb.CreateSessionRequest(model=model, version=version, ttl_seconds=ttl_seconds),
        )
        return Session(self, SessionInfo.from_pb(info))

    def attach(self, session_id: str) -> Session:
        """A handle on an existing session (e.g. one opened by another process)."""
        info = self._call(self.stub.GetSession, pb.GetSessionRequest(session_id=session_id))
        return Session(self, SessionInfo.from_pb(info))

    def import_session(self, snapshot: bytes, *, ttl_seconds: int = 0) -> Session:
        """A new session from `Session.export()` bytes (ttl_seconds 0: the snapshot's TTL).

        FailedPreconditionError when this server does not serve the snapshot's model and version (or
        its state shapes differ); InvalidArgumentError for bytes that are not a snapshot. A retry after
        a lost reply may leave the first attempt's session orphaned until its TTL."""
        request = pb.ImportSessionRequest(snapshot=snapshot, ttl_seconds=ttl_seconds)
        return Session(self, SessionInfo.from_pb(self._call(self.stub.ImportSession, request)))

    def reload_models(self) -> ReloadResult:
        """Load the model versions added to the server's repository since it started (or last reloaded)."""
        return ReloadResult.from_pb(self._call(self.stub.ReloadModels, pb.ReloadModelsRequest()))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
