"""A session of the asyncio client, and the stream of one Generate call (see `rnnserve.client.aio`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from rnnserve.client.channel import with_metadata
from rnnserve.client.errors import FailedPreconditionError, RnnserveError, SessionDiverged, from_rpc_error
from rnnserve.client.requests import TOKENS_PER_MESSAGE, call_metadata, session_metadata
from rnnserve.client.retry import Attempts
from rnnserve.client.session_base import SessionBase, generation_diverged
from rnnserve.client.session_log import LoggedGeneration, LoggedInput
from rnnserve.client.types import FeedOutput, GeneratedToken, GenerateMessage, GenerateRecord, SessionInfo
from rnnserve.v1 import rnnserve_pb2 as pb

if TYPE_CHECKING:
    from rnnserve.client.aio import AsyncClient


class AsyncSession(SessionBase):
    """A session on the server; every `feed` goes over one long-lived bidirectional stream."""

    def __init__(self, client: AsyncClient, info: SessionInfo) -> None:
        super().__init__(info)
        self.client = client
        self._stream: Any = None
        self._lock = asyncio.Lock()

    async def feed(
        self,
        data: str | Sequence[int],
        *,
        top_k: int = 5,
        token_logprobs: bool = False,
        expected_position: int | None = None,
        end_turn: bool = False,
    ) -> FeedOutput:
        """Append text or token ids; returns the model's output after them (see `Session.feed`, retries
        and the restoring of a session the server lost messages of included; `end_turn` as there)."""
        async with self._lock:
            resync = not self._synced and expected_position is None
            if resync:
                await self.info()
            request = self._feed_request(data, top_k, token_logprobs, expected_position, end_turn)
            try:
                response = await self._send(request)
            except FailedPreconditionError:
                if not await self._catch_up(request.expected_position):
                    if not resync:
                        raise
                    await self.info()  # a cut Generate had not settled yet (see Session.feed)
                    request = self._feed_request(data, top_k, token_logprobs, None, end_turn)
                response = await self._send(request)
            return self._fed(request, response)

    async def say(
        self, text: str | Sequence[int] = "", *, top_k: int = 5, expected_position: int | None = None
    ) -> FeedOutput:
        """A turn of the conversation: `text` then <eos> in one Stream message (see `Session.say`)."""
        return await self.feed(text, top_k=top_k, expected_position=expected_position, end_turn=True)

    async def _send(self, request: pb.StreamRequest) -> pb.StreamResponse:
        """One Stream message and its answer, on a new stream for each retry (the lock held)."""
        attempts = Attempts(self.client.retry)
        while True:
            if self._stream is None:
                self._stream = self.client.stub.Stream(
                    metadata=with_metadata(self.client.metadata, session_metadata(self.id))
                )
            try:
                await self._stream.write(request)
                response = await self._stream.read()
                if response is not aio.EOF:
                    return response
                error = RnnserveError("the server ended the stream without an answer")
            except (grpc.RpcError, asyncio.InvalidStateError) as exc:
                error = await _stream_error(self._stream, exc)
            self._stream = None  # an error status ends the stream; the next attempt opens another
            delay = attempts.retry_after(error)
            if delay is None:
                raise attempts.last(error)
            await asyncio.sleep(delay)

    async def _catch_up(self, start: int) -> bool:
        """As `Session._catch_up`, with the lock held."""
        get = pb.GetSessionRequest(session_id=self.id)
        server = (await self.client._call(self.client.stub.GetSession, get)).position
        resend = self._log.resend_from(server, start)
        if resend is None:
            return False
        for entry in resend:
            if isinstance(entry, LoggedInput):
                await self._send(entry.request)
                continue
            stream = AsyncGenerateStream(self, entry.request, restoring=entry)
            async for _ in stream.messages():
                pass
            if (why := generation_diverged(entry, stream)) is not None:
                raise SessionDiverged(why)
        return True

    async def _catch_up_locked(self, start: int) -> bool:
        async with self._lock:
            return await self._catch_up(start)

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
        request_id: str = "",
        end_turn: bool = False,
    ) -> AsyncGenerateStream:
        """Sampled tokens as they are made: `async for` the result (see `Session.generate`, retries
        and `end_turn` included). The call starts when iteration does."""
        options = dict(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            max_tokens_per_message=max_tokens_per_message,
            flush_interval_ms=flush_interval_ms,
            request_id=request_id,
            end_turn=end_turn,
        )
        return AsyncGenerateStream(self, (prompt, expected_position, options))

    def reply(
        self,
        *,
        max_tokens: int = 100,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        **options: Any,
    ) -> AsyncGenerateStream:
        """The model's turn: a Generate with end_turn (see `Session.reply`); `async for` the result to
        stream it, its `text` is the reply."""
        return self.generate(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            end_turn=True,
            **options,
        )

    async def info(self) -> SessionInfo:
        get = pb.GetSessionRequest(session_id=self.id)
        return self._seen(SessionInfo.from_pb(await self.client._call(self.client.stub.GetSession, get)))

    async def fork(self, *, ttl_seconds: int = 0) -> AsyncSession:
        """See `Session.fork`."""
        request = pb.ForkSessionRequest(session_id=self.id, ttl_seconds=ttl_seconds)
        info = await self.client._call(self.client.stub.ForkSession, request)
        return AsyncSession(self.client, SessionInfo.from_pb(info))

    async def export(self) -> bytes:
        """See `Session.export`."""
        request = pb.ExportSessionRequest(session_id=self.id)
        response = await self.client._call(self.client.stub.ExportSession, request)
        self._seen(SessionInfo.from_pb(response.session))
        return bytes(response.snapshot)

    async def close(self) -> None:
        """See `Session.close`."""
        if self.closed:
            return
        async with self._lock:
            if self._stream is not None:
                await self._stream.done_writing()
                self._stream = None
        self.closed = True
        request = pb.CloseSessionRequest(session_id=self.id)
        await self.client._call(self.client.stub.CloseSession, request, gone_is_done=True)

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


async def _stream_error(call: Any, exc: Exception) -> RnnserveError:
    """Why a Stream call failed. A write on a stream that has already ended (e.g. reset by a proxy whose
    replica died: RST_STREAM, retried) fails in grpc.aio with INTERNAL "Internal error from Core" or
    InvalidStateError rather than the status that ended it: that status, then, once the call has it."""
    try:
        code = await asyncio.wait_for(call.code(), 5)
        details = await call.details()
    except (TimeoutError, grpc.RpcError):
        code = None
    finally:
        call.cancel()
    if code is not None and code != grpc.StatusCode.OK:
        return from_rpc_error(aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), details))
    if isinstance(exc, grpc.RpcError):
        return from_rpc_error(exc)
    return RnnserveError(f"the server ended the stream without an answer ({exc})")


class AsyncGenerateStream(GenerateRecord):
    """Tokens of one Generate call as they arrive, as `GenerateStream` for asyncio: `async for` it for
    one `GeneratedToken` at a time, or `messages()` for one `GenerateMessage` at a time (use one of the
    two, once); `tokens`, `text` and `finish_reason` as in `GenerateStream`. `await stream.aclose()` (or
    leaving `async with`) cancels the call."""

    def __init__(
        self,
        session: AsyncSession,
        request: pb.GenerateRequest | tuple[Any, int | None, dict[str, Any]],
        *,
        restoring: LoggedGeneration | None = None,
    ) -> None:
        super().__init__()
        self._session = session
        self._request = request  # or what makes it, when the call starts (the position is known then)
        self._restoring = restoring
        self._resynced = False  # see GenerateStream
        self._call: Any = None
        self._closed = False
        self._open = False  # its call counts as open on the session (see SessionBase._generate_opened)

    async def __aiter__(self) -> AsyncIterator[GeneratedToken]:
        async for message in self.messages():
            for token in message.tokens:
                yield token

    async def _start(self) -> pb.GenerateRequest:
        if isinstance(self._request, pb.GenerateRequest):
            return self._request
        session, (prompt, expected_position, options) = self._session, self._request
        async with session._lock:
            self._resynced = not session._synced and expected_position is None
            if self._resynced:
                await session.info()
            self._request = session._generate_request(prompt, expected_position, **options)
            self._open = True
        return self._request

    async def messages(self) -> AsyncIterator[GenerateMessage]:
        """The messages of the call as they arrive (each with one token or several)."""
        if self._call is not None:
            raise RnnserveError("a Generate stream can be iterated once")
        try:
            async with aclosing(self._call_messages()) as messages:
                async for message in messages:
                    yield message
        finally:  # ended, failed, or closed early (aclose, or left by the reader and finalized)
            self._over()

    def _over(self) -> None:
        """Its call is over for the session (once): see SessionBase._generate_opened."""
        if self._open:
            self._open = False
            self._session._generate_closed()

    async def _call_messages(self) -> AsyncGenerator[GenerateMessage, None]:
        session, request = self._session, await self._start()
        attempts, caught_up = Attempts(session.client.retry), self._restoring is not None
        while True:
            metadata = with_metadata(session.client.metadata, call_metadata(request))
            self._call = call = session.client.stub.Generate(request, metadata=metadata)
            try:
                async for response in call:
                    message = self.received(response)
                    if message is not None:
                        if self._restoring is None:
                            session.position = message.position
                        yield message
                break
            except grpc.RpcError as rpc_error:
                if self._closed:
                    return
                error = from_rpc_error(rpc_error)
            finally:
                call.cancel()
            if self.finish_reason:  # everything arrived; only the call's end was lost
                break
            if isinstance(error, FailedPreconditionError) and not caught_up:
                caught_up = True
                if not await session._catch_up_locked(request.expected_position):
                    if not (self._resynced and not self.tokens):
                        raise error
                    request.expected_position = (await session.info()).position  # see GenerateStream
            else:
                delay = attempts.retry_after(error)
                if delay is None:
                    raise attempts.last(error)
                await asyncio.sleep(delay)
            self.reissued()
        if self._restoring is None:
            self._over()
            session._generated(request, self)

    @property
    def request(self) -> pb.GenerateRequest | None:
        """The request as sent (its request_id, and the seed the client picked if none was given);
        None before an asyncio stream starts."""
        return self._request if isinstance(self._request, pb.GenerateRequest) else None

    @property
    def seed(self) -> int | None:
        """The sampler's seed of this call (the client picks one when none was given)."""
        return None if self.request is None else self.request.sampling.seed

    async def aclose(self) -> None:
        """Cancel the call (nothing if it has not started or has ended)."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()
        self._over()  # now, not when the reader's loop is finalized: the session's next call re-reads

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
