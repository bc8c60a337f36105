"""Typed errors raised by the engine, and the one interceptor that turns them into gRPC statuses.

Handlers never build statuses themselves: they raise one of these and `ErrorInterceptor` aborts the
call with the matching code and the message, which is written for the person reading it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from rnnserve.server import metrics
from rnnserve.server.logs import CallObserver, CallRecord
from rnnserve.server.quoting import MAX_STATUS_MESSAGE, cap_message

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


class Unauthenticated(ServingError):
    """No valid bearer token (see auth.py); the message says what is missing, never echoes a token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServingError):
    """A valid token asked for something its entry does not allow (a model not on its list)."""

    code = grpc.StatusCode.PERMISSION_DENIED


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

    def __init__(self, refused: Mapping[str, Iterable[str]]) -> None:
        # The drainable services, each with the methods refused while draining, e.g.
        # {"rnnserve.v1.RnnServe": ["CreateSession", ...]}.
        self.refused = {service: frozenset(methods) for service, methods in refused.items()}
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


# -- requests that do not parse -----------------------------------------------------------------------
# grpc.aio deserializes a request before any handler or interceptor code runs: a deserializer that
# raises (protobuf's DecodeError for corrupt bytes or a string field that is not UTF-8) ends the call
# with UNKNOWN (unary, server-streaming) or INTERNAL (client-streaming) and an ERROR traceback in the
# log, for every such request. So the interceptor swaps in a deserializer that never raises: it returns
# a `Malformed` marker, and the wrapped handler answers INVALID_ARGUMENT naming the message type.

MALFORMED_LOG_INTERVAL_S = 60.0  # at most one log line per method in this time; the rest are counted
REASON_CHARS = 200  # of the parser's complaint kept in the status message and the log


@dataclass(frozen=True)
class Malformed:
    """What the interceptor's deserializer returns in place of a request it could not parse."""

    type_name: str  # the message type the method takes, e.g. "rnnserve.v1.GetSessionRequest"
    reason: str  # what the parser said, e.g. "String field had bad UTF-8"

    def error(self, which: str = "the request") -> InvalidArgument:
        hint = (
            "string fields must be valid UTF-8"
            if "UTF-8" in self.reason
            else "send this method's request message, serialized by protobuf from the service's .proto"
        )
        return InvalidArgument(f"{which} is not a valid {self.type_name}: {self.reason} ({hint})")


def _type_name(deserializer: Callable[[bytes], Any]) -> str:
    """The full protobuf name of the message a deserializer (`SomeMessage.FromString`) builds."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return name if isinstance(name, str) else "request message"


def _parse_failure(exc: Exception) -> str:
    """The parser's complaint without protobuf's "Error parsing message with type '…': " preamble."""
    text = str(exc)
    if text.startswith("Error parsing message"):
        _, sep, rest = text.partition("': ")
        text = rest if sep else "the bytes are not a valid encoding of it"
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= REASON_CHARS else f"{text[:REASON_CHARS]}…"


def safe_deserializer(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`deserializer`, returning a `Malformed` marker instead of raising on bytes it cannot parse."""
    type_name = _type_name(deserializer)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, and whatever else a parser may raise on hostile bytes
            return Malformed(type_name, _parse_failure(exc))

    return deserialize


