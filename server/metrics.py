"""Prometheus metrics of the server, served over HTTP on their own port (`--metrics-port`, default 9464).

    curl -s localhost:9464/metrics | grep ^rnnserve_

Everything lives in prometheus-client's default registry (which also carries the process_* and
python_* metrics), so one scrape shows the whole process. The engine, scheduler and session store
call the small helpers below at the points where things happen; requests are counted by the one
interceptor (`rnnserve.server.errors`), by service, method and final gRPC status code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# -- requests (counted by the interceptor) -----------------------------------------------------------
REQUESTS = Counter(
    "rnnserve_requests",
    "gRPC calls finished, by service, method and status code (OK included)",
    ["service", "method", "code"],
)
ERRORS = Counter(
    "rnnserve_request_errors",
    "gRPC calls that ended with a status other than OK, by service, method and code",
    ["service", "method", "code"],
)
MALFORMED = Counter(
    "rnnserve_requests_malformed",
    "request messages that did not parse (corrupt protobuf, strings not UTF-8), answered INVALID_ARGUMENT; "
    "the log reports them at most once a minute per method, this counts them all",
    ["service", "method"],
)
IN_FLIGHT = Gauge("rnnserve_requests_in_flight", "gRPC calls running now", ["service", "method"])
DRAINING = Gauge("rnnserve_draining", "1 while the server drains for shutdown (health is NOT_SERVING)")

# -- tokens and sessions -----------------------------------------------------------------------------
TOKENS_IN = Counter(
    "rnnserve_tokens_in", "tokens sent by clients and applied (Stream input, prompts, Classify)", ["model"]
)
TOKENS_OUT = Counter("rnnserve_tokens_out", "tokens generated (sampled) by Generate", ["model"])
SESSIONS_ACTIVE = Gauge("rnnserve_sessions_active", "open sessions", ["model"])
SESSIONS_CREATED = Counter("rnnserve_sessions_created", "sessions created", ["model"])
SESSIONS_EVICTED = Counter(
    "rnnserve_sessions_evicted",
    "sessions dropped by the server (not closed by a client)",
    ["model", "reason"],
)
SESSIONS_REVIVED = Counter(
    "rnnserve_sessions_revived",
    "sessions loaded back from the session store (after idle eviction, a restart, or from another replica)",
    ["model"],
)
SESSIONS_PARKED = Counter(
    "rnnserve_sessions_parked", "idle sessions moved out of memory into the session store", ["model"]
)

# -- the session store --------------------------------------------------------------------------------
STORE_WRITES = Counter("rnnserve_store_writes", "session snapshots written to the session store")
STORE_ERRORS = Counter(
    "rnnserve_store_errors", "session store operations that failed (store unreachable)", ["operation"]
)
MODELS = Gauge(
    "rnnserve_model_loaded", "1 for each model version loaded, with its execution provider",
    ["model", "provider"],
)  # fmt: skip

# -- the scheduler -----------------------------------------------------------------------------------
BATCH_SIZE = Histogram(
    "rnnserve_batch_size",
    "sessions stacked into one model run",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
QUEUE_WAIT = Histogram(
    "rnnserve_queue_wait_seconds",
    "time a step waited in the scheduler's queue before its batch started (the sessions generating in "
    "the running batch: one observation per run, the longest wait among them)",
    ["model"],
    buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0),
)
STEP_LATENCY = Histogram(
    "rnnserve_step_latency_seconds",
    "wall time of one model run (one batch of steps) in ONNX Runtime",
    ["model"],
    buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5),
)


class ModelMetrics:
    """The scheduler's and engine's metrics for one model version, label children looked up once
    (`labels()` costs microseconds per call, and these are hit for every run and every message)."""

    def __init__(self, model: str) -> None:
        self.queue_wait = QUEUE_WAIT.labels(model)
        self.batch_size = BATCH_SIZE.labels(model)
        self.step_latency = STEP_LATENCY.labels(model)
        self.tokens_in = TOKENS_IN.labels(model)
        self.tokens_out = TOKENS_OUT.labels(model)

    def observe_queue_wait(self, enqueued_at: Iterable[float]) -> None:
        """Record the queue wait of each of these steps, about to run (times from `time.monotonic()`)."""
        now = time.monotonic()
        for t in enqueued_at:
            self.queue_wait.observe(now - t)

    def observe_run(self, batch_size: int, seconds: float) -> None:
        """Record one model run: how many sessions it stacked and how long it took."""
        self.batch_size.observe(batch_size)
        self.step_latency.observe(seconds)


def session_opened(model: str) -> None:
    SESSIONS_CREATED.labels(model).inc()
    SESSIONS_ACTIVE.labels(model).inc()


def session_closed(model: str) -> None:
    SESSIONS_ACTIVE.labels(model).dec()


def session_evicted(model: str, reason: str = "idle_ttl") -> None:
    SESSIONS_ACTIVE.labels(model).dec()
    SESSIONS_EVICTED.labels(model, reason).inc()


def request_finished(service: str, method: str, code: str) -> None:
    REQUESTS.labels(service, method, code).inc()
    if code != "OK":
        ERRORS.labels(service, method, code).inc()


class MetricsServer:
    """prometheus-client's HTTP exporter on a port of its own (in a daemon thread)."""

    def __init__(self, host: str, port: int) -> None:
        try:
            self._server, self._thread = start_http_server(port, addr=host)
        except OSError as exc:
            raise OSError(
                f"could not serve metrics on {host}:{port} ({exc.strerror}); pick another --metrics-port "
                "(0 = any free port, -1 = no metrics)"
            ) from exc
        self.port = int(self._server.server_port)
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def stop(self) -> None:
        """Stop serving (blocks up to half a second: call it off the event loop)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
