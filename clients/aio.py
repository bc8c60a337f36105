"""The asyncio Python client: the same API as `rnnserve.client.Client`, with `await` and `async for`.

async with AsyncClient("localhost:50051") as client, client.session("demo") as session:
    out = await session.feed("def ")
    async for token in session.generate(max_tokens=50, seed=1):
        print(token.text, end="")

`client.session(...)` and `client.attach(...)` are used like the sync client's (`async with ... as s`,
closed at the end) or awaited for a session that stays open until `await s.close()`. Retries follow the
same rules as the sync client's (see `Client`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Generator, Sequence
from types import TracebackType
from typing import Any

import grpc

from rnnserve.client.aio_session import AsyncGenerateStream, AsyncSession
from rnnserve.client.channel import TLSArg, connection, open_aio_channel, with_metadata
from rnnserve.client.errors import NotFoundError, from_rpc_error
from rnnserve.client.requests import call_metadata, classify_request
from rnnserve.client.retry import DEFAULT_RETRY, Attempts, RetryArg, resolve_policy
from rnnserve.client.types import Classification, ModelInfo, ReloadResult, SessionInfo
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

__all__ = ["AsyncClient", "AsyncGenerateStream", "AsyncSession", "SessionOpener"]


class AsyncClient:
    """asyncio connection to an rnnserve server (see `Client` for the arguments, `retry`, `tls` and
    `token` included, and what a retry does)."""

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
        self._channel = open_aio_channel(conn)
        self.stub = pb_grpc.RnnServeStub(self._channel)

    async def _call(self, method: Any, request: Any, *, gone_is_done: bool = False) -> Any:
        """One unary call, retried by the policy (as `Client._call`, the session header included)."""
        attempts, metadata = Attempts(self.retry), with_metadata(self.metadata, call_metadata(request))
        while True:
            try:
                return await method(request, timeout=self.timeout, metadata=metadata)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
            if gone_is_done and attempts.retried and isinstance(error, NotFoundError):
                return None
            delay = attempts.retry_after(error)
            if delay is None:
                raise attempts.last(error)
            await asyncio.sleep(delay)

    async def wait_ready(self, timeout: float = 10.0) -> bool:
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
            return True
        except TimeoutError:
            return False

    async def models(self) -> list[ModelInfo]:
        response = await self._call(self.stub.ListModels, pb.ListModelsRequest())
        return [ModelInfo.from_pb(m) for m in response.models]

    async def classify(
        self, model: str, texts: Sequence[str] | Sequence[Sequence[int]], *, version: str = ""
    ) -> list[Classification]:
        response = await self._call(self.stub.Classify, classify_request(model, texts, version))
        return [Classification.from_pb(c, response.labels) for c in response.results]

    def session(self, model: str, *, version: str = "", ttl_seconds: int = 0) -> SessionOpener:
        """A new session on `model`: `async with client.session(...) as s` closes it at the end, as
        `Client.session` does; `s = await client.session(...)` keeps it open until `await s.close()`."""
        request = pb.CreateSessionRequest(model=model, version=version, ttl_seconds=ttl_seconds)
        return SessionOpener(self._open(self.stub.CreateSession, request))

    async def _open(self, method: Any, request: Any) -> AsyncSession:
        return AsyncSession(self, SessionInfo.from_pb(await self._call(method, request)))

    def attach(self, session_id: str) -> SessionOpener:
        """A handle on an existing session (awaited, or `async with`, which closes it at the end)."""
        return SessionOpener(self._open(self.stub.GetSession, pb.GetSessionRequest(session_id=session_id)))

    def import_session(self, snapshot: bytes, *, ttl_seconds: int = 0) -> SessionOpener:
        """A new session from `export()` bytes (see `Client.import_session`)."""
        request = pb.ImportSessionRequest(snapshot=snapshot, ttl_seconds=ttl_seconds)
        return SessionOpener(self._open(self.stub.ImportSession, request))

    async def reload_models(self) -> ReloadResult:
        """See `Client.reload_models`."""
        return ReloadResult.from_pb(await self._call(self.stub.ReloadModels, pb.ReloadModelsRequest()))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class SessionOpener(Awaitable["AsyncSession"]):
    """What `AsyncClient.session`, `.attach` and `.import_session` return: an
    awaitable of the session that is also an async context manager (entering awaits it, leaving closes
    the session). Use it once, either way."""

    def __init__(self, opening: Awaitable[AsyncSession]) -> None:
        self._opening = opening
        self._session: AsyncSession | None = None

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self._opening.__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._opening
        return self._session

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._session is not None
        await self._session.__aexit__(exc_type, exc, tb)
