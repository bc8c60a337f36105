"""Typed errors raised by the engine, and the one interceptor that turns them into gRPC statuses.

Handlers never build statuses themselves: they raise one of these and `ErrorInterceptor` aborts the
call with the matching code and the message, which is written for the person reading it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from rnnserve.server import metrics

log = logging.getLogger(__name__)


class ServingError(Exception):
    """Base class: a request that cannot be served, with the gRPC code that says why."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServingError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


SHUTTING_DOWN = "server is shutting down; retry on another replica"


class ShuttingDown(Unavailable):
    """The server is draining for shutdown: new work goes elsewhere."""

    def __init__(self) -> None:
        super().__init__(SHUTTING_DOWN)


@dataclass(eq=False)
class _Call:
    """One call in flight on a drainable service."""

    task: asyncio.Task[Any] | None
    idle: bool = False  # a stream waiting for the client's next message (nothing of it in flight)
    drained: bool = False  # cancelled by the drain: ends with UNAVAILABLE, not CANCELLED


class CallTracker:
    """Calls in flight on the drainable service, and the drain that ends them on shutdown.

    While draining: new calls to `refused` methods are answered UNAVAILABLE; a stream waiting for the
    client's next message ends at once with UNAVAILABLE; a stream whose message is being processed
    answers it, then ends the same way; other calls (a Generate in flight) run to their end, until
    `cancel_all` ends what is left (UNAVAILABLE too). Lookups (GetSession, CloseSession, ListModels)
    stay open, so clients can still read and close what they have.
    """

    def __init__(self, service: str, refused: Iterable[str]) -> None:
        self.service = service
        self.refused = frozenset(refused)  # method names, e.g. "CreateSession"
        self.draining = False
        self._calls: set[_Call] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._calls)

    def enter(self) -> _Call:
        call = _Call(asyncio.current_task())
        self._calls.add(call)
        self._idle.clear()
        return call

    def leave(self, call: _Call) -> None:
        self._calls.discard(call)
        if not self._calls:
            self._idle.set()

    def begin_drain(self) -> None:
        """Refuse new work and end the streams that are waiting for their client."""
        self.draining = True
        for call in list(self._calls):
            if call.idle:
                self._cancel(call)

    def cancel_all(self) -> None:
        """End every call still in flight (with UNAVAILABLE): the grace period is over."""
        for call in list(self._calls):
            self._cancel(call)

    @staticmethod
    def _cancel(call: _Call) -> None:
        if call.task is not None and not call.drained:
            call.drained = True
            call.task.cancel()

    async def wait_finished(self, timeout: float) -> bool:
        """True once no call is in flight; False if some still are after `timeout` seconds."""
        waiter = asyncio.ensure_future(self._idle.wait())
        await asyncio.wait({waiter}, timeout=max(timeout, 0.0))
        waiter.cancel()
        return not self._calls

    async def track_requests(self, requests: AsyncIterator[Any], call: _Call) -> AsyncIterator[Any]:
        """A client stream's messages, marking the call idle while it waits for the next one."""
        iterator = requests.__aiter__()
        while True:
            if self.draining:
                raise ShuttingDown()
            call.idle = True
            try:
                request = await iterator.__anext__()
            except StopAsyncIteration:
                return
            finally:
                call.idle = False
            yield request


async def _abort(context: aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, ServingError):
        await context.abort(exc.code, str(exc))
    log.exception("internal error while serving a request")
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def _code_of(exc: BaseException, context: aio.ServicerContext) -> grpc.StatusCode:
    if isinstance(exc, ServingError):
        return exc.code
    if isinstance(exc, aio.AbortError):
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


