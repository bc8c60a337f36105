"""Assemble and run the gRPC server: model repository → engine → handlers, plus health, reflection
and Prometheus metrics; drain gracefully on SIGTERM.

rnnserve serve --repo model_repo --port 50051 --metrics-port 9464

Shutdown (SIGTERM, what `docker compose stop` sends; or SIGINT): health turns NOT_SERVING, new sessions
and streams are refused with UNAVAILABLE, streams waiting for their client end with UNAVAILABLE, calls
in flight finish (a message being processed is answered, a Generate runs to its end) until the grace
period (`--grace`) is nearly over, whatever is left then ends with UNAVAILABLE, and the process exits 0.
A second signal ends what is in flight at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rnnserve.inference import grpc_service_pb2_grpc as v2_pb_grpc
from rnnserve.server import metrics
from rnnserve.server.auth import RELOAD_INTERVAL_S, AuthInterceptor, token_store
from rnnserve.server.config import ServerConfig
from rnnserve.server.engine import Engine, EngineLimits, StoreOptions
from rnnserve.server.errors import CallTracker, ErrorInterceptor, Unavailable
from rnnserve.server.logs import CallObserver
from rnnserve.server.reload import Reloader
from rnnserve.server.repository import ModelRepository
from rnnserve.server.runtime import RuntimeOptions
from rnnserve.server.scheduler import SchedulerOptions
from rnnserve.server.service import RnnServeServicer
from rnnserve.server.sessions import SessionLimits
from rnnserve.server.store import open_store
from rnnserve.server.tls import server_credentials, server_ssl_context
from rnnserve.server.v2.grpc_service import SERVICE_NAME as V2_SERVICE_NAME
from rnnserve.server.v2.grpc_service import InferenceServicer
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from rnnserve.server.http import HttpServer
    from rnnserve.server.tracing import Tracing

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RnnServe"].full_name
SWEEP_INTERVAL_S = 5.0
# What a draining server refuses: anything that starts new work. Lookups and CloseSession stay open.
REFUSED_WHILE_DRAINING = ("CreateSession", "Stream", "Generate", "Classify", "ReloadModels")
V2_REFUSED_WHILE_DRAINING = ("ModelInfer", "ModelStreamInfer")  # the Open Inference Protocol's work
STOP_MARGIN_S = 1.0  # of the grace period, kept for ending leftover calls and stopping cleanly


class RnnServeServer:
    """The running server. `await start()` returns the bound port; `await stop()` drains and stops."""

    def __init__(self, config: ServerConfig, tracing: Tracing | None = None) -> None:
        """`tracing`: trace spans to this (tests); None: to config.otel_endpoint when set, else none."""
        self.config = config
        # Bearer tokens (auth.py); None: authentication off (no token file, no token variables). Read
        # first: a bad token file stops the server before the models load.
        self.auth = token_store(config.auth_tokens, dict(config.auth_env))
        self._owns_tracing = tracing is None and bool(config.otel_endpoint)
        if self._owns_tracing:
            from rnnserve.server.tracing import Tracing  # the optional `otel` extra

            tracing = Tracing.to(config.otel_endpoint)
        self.tracing = tracing
        runtime = RuntimeOptions(
            device=config.device,
            intra_op_threads=config.intra_op_threads,  # 0: per model (default_intra_op_threads)
            generate_graphs=config.generate_graphs,
            generate_steps=config.generate_steps,
        )
        self.engine = Engine(
            ModelRepository.load(config.repo, runtime),
            SessionLimits(
                max_sessions=config.max_sessions,
                max_sessions_per_owner=config.max_sessions_per_token,
                default_ttl_seconds=config.session_ttl_s,
            ),
            SchedulerOptions(
                max_batch=config.max_batch,
                max_wait_s=config.max_wait_ms / 1000,
                inline_max_tokens=config.inline_max_tokens,
                tracer=self.tracing,
            ),
            EngineLimits(
                generate_flush_ms=config.generate_flush_ms,
                generate_flush_min_sessions=config.generate_flush_min_sessions,
                max_tokens_per_input=config.max_input_tokens,
                max_input_chars=8 * config.max_input_tokens,  # (see EngineLimits.max_input_chars)
                max_generate_tokens=config.max_generate_tokens,
                max_generates_per_token=config.max_generates_per_token,
            ),
            open_store(config.session_store, lease_s=config.owner_lease_s),
            StoreOptions(
                persist_interval_s=config.persist_interval_ms / 1000,
                idle_ttl_s=config.idle_ttl_s,
                lease_s=config.owner_lease_s,
            ),
        )
        self.reloader = Reloader(self.engine)  # hot reload: ReloadModels and the watcher (reload.py)
        self.health = health.aio.HealthServicer()
        self.calls = CallTracker(
            {SERVICE_NAME: REFUSED_WHILE_DRAINING, V2_SERVICE_NAME: V2_REFUSED_WHILE_DRAINING}
        )
        # Request ids, the access log (logger rnnserve.access) and RPC spans (logs.py, tracing.py).
        self.observer = CallObserver(self._session_model, tracer=self.tracing, access=config.access_log)
        self._server: aio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._token_watcher: asyncio.Task[None] | None = None
        self._metrics: metrics.MetricsServer | None = None
        self._http: HttpServer | None = None
        self._stopping: asyncio.Task[None] | None = None
        self.v2_servicer: InferenceServicer | None = None  # the KServe V2 gRPC service, once started
        self.port = 0
        self.metrics_port = 0  # bound metrics port once started (0 = none)
        self.http_port = 0  # bound HTTP port (playground, /v2 REST) once started (0 = none)
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop it runs on, once started

    async def start(self) -> int:
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            # No send limit: an answer is bounded by the server's own limits (tokens per input, top_k,
            # max_tokens), and can outgrow its request (a token id of 1 byte comes back with a 4-byte
            # log-probability). Refusing to send it would fail a call whose message was already applied.
            ("grpc.max_send_message_length", -1),
        ]
        # The ErrorInterceptor stays outermost: it maps and counts what the others raise (UNAUTHENTICATED).
        interceptors: list[aio.ServerInterceptor] = [ErrorInterceptor(self.calls, self.observer)]
        if self.auth is not None:
            interceptors.append(AuthInterceptor(self.auth))
        server = aio.server(interceptors=interceptors, options=options)
        servicer = RnnServeServicer(self.engine)
        servicer.reloader = self.reloader
        pb_grpc.add_RnnServeServicer_to_server(servicer, server)
        # The Open Inference Protocol (KServe V2, Triton's flavour) on the same port: server/v2/.
        self.v2_servicer = InferenceServicer(self.engine)
        v2_pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.v2_servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [
                SERVICE_NAME,
                V2_SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        address, credentials = f"{self.config.host}:{self.config.port}", server_credentials(self.config)
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"could not bind {self.config.host}:{self.config.port} (in use?)")
        if self.config.metrics_port >= 0:
            try:
                self._metrics = metrics.MetricsServer(self.config.host, self.config.metrics_port)
                self.metrics_port = self._metrics.port
            except OSError as exc:
                if self.config.metrics_required:
                    await server.stop(None)  # release the gRPC port
                    raise
                log.warning("serving without metrics: %s", exc)
        if self.config.http_port >= 0:
            # The playground and /v2 REST (http.py), on this loop, over the same engine and tokens.
            from rnnserve.server.http import HttpServer, build_app

            self._http = HttpServer(
                build_app(self.engine, self.auth),
                shutdown_timeout=max(0.0, self.config.grace_s - STOP_MARGIN_S),
            )
            try:
                self.http_port = await self._http.start(
                    self.config.host, self.config.http_port, server_ssl_context(self.config)
                )
            except OSError:
                await server.stop(None)  # release the gRPC port
                if self._metrics:
                    await asyncio.to_thread(self._metrics.stop)
                raise
        for model, _ in self.engine.repository.all():
            metrics.MODELS.labels(model.key, model.runtime.provider).set(1)
        metrics.DRAINING.set(0)
        self.engine.start()
        await server.start()
        self._server = server
        self.loop = asyncio.get_running_loop()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_sessions())
        if self.config.watch_interval_s > 0:
            self._watcher = self.loop.create_task(self.reloader.watch(self.config.watch_interval_s))
        if self.auth is not None and self.auth.path is not None:
            self._token_watcher = self.loop.create_task(self._watch_tokens())
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "rnnserve listening on %s:%d%s with %d model version(s)",
            self.config.host,
            self.port,
            " (mTLS)" if self.config.tls_client_ca else " (TLS)" if self.config.tls_cert else "",
            len(self.engine.repository),
        )
        return self.port

    def _session_model(self, session_id: str) -> str:
        """The model of an open session held here, for the access log ("" if not held here)."""
        sessions = self.engine.sessions
        return sessions.get(session_id).model.manifest.name if session_id in sessions else ""

    async def _watch_tokens(self) -> None:
        """Reload the token file when it changes (a bad one is logged and refused: see auth.py)."""
        assert self.auth is not None
        while True:
            await asyncio.sleep(RELOAD_INTERVAL_S)
            self.auth.reload_if_changed()

    async def _sweep_sessions(self) -> None:
        idle_ttl = self.config.idle_ttl_s or self.config.session_ttl_s
        while True:
            # Sweep at least twice per TTL, so a short TTL is honoured promptly.
            await asyncio.sleep(min(SWEEP_INTERVAL_S, self.config.session_ttl_s / 2, idle_ttl / 2))
            await self.reloader.sweep()  # unload retired model versions whose last session ended
            try:
                expired, parked = await self.engine.keeper.sweep()
            except Unavailable as exc:
                log.warning("session sweep: %s", exc)
                continue
            if expired or parked:
                log.info("sessions: %d expired after their TTL, %d idle moved to the store", expired, parked)

    async def stop(self, grace: float | None = None) -> None:
        """Drain (see the module's docstring) within `grace` seconds (default: the config's), then stop."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(grace))
        await asyncio.shield(self._stopping)

    def force_stop(self) -> None:
        """End every call in flight now (a second SIGTERM while draining)."""
        log.warning("second signal: ending %d call(s) in flight now", len(self.calls))
        self.calls.cancel_all()

    async def _stop(self, grace: float | None) -> None:
        grace = self.config.grace_s if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        metrics.DRAINING.set(1)
        await self.health.enter_graceful_shutdown()  # NOT_SERVING, for probes and load balancers
        log.info(
            "draining (grace %.0fs): NOT_SERVING, refusing new sessions and streams, %d call(s) in flight",
            grace,
            len(self.calls),
        )
        self.calls.begin_drain()
        if self.v2_servicer is not None:
            self.v2_servicer.ready = False  # V2 ServerReady / ModelReady answer false while draining
        # HTTP stops listening now; its requests in flight end within its shutdown timeout.
        http_stop = loop.create_task(self._http.stop()) if self._http else None
        margin = min(STOP_MARGIN_S, grace / 4)
        if not await self.calls.wait_finished(deadline - margin - loop.time()):
            log.warning("grace period over: ending %d call(s) still in flight (UNAVAILABLE)", len(self.calls))
            self.calls.cancel_all()
            await self.calls.wait_finished(deadline - loop.time())
        if self._sweeper:
            self._sweeper.cancel()
        if self._watcher:
            self._watcher.cancel()
        if self._token_watcher:
            self._token_watcher.cancel()
        self.reloader.closed = True  # a reload still loading publishes nothing
        if self._server:
            # Nothing of ours is left in flight; health watchers and the like end here.
            await self._server.stop(max(0.0, min(deadline - loop.time(), margin)))
        if http_stop is not None:
            await http_stop
        await self.engine.stop()
        if self._metrics:
            await asyncio.to_thread(self._metrics.stop)
        if self.tracing is not None and self._owns_tracing:
            await asyncio.to_thread(self.tracing.shutdown)  # export the spans still buffered
        log.info("stopped; %d session(s) were open", len(self.engine.sessions))

    async def wait(self) -> None:
        if self._server:
            await self._server.wait_for_termination()


