"""The asyncio Python client: the same API as `rnnserve.client.Client`, with `await` and `async for`.

async with AsyncClient("localhost:50051") as client, client.session("demo") as session:
    out = await session.feed("def ")
    async for token in session.generate(max_tokens=50, seed=1):
        print(token.text, end="")

`client.session(...)` and `client.attach(...)` are used like the sync client's (`async with ... as s`,
closed at the end) or awaited for a session that stays open until `await s.close()`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Generator, Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc import aio

from rnnserve.client.client import DEFAULT_URL
from rnnserve.client.errors import RnnserveError, from_rpc_error
from rnnserve.client.requests import (
    TOKENS_PER_MESSAGE,
    channel_options,
    classify_request,
    feed_request,
    generate_request,
)
from rnnserve.client.types import (
    Classification,
    FeedOutput,
    GeneratedToken,
    GenerateMessage,
    GenerateRecord,
    ModelInfo,
    SessionInfo,
)
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc


class AsyncClient:
    """asyncio connection to an rnnserve server (see `Client` for the arguments)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: float | None = 30.0,
        max_message_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.url = url or os.environ.get("RNNSERVE_URL", DEFAULT_URL)
        self.timeout = timeout
        self._channel = aio.insecure_channel(self.url, options=channel_options(max_message_bytes))
        self.stub = pb_grpc.RnnServeStub(self._channel)

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

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
        return SessionOpener(self._create_session(request))

    async def _create_session(self, request: pb.CreateSessionRequest) -> AsyncSession:
        return AsyncSession(self, SessionInfo.from_pb(await self._call(self.stub.CreateSession, request)))

    def attach(self, session_id: str) -> SessionOpener:
        """A handle on an existing session (awaited, or `async with`, which closes it at the end)."""
        return SessionOpener(self._attach(session_id))

    async def _attach(self, session_id: str) -> AsyncSession:
        info = await self._call(self.stub.GetSession, pb.GetSessionRequest(session_id=session_id))
        return AsyncSession(self, SessionInfo.from_pb(info))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class SessionOpener(Awaitable["AsyncSession"]):
    """What `AsyncClient.session` and `.attach` return: an awaitable of the session that is also an async
    context manager (entering awaits it, leaving closes the session). Use it once, either way."""

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


class AsyncSession:
    """A session on the server; every `feed` goes over one long-lived bidirectional stream."""

    def __init__(self, client: AsyncClient, info: SessionInfo) -> None:
        self.client = client
        self.id = info.session_id
        self.model = info.model
        self.version = info.version
        self.position = info.position
        self.task = info.task
        self.labels = info.labels
        self._stream: Any = None
        self._lock = asyncio.Lock()
        self.closed = False

    async def feed(
        self,
        data: str | Sequence[int],
        *,
        top_k: int = 5,
        token_logprobs: bool = False,
        expected_position: int | None = None,
    ) -> FeedOutput:
        """Append text or token ids; returns the model's output after them (see `Session.feed`)."""
        request = feed_request(
            self.id, data, top_k=top_k, token_logprobs=token_logprobs, expected_position=expected_position
        )
        async with self._lock:
            if self._stream is None:
                self._stream = self.client.stub.Stream()
            try:
                await self._stream.write(request)
                response = await self._stream.read()
            except grpc.RpcError as error:
                self._stream = None  # an error status ends the stream; the next feed opens another
                raise from_rpc_error(error) from None
            if response is aio.EOF:
                self._stream = None
                raise RnnserveError("the server ended the stream without an answer")
        output = FeedOutput.from_pb(response, self.labels)
        self.position = output.position
        return output

    def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        max_tokens: int = 100,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        expected_position: int | None = None,
        max_tokens_per_message: int = TOKENS_PER_MESSAGE,
        flush_interval_ms: int | None = None,
    ) -> AsyncGenerateStream:
        """Sampled tokens as they are made: `async for` the result (see `Session.generate`). The call
        starts when iteration does."""
        request = generate_request(
            self.id,
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            expected_position=expected_position,
            max_tokens_per_message=max_tokens_per_message,
            flush_interval_ms=flush_interval_ms,
        )
        return AsyncGenerateStream(self, request)

    async def info(self) -> SessionInfo:
        request = pb.GetSessionRequest(session_id=self.id)
        info = SessionInfo.from_pb(await self.client._call(self.client.stub.GetSession, request))
        self.position = info.position
        return info

    async def close(self) -> None:
        if self.closed:
            return
        async with self._lock:
            if self._stream is not None:
                await self._stream.done_writing()
                self._stream = None
        self.closed = True
        await self.client._call(self.client.stub.CloseSession, pb.CloseSessionRequest(session_id=self.id))

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.close()
        except RnnserveError:
            if exc is None:
                raise


class AsyncGenerateStream(GenerateRecord):
    """Tokens of one Generate call as they arrive, as `GenerateStream` for asyncio: `async for` it for
    one `GeneratedToken` at a time, or `messages()` for one `GenerateMessage` at a time (use one of the
    two, once); `tokens`, `text` and `finish_reason` as in `GenerateStream`. `await stream.aclose()` (or
    leaving `async with`) cancels the call."""

    def __init__(self, session: AsyncSession, request: pb.GenerateRequest) -> None:
        super().__init__()
        self._session = session
        self._request = request
        self._call: Any = None

    async def __aiter__(self) -> AsyncIterator[GeneratedToken]:
        async for message in self.messages():
            for token in message.tokens:
                self._session.position = token.position
                yield token

    async def messages(self) -> AsyncIterator[GenerateMessage]:
        """The messages of the call as they arrive (each with one token or several)."""
        if self._call is not None:
            raise RnnserveError("a Generate stream can be iterated once")
        self._call = call = self._session.client.stub.Generate(self._request)
        try:
            async for response in call:
                message = self.received(response)
                self._session.position = message.position
                yield message
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def aclose(self) -> None:
        """Cancel the call (nothing if it has not started or has ended)."""
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
