"""A fault-injecting gRPC proxy for tests: a real gRPC server on loopback that forwards every RnnServe
call, byte for byte, to a real rnnserve server, and breaks the calls a test asks it to.

    with FaultProxy(server_url) as proxy, Client(proxy.url) as client:
        proxy.faults.drop_reply("Stream")        # the server applies the next message; its reply is lost
        proxy.faults.cut_stream("Generate", 5)   # the next Generate ends with UNAVAILABLE after 5 messages
        proxy.faults.refuse("ListModels", 3)     # the next 3 calls fail with UNAVAILABLE, unforwarded

Faults are armed from the test's thread and taken on the proxy's event loop (its own thread), each once.
`calls` counts the calls of each method the proxy received. The proxy stops when the `with` ends.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import grpc
from grpc import aio

from rnnserve.v1 import rnnserve_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["RnnServe"]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


class Faults:
    """What the proxy breaks next (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._drop: Counter[str] = Counter()
        self._refuse: Counter[str] = Counter()
        self._cuts: dict[str, list[int]] = {}
        self.calls: Counter[str] = Counter()

    def drop_reply(self, method: str, times: int = 1) -> None:
        """The next `times` replies of `method` (unary responses or Stream messages) are lost after the
        server made them: the call ends with UNAVAILABLE instead."""
        with self._lock:
            self._drop[method] += times

    def refuse(self, method: str, times: int = 1) -> None:
        """The next `times` calls of `method` end with UNAVAILABLE without reaching the server."""
        with self._lock:
            self._refuse[method] += times

    def cut_stream(self, method: str, after: int) -> None:
        """The next call of server-streaming `method` ends with UNAVAILABLE after `after` messages (the
        server's call is cancelled). Several cuts apply to the following calls, in order."""
        with self._lock:
            self._cuts.setdefault(method, []).append(after)

    def _take(self, counter: Counter[str], method: str) -> bool:
        with self._lock:
            if counter[method] <= 0:
                return False
            counter[method] -= 1
            return True

    def _begin(self, method: str) -> tuple[bool, int | None]:
        """A call starts: count it; whether to refuse it, and where to cut it."""
        with self._lock:
            self.calls[method] += 1
            cuts = self._cuts.get(method)
            cut = cuts.pop(0) if cuts else None
        return self._take(self._refuse, method), cut


class FaultProxy:
    """The proxy (a context manager); `url` is where clients connect."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults = Faults()
        self.port = 0
        self._started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._serve(),), daemon=True
        )

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("the fault proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._channel = aio.insecure_channel(self.upstream)
        server = aio.server()
        server.add_generic_rpc_handlers([_Handler(self)])
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            await server.stop(0)
            await self._channel.close()

    async def unary(self, method: str, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        name = method.rsplit("/", 1)[1]
        refuse, _ = self.faults._begin(name)
        if refuse:
            await context.abort(UNAVAILABLE, f"fault proxy: {name} refused")
        try:
            response: bytes = await self._channel.unary_unary(method)(
                request, timeout=context.time_remaining()
            )
        except grpc.RpcError as error:
            await context.abort(error.code(), error.details() or "")
        if self.faults._take(self.faults._drop, name):
            await context.abort(UNAVAILABLE, f"fault proxy: the reply of {name} was lost")
        return response

    async def unary_stream(
        self, method: str, request: bytes, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        name = method.rsplit("/", 1)[1]
        refuse, cut = self.faults._begin(name)
        if refuse:
            await context.abort(UNAVAILABLE, f"fault proxy: {name} refused")
        call = self._channel.unary_stream(method)(request, timeout=context.time_remaining())
        sent = 0
        try:
            async for response in call:
                if cut is not None and sent >= cut:
                    call.cancel()
                    await context.abort(UNAVAILABLE, f"fault proxy: {name} cut after {sent} messages")
                yield response
                sent += 1
        except grpc.RpcError as error:
            await context.abort(error.code(), error.details() or "")
        finally:
            call.cancel()

    async def stream_stream(
        self, method: str, requests: AsyncIterator[bytes], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        name = method.rsplit("/", 1)[1]
        refuse, _ = self.faults._begin(name)
        if refuse:
            await context.abort(UNAVAILABLE, f"fault proxy: {name} refused")
        call = self._channel.stream_stream(method)(timeout=context.time_remaining())

        async def pump() -> None:
            async for request in requests:
                await call.write(request)
            await call.done_writing()

        pumping = asyncio.ensure_future(pump())
        try:
            while (response := await call.read()) is not aio.EOF:
                if self.faults._take(self.faults._drop, name):
                    call.cancel()
                    await context.abort(UNAVAILABLE, f"fault proxy: a reply of {name} was lost")
                yield response
        except grpc.RpcError as error:
            await context.abort(error.code(), error.details() or "")
        finally:
            pumping.cancel()
            call.cancel()


class _Handler(grpc.GenericRpcHandler):
    """Every RnnServe method, with bytes in and out (no (de)serializers: the proxy never parses)."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = details.method  # type: ignore[attr-defined]
        service, _, name = method.lstrip("/").partition("/")
        described = SERVICE.methods_by_name.get(name)
        if service != SERVICE.full_name or described is None:
            return None
        proxy = self.proxy
        if described.client_streaming:
            return grpc.stream_stream_rpc_method_handler(partial(proxy.stream_stream, method))
        if described.server_streaming:
            return grpc.unary_stream_rpc_method_handler(partial(proxy.unary_stream, method))
        # partial, not a lambda: grpc.aio tells coroutine and async-generator handlers by their function
        return grpc.unary_unary_rpc_method_handler(partial(proxy.unary, method))
