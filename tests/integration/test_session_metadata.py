"""What the clients do for a balancer in front of replicas (deploy/nginx.conf). Every call on a session
carries the session id as call metadata (`x-rnnserve-session`), in both clients, so that the balancer can
route by it; calls that name no session carry none. And a call the balancer cut because its replica died
(the HTTP/2 stream reset, or ended without a status) is retried like UNAVAILABLE.

A recording gRPC proxy on loopback sits between the client and a real server: it notes the metadata of
each call it receives, then forwards the call (bytes in, bytes out) to the server.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from rnnserve.client import AsyncClient, Client
from rnnserve.client.requests import SESSION_HEADER
from rnnserve.v1 import rnnserve_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["RnnServe"]
SESSION_CALLS = {"Stream", "Generate", "GetSession", "CloseSession", "ForkSession", "ExportSession"}


class RecordingProxy(grpc.GenericRpcHandler):
    """Forwards every RnnServe call to `upstream` and records (method, session header or None)."""

    def __init__(self, upstream: str) -> None:
        self.channel = grpc.insecure_channel(upstream)
        self.seen: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self.server.add_generic_rpc_handlers([self])
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def _record(self, name: str, context: grpc.ServicerContext) -> None:
        headers = [v for k, v in context.invocation_metadata() if k == SESSION_HEADER]
        assert len(headers) <= 1, headers
        with self._lock:
            self.seen.append((name, str(headers[0]) if headers else None))

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = details.method  # type: ignore[attr-defined]
        name = method.rsplit("/", 1)[1]
        described = SERVICE.methods_by_name.get(name)
        if described is None:
            return None

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            self._record(name, context)
            try:
                return self.channel.unary_unary(method)(request, timeout=30)
            except grpc.RpcError as error:
                context.abort(error.code(), error.details() or "")  # type: ignore[attr-defined]

        def streaming(call: Callable[..., Any]) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
            def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                self._record(name, context)
                responses = call(request, timeout=60)
                context.add_callback(responses.cancel)
                try:
                    yield from responses
                except grpc.RpcError as error:
                    context.abort(error.code(), error.details() or "")  # type: ignore[attr-defined]

            return handle

        if described.client_streaming:
            return grpc.stream_stream_rpc_method_handler(streaming(self.channel.stream_stream(method)))
        if described.server_streaming:
            return grpc.unary_stream_rpc_method_handler(streaming(self.channel.unary_stream(method)))
        return grpc.unary_unary_rpc_method_handler(unary)

    def calls(self, name: str) -> list[str | None]:
        with self._lock:
            return [header for method, header in self.seen if method == name]


@pytest.fixture
def proxy(server_url: str) -> Iterator[RecordingProxy]:
    p = RecordingProxy(server_url)
    p.server.start()
    try:
        yield p
    finally:
        p.server.stop(0)
        p.channel.close()


def check(proxy: RecordingProxy, session_id: str, fork_id: str, imported_id: str) -> None:
    for name in SESSION_CALLS - {"CloseSession"}:
        assert proxy.calls(name), f"{name} was never called"
        assert set(proxy.calls(name)) <= {session_id, fork_id}, (name, proxy.calls(name))
    assert proxy.calls("CloseSession") == [fork_id, imported_id, session_id]
    # Calls that name no session carry no routing header (the balancer spreads them).
    for name in ("CreateSession", "ListModels", "ImportSession"):
        assert proxy.calls(name) and set(proxy.calls(name)) == {None}, (name, proxy.calls(name))


def test_sync_client_sends_the_session_header_on_every_session_call(proxy: RecordingProxy) -> None:
    with Client(f"127.0.0.1:{proxy.port}", timeout=30) as client:
        assert client.models()
        with client.session("tiny") as session:
            session.feed("def ")
            session.feed("add")
            assert len(list(session.generate(max_tokens=3, ignore_eos=True, seed=1))) == 3
            session.info()
            snapshot = session.export()
            with session.fork() as fork:
                fork.feed("(")
                fork_id = fork.id
            imported = client.import_session(snapshot)
            imported.close()
            client.attach(session.id).info()
    check(proxy, session.id, fork_id, imported.id)


def test_async_client_sends_the_session_header_on_every_session_call(proxy: RecordingProxy) -> None:
    async def main() -> tuple[str, str, str]:
        async with AsyncClient(f"127.0.0.1:{proxy.port}", timeout=30) as client:
            assert await client.models()
            async with client.session("tiny") as session:
                await session.feed("def ")
                await session.feed("add")
                assert len([t async for t in session.generate(max_tokens=3, ignore_eos=True, seed=1)]) == 3
                await session.info()
                snapshot = await session.export()
                async with await session.fork() as fork:
                    await fork.feed("(")
                imported = await client.import_session(snapshot)
                await imported.close()
                await (await client.attach(session.id)).info()
            return session.id, fork.id, imported.id

    check(proxy, *asyncio.run(main()))


def test_calls_cut_by_a_proxy_are_retried_like_unavailable() -> None:
    from rnnserve.client.errors import RnnserveError
    from rnnserve.client.retry import retryable

    internal, unknown = grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN
    # What grpcio reports when nginx resets the stream, or ends it without trailers, as its replica dies.
    assert retryable(
        RnnserveError("Stream removed (RST_STREAM (Received RST_STREAM with error code 2))", internal)
    )
    assert retryable(RnnserveError("Stream removed (Data frame with END_STREAM flag received)", unknown))
    assert retryable(RnnserveError("session is held by another replica; retry", grpc.StatusCode.UNAVAILABLE))
    # The server's own errors are answers.
    assert not retryable(RnnserveError("unexpected error in the model runner", internal))
    assert not retryable(RnnserveError("Exception iterating responses", unknown))
    assert not retryable(RnnserveError("no such session", grpc.StatusCode.NOT_FOUND))