class _Instrumented:
    """Wraps one method's handler: status mapping, metrics, and (on the drainable service) the drain."""

    def __init__(self, full_method: str, calls: CallTracker | None) -> None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        self.service, self.method = service, method
        self.calls = calls if calls is not None and service == calls.service else None
        self.refused = self.calls is not None and method in self.calls.refused
        self.in_flight = metrics.IN_FLIGHT.labels(service, method)

    def _start(self) -> _Call | None:
        if self.refused and self.calls is not None and self.calls.draining:
            raise ShuttingDown()
        self.in_flight.inc()
        return self.calls.enter() if self.calls is not None else None

    def _finish(self, started: bool, call: _Call | None, code: grpc.StatusCode) -> None:
        if started:
            self.in_flight.dec()
        if call is not None and self.calls is not None:
            self.calls.leave(call)
        metrics.request_finished(self.service, self.method, code.name)

    def _requests(self, requests: Any, call: _Call | None, client_streams: bool) -> Any:
        if client_streams and call is not None and self.calls is not None:
            return self.calls.track_requests(requests, call)
        return requests

    @staticmethod
    def _code(exc: BaseException, call: _Call | None, context: aio.ServicerContext) -> grpc.StatusCode:
        drained = call is not None and call.drained and isinstance(exc, asyncio.CancelledError)
        return grpc.StatusCode.UNAVAILABLE if drained else _code_of(exc, context)

    @staticmethod
    async def _fail(context: aio.ServicerContext, call: _Call | None, exc: BaseException) -> None:
        """Abort the call for `exc` (raises AbortError), or re-raise a cancellation by the client."""
        if isinstance(exc, asyncio.CancelledError):
            if call is None or not call.drained:
                raise exc
            exc = ShuttingDown()  # the drain's deadline ended this call
        await _abort(context, exc)

    def unary(
        self, behavior: Callable[..., Awaitable[Any]], client_streams: bool
    ) -> Callable[..., Awaitable[Any]]:
        async def wrapper(request_or_iterator: Any, context: aio.ServicerContext) -> Any:
            code, call, started = grpc.StatusCode.OK, None, False
            try:
                call, started = self._start(), True
                return await behavior(self._requests(request_or_iterator, call, client_streams), context)
            except aio.AbortError as exc:
                code = _code_of(exc, context)
                raise
            except (Exception, asyncio.CancelledError) as exc:
                code = self._code(exc, call, context)
                await self._fail(context, call, exc)
            finally:
                self._finish(started, call, code)

        return wrapper

    def streaming(
        self, behavior: Callable[..., AsyncIterator[Any]], client_streams: bool
    ) -> Callable[..., AsyncIterator[Any]]:
        async def wrapper(request_or_iterator: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            code, call, started = grpc.StatusCode.OK, None, False
            try:
                call, started = self._start(), True
                requests = self._requests(request_or_iterator, call, client_streams)
                async for response in behavior(requests, context):
                    yield response
            except aio.AbortError as exc:
                code = _code_of(exc, context)
                raise
            except GeneratorExit:
                code = grpc.StatusCode.CANCELLED
                raise
            except (Exception, asyncio.CancelledError) as exc:
                code = self._code(exc, call, context)
                await self._fail(context, call, exc)
            finally:
                self._finish(started, call, code)

        return wrapper


class ErrorInterceptor(aio.ServerInterceptor):
    """The server's one interceptor, around every handler of every service:

    - maps `ServingError` (and unexpected exceptions) raised in a handler to a gRPC status;
    - counts each call by service, method and final status (`rnnserve.server.metrics`);
    - with a `CallTracker`, tracks the calls of its service so that shutdown can drain them.
    """

    def __init__(self, calls: CallTracker | None = None) -> None:
        self.calls = calls
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}  # wrapped once per method

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return handler  # unknown method: gRPC answers UNIMPLEMENTED
            wrapped = self._handlers[method] = self._wrap(method, handler)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        wrap = _Instrumented(method, self.calls)
        if handler.unary_unary:
            return handler._replace(unary_unary=wrap.unary(handler.unary_unary, client_streams=False))
        if handler.stream_unary:
            return handler._replace(stream_unary=wrap.unary(handler.stream_unary, client_streams=True))
        if handler.unary_stream:
            return handler._replace(unary_stream=wrap.streaming(handler.unary_stream, client_streams=False))
        if handler.stream_stream:
            return handler._replace(stream_stream=wrap.streaming(handler.stream_stream, client_streams=True))
        return handler