class LogLimiter:
    """At most one log line per `interval` seconds; counts the lines it held back in between."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.suppressed = 0
        self._next = float("-inf")

    def allow(self) -> int | None:
        """None: stay quiet (counted). Otherwise log now; the value is how many were held back."""
        now = self.clock()
        if now < self._next:
            self.suppressed += 1
            return None
        self._next = now + self.interval
        held, self.suppressed = self.suppressed, 0
        return held


# -- statuses ------------------------------------------------------------------------------------------


def status_message(text: str) -> str:
    """`text` fit for a gRPC status: within MAX_STATUS_MESSAGE characters *and* UTF-8 bytes.

    A backstop: quotes of client input are cut where they are made (`rnnserve.server.quoting`). The
    message travels percent-encoded in trailing metadata, which clients refuse above 16 KiB (and may
    refuse above 8 KiB): 2,048 bytes of UTF-8 stay under 6.2 KiB even if every byte is escaped.
    """
    data = cap_message(text).encode("utf-8", "backslashreplace")  # (a lone surrogate cannot be sent)
    if len(data) <= MAX_STATUS_MESSAGE:
        return data.decode("utf-8")
    kept = data[:MAX_STATUS_MESSAGE].decode("utf-8", "ignore")
    return f"{kept}… (message cut: {len(data) - len(kept.encode()):,} more bytes)"


async def _abort(context: aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, ServingError):
        await context.abort(exc.code, status_message(str(exc)))
    log.exception("internal error while serving a request")
    await context.abort(
        grpc.StatusCode.INTERNAL, status_message(f"internal error: {type(exc).__name__}: {exc}")
    )


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

    def __init__(
        self, full_method: str, calls: CallTracker | None, observer: CallObserver | None = None
    ) -> None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        self.observer = observer  # the access log and trace spans (logs.py)
        self.service, self.method = service, method
        self.calls = calls if calls is not None and service in calls.refused else None
        self.refused = self.calls is not None and method in self.calls.refused[service]
        self.in_flight = metrics.IN_FLIGHT.labels(service, method)
        self.malformed_log = LogLimiter(MALFORMED_LOG_INTERVAL_S)

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

    def _requests(
        self,
        request_or_iterator: Any,
        context: aio.ServicerContext,
        call: _Call | None,
        client_streams: bool,
        record: CallRecord | None = None,
    ) -> Any:
        """The request, or the client's stream of them, checked for ones that did not parse."""
        if not client_streams:
            if isinstance(request_or_iterator, Malformed):
                raise self._malformed(request_or_iterator, context, "the request")
            if record is not None and self.observer is not None:
                record.messages_in = 1
                self.observer.request(record, request_or_iterator)
            return request_or_iterator
        requests = self._parsed(request_or_iterator, context, record)
        if call is not None and self.calls is not None:
            return self.calls.track_requests(requests, call)
        return requests

    async def _parsed(
        self, requests: AsyncIterator[Any], context: aio.ServicerContext, record: CallRecord | None = None
    ) -> AsyncIterator[Any]:
        """A client stream's messages, ending it with INVALID_ARGUMENT at one that did not parse.

        (A handler that reads with `context.read()` instead of its iterator gets the marker itself.)
        """
        index = 0
        async for request in requests:
            index += 1
            if isinstance(request, Malformed):
                raise self._malformed(request, context, f"message {index} of the stream")
            if record is not None:
                record.messages_in = index
                if index == 1 and self.observer is not None:
                    self.observer.request(record, request)  # the stream's session is its first message's
            yield request

    def _malformed(self, request: Malformed, context: aio.ServicerContext, which: str) -> InvalidArgument:
        """The error for a request that did not parse, logged in one line, at most once a minute."""
        metrics.MALFORMED.labels(self.service, self.method).inc()
        held = self.malformed_log.allow()
        if held is not None:
            log.warning(
                "malformed request to /%s/%s from %s: %s is not a valid %s: %s%s",
                self.service,
                self.method,
                context.peer(),
                which,
                request.type_name,
                request.reason,
                f" ({held:,} more since the last such line)" if held else "",
            )
        return request.error(which)

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
            observer = self.observer
            record = observer.begin(self.service, self.method, context, client_streams) if observer else None
            try:
                call, started = self._start(), True
                requests = self._requests(request_or_iterator, context, call, client_streams, record)
                response = await behavior(requests, context)
                if record is not None and observer is not None:
                    record.messages_out = 1
                    observer.answered(record, response)
                return response
            except aio.AbortError as exc:
                code = _code_of(exc, context)
                raise
            except (Exception, asyncio.CancelledError) as exc:
                code = self._code(exc, call, context)
                await self._fail(context, call, exc)
            finally:
                self._finish(started, call, code)
                if record is not None and observer is not None:
                    observer.end(record, code)

        return wrapper

    def streaming(
        self, behavior: Callable[..., AsyncIterator[Any]], client_streams: bool
    ) -> Callable[..., AsyncIterator[Any]]:
        async def wrapper(request_or_iterator: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            code, call, started = grpc.StatusCode.OK, None, False
            observer = self.observer
            record = observer.begin(self.service, self.method, context, True) if observer else None
            try:
                call, started = self._start(), True
                requests = self._requests(request_or_iterator, context, call, client_streams, record)
                responses = behavior(requests, context)
                if inspect.isawaitable(responses):
                    # A handler that sends with context.write() and returns nothing (grpc_health's
                    # Watch): run it to its end; this wrapper yields nothing itself.
                    await responses
                    return
                async for response in responses:
                    if record is not None:
                        record.messages_out += 1
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
                if record is not None and observer is not None:
                    observer.end(record, code)

        return wrapper


class ErrorInterceptor(aio.ServerInterceptor):
    """The server's one interceptor, around every handler of every service:

    - maps `ServingError` (and unexpected exceptions) raised in a handler to a gRPC status, with a
      message cut to a size clients accept (`status_message`);
    - answers a request that does not parse INVALID_ARGUMENT (see `Malformed`), logging it in one
      line at most once a minute per method, where grpc.aio would answer UNKNOWN or INTERNAL and log
      a traceback for each;
    - counts each call by service, method and final status (`rnnserve.server.metrics`);
    - with a `CallTracker`, tracks the calls of its service so that shutdown can drain them;
    - with a `CallObserver` (logs.py), gives each call a request id, an access log record and,
      when tracing, a span.
    """

    def __init__(self, calls: CallTracker | None = None, observer: CallObserver | None = None) -> None:
        self.calls = calls
        self.observer = observer
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
        wrap = _Instrumented(method, self.calls, self.observer)
        if handler.request_deserializer is not None:
            handler = handler._replace(request_deserializer=safe_deserializer(handler.request_deserializer))
        if handler.unary_unary:
            return handler._replace(unary_unary=wrap.unary(handler.unary_unary, client_streams=False))
        if handler.stream_unary:
            return handler._replace(stream_unary=wrap.unary(handler.stream_unary, client_streams=True))
        if handler.unary_stream:
            return handler._replace(unary_stream=wrap.streaming(handler.unary_stream, client_streams=False))
        if handler.stream_stream:
            return handler._replace(stream_stream=wrap.streaming(handler.stream_stream, client_streams=True))
        return handler