async def serve_forever(config: ServerConfig) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully."""
    server = RnnServeServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    auth = server.auth
    if auth is not None and auth.path is not None:  # SIGHUP: re-read the token file now
        loop.add_signal_handler(signal.SIGHUP, lambda: auth.reload_if_changed(force=True))
    await stop.wait()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.force_stop)
    log.info("shutdown requested")
    await server.stop()


@contextlib.contextmanager
def background_server(config: ServerConfig, tracing: Tracing | None = None) -> Iterator[RnnServeServer]:
    """Run a server on its own event loop in a daemon thread (for tests, the demo and notebooks).

    Yields the started server (its `.port` is bound); stops it on exit. `tracing`: see RnnServeServer.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="rnnserve-server", daemon=True)
    thread.start()

    async def create() -> RnnServeServer:
        server = RnnServeServer(config, tracing)  # created on the loop: sessions' locks belong to it
        await server.start()
        return server

    try:
        server = asyncio.run_coroutine_threadsafe(create(), loop).result(timeout=120)
        try:
            yield server
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop).result(timeout=60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def channel_ready(target: str, timeout: float = 10.0) -> bool:
    """True once a server answers on target (used by scripts that start one in a subprocess)."""
    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
            return True
        except grpc.FutureTimeoutError:
            return False
