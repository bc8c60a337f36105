"""Optional OpenTelemetry traces (the `otel` extra; off unless `--otel-endpoint` is given):

- a SERVER span per RPC, started and ended by the interceptor (errors.py through logs.CallObserver):
  named after the method (`rnnserve.v1.RnnServe/Stream`), with rpc.system, rpc.service, rpc.method,
  rpc.grpc.status_code, rnnserve.request_id, rnnserve.session_id, rnnserve.model, rnnserve.caller;
  its parent is the caller's trace context when the call's metadata carries one (W3C traceparent);
- a span per engine run (`rnnserve.run`, one per batch the scheduler runs), with rnnserve.model,
  rnnserve.batch.rows, rnnserve.batch.tokens and rnnserve.batch.kind (step, generate, classify, or
  several joined by "+").

Run spans are roots, neither children of nor linked to RPC spans: one run serves up to max_batch calls
at once and one generating call spans hundreds of runs, so a parent would be wrong and links would be
noise. They share the model name and the time line with the RPC spans.

Nothing here is imported unless tracing is on; with it off the interceptor and the scheduler skip it
at the cost of one `is None` test.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from rnnserve.server.logs import CallRecord
    from rnnserve.server.runner import RunPlan

MISSING_EXTRA = (
    "tracing needs the OpenTelemetry packages: pip install 'rnnserve[otel]' "
    "(opentelemetry-api, opentelemetry-sdk, opentelemetry-exporter-otlp-proto-grpc)"
)
DEFAULT_SERVICE_NAME = "rnnserve"


class TracingUnavailable(RuntimeError):
    """Tracing was asked for but the `otel` extra is not installed."""


def require() -> None:
    """Raise TracingUnavailable, saying what to install, if the `otel` extra is missing."""
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise TracingUnavailable(f"{MISSING_EXTRA}: {exc}") from None


def tracer_provider(endpoint: str) -> Any:
    """An SDK TracerProvider exporting in batches over OTLP/gRPC to `endpoint` (e.g. http://otel:4317).
    The service name is $OTEL_SERVICE_NAME, else rnnserve; the exporter also honours the usual
    OTEL_EXPORTER_OTLP_* variables (headers, certificates)."""
    require()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


class Tracing:
    """The server's spans, from a TracerProvider (`tracer_provider`, or a test's in-memory one)."""

    def __init__(self, provider: Any) -> None:
        require()
        from opentelemetry import context, propagate, trace

        self.provider = provider
        self.tracer = provider.get_tracer("rnnserve.server")
        self._propagate = propagate
        self._root = context.Context()
        self._trace = trace
        self._server_kind = trace.SpanKind.SERVER

    @classmethod
    def to(cls, endpoint: str) -> Tracing:
        """Tracing exported over OTLP/gRPC to `endpoint`."""
        return cls(tracer_provider(endpoint))

    def shutdown(self) -> None:
        """Export what is buffered and stop (the server's stop calls it)."""
        shutdown = getattr(self.provider, "shutdown", None)
        if shutdown is not None:
            shutdown()

    # -- RPC spans (logs.CallObserver) ----------------------------------------------------------------

    def start_rpc(self, service: str, method: str, metadata: Any) -> Any:
        carrier = {k: v for k, v in metadata or () if isinstance(v, str)}
        parent = self._propagate.extract(carrier) if carrier else self._root
        return self.tracer.start_span(
            f"{service}/{method}",
            context=parent,
            kind=self._server_kind,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        )

    def end_rpc(self, span: Any, code: grpc.StatusCode, record: CallRecord) -> None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_attribute("rnnserve.request_id", record.request_id)
        for key in ("session_id", "created_session_id", "model", "caller"):
            if value := getattr(record, key):
                span.set_attribute(f"rnnserve.{key}", value)
        if record.streams:
            span.set_attribute("rnnserve.messages_in", record.messages_in)
            span.set_attribute("rnnserve.messages_out", record.messages_out)
        if code != grpc.StatusCode.OK:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, code.name))
        span.end()

    # -- run spans (scheduler.py) ---------------------------------------------------------------------

    @contextlib.contextmanager
    def run(self, model: str, plan: RunPlan) -> Iterator[None]:
        """A span around one engine run of `plan` (a root: see the module's docstring)."""
        kinds = [
            kind
            for kind, rows in (
                ("step", plan.steps),
                ("generate", len(plan.sampled) + len(plan.block)),
                ("classify", plan.classify),
            )
            if rows
        ]
        rows = (
            len(plan.steps) + len(plan.sampled) + len(plan.block) + sum(len(c.texts) for c in plan.classify)
        )
        with self.tracer.start_as_current_span(
            "rnnserve.run",
            context=self._root,
            attributes={
                "rnnserve.model": model,
                "rnnserve.batch.rows": rows,
                "rnnserve.batch.tokens": plan.tokens,
                "rnnserve.batch.kind": "+".join(kinds),
                "rnnserve.batch.block": bool(plan.block),
            },
        ):
            yield
