"""Logs: the server's logging setup (text or one JSON object per line) and the access log, one record
per call (logger `rnnserve.access`, INFO).

An access record names the method, its final gRPC code, how long it took, the request id, and where
known the session id, the model, the caller (the token's *name*, never the token) and, for streams, how
many messages went each way. It never holds request text or the status message (which may quote it).

The request id is the client's `x-request-id` metadata when it sent a usable one (short, printable
ASCII), else one made here; either way the server returns it as trailing metadata `x-request-id`, so a
user can quote it, and every log line written while the call runs carries it in JSON.

`CallObserver` is what the interceptor (errors.py) calls at the start and end of each call; it also
drives the optional per-RPC trace spans (tracing.py).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import grpc
from grpc import aio

from rnnserve.server.caller import current_caller
from rnnserve.server.config import LOG_FORMATS

ACCESS_LOGGER = "rnnserve.access"
access_log = logging.getLogger(ACCESS_LOGGER)
log = logging.getLogger(__name__)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REQUEST_ID_HEADER = "x-request-id"
SESSION_HEADER = "x-rnnserve-session"  # what the clients send on a session's calls (clients/requests.py)
MAX_REQUEST_ID_CHARS = 128
# Probes call these every few seconds: their records go out at DEBUG, not INFO.
QUIET_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


# -- formatting ----------------------------------------------------------------------------------------

_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Each record as one JSON object on one line: time (UTC, ISO 8601), level, logger, message, the
    record's extra fields (`log.info(..., extra={...})`), the current call's request id, and the
    exception's traceback as one string when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                out[key] = value
        call = CURRENT.get()
        if call is not None and "request_id" not in out:
            out["request_id"] = call.request_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup(
    log_format: str = "text", access: bool = True, level: int = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Log to `stream` (stderr) in `log_format` ("text" or "json"), replacing the root's handlers; the
    access log (INFO) is on or off with `access`. Returns the handler."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    access_log.setLevel(logging.NOTSET if access else logging.WARNING)
    return handler


# -- the access log ------------------------------------------------------------------------------------


def request_id_of(metadata: Any) -> str:
    """The client's x-request-id if usable (1-128 printable ASCII characters, no spaces), else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            if 0 < len(value) <= MAX_REQUEST_ID_CHARS and all("!" <= c <= "~" for c in value):
                return value
            break
    return uuid.uuid4().hex


def _header(metadata: Any, name: str) -> str:
    for key, value in metadata or ():
        if key == name and isinstance(value, str):
            return value
    return ""


@dataclass(eq=False)
class CallRecord:
    """What is known about one call, filled in as it goes."""

    service: str
    method: str
    request_id: str
    peer: str
    started: float  # time.perf_counter()
    streams: bool  # client or server streaming: message counts are logged
    session_id: str = ""
    created_session_id: str = ""  # ForkSession: the new session (session_id is the source)
    model: str = ""
    caller: str = ""
    messages_in: int = 0
    messages_out: int = 0
    span: Any = None  # the RPC's trace span (tracing.py), when tracing

    def fields(self, code: grpc.StatusCode, seconds: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "service": self.service,
            "method": self.method,
            "code": code.name,
            "duration_ms": round(seconds * 1000, 3),
            "request_id": self.request_id,
            "peer": self.peer,
        }
        for key in ("session_id", "created_session_id", "model", "caller"):
            if value := getattr(self, key):
                out[key] = value
        if self.streams:
            out["messages_in"] = self.messages_in
            out["messages_out"] = self.messages_out
        return out


# The record of the call whose code is running (set in the call's task): JSON log lines written for a
# call carry its request id, and `note_caller` finds it.
CURRENT: ContextVar[CallRecord | None] = ContextVar("rnnserve_call_record", default=None)


class CallObserver:
    """Begins and ends each call's record: request id, access log line, trace span.

    `session_model`: the model name of an open session ("" if unknown here), asked at most twice per
    call (when the session id is first known, and at the end if the model is still unknown).
    `tracer`: a tracing.RpcTracer, or None (no spans).
    """

    def __init__(
        self,
        session_model: Callable[[str], str] | None = None,
        tracer: Any = None,
        access: bool = True,
    ) -> None:
        self.session_model = session_model
        self.tracer = tracer
        self.access = access

    def begin(
        self, service: str, method: str, context: aio.ServicerContext, streams: bool
    ) -> CallRecord | None:
        try:
            metadata = context.invocation_metadata()
            record = CallRecord(
                service, method, request_id_of(metadata), context.peer(), time.perf_counter(), streams
            )
            record.session_id = _header(metadata, SESSION_HEADER)[:MAX_REQUEST_ID_CHARS]
            CURRENT.set(record)  # (the call has its own task: nothing to reset)
            context.set_trailing_metadata(((REQUEST_ID_HEADER, record.request_id),))
            if self.tracer is not None:
                record.span = self.tracer.start_rpc(service, method, metadata)
            return record
        except Exception:  # never fail a call for its log
            log.exception("could not begin the access record of /%s/%s", service, method)
            return None

    def request(self, record: CallRecord, request: Any) -> None:
        """The (first) request message: its session id and model, where it has them."""
        session_id = getattr(request, "session_id", "")
        if session_id and isinstance(session_id, str):
            record.session_id = session_id
        model = getattr(request, "model", "")
        if model and isinstance(model, str):
            record.model = model
        elif record.session_id and self.session_model is not None:
            record.model = self.session_model(record.session_id)

    def answered(self, record: CallRecord, response: Any) -> None:
        """A unary call's answer: the session it made (SessionInfo) and the model it names."""
        session_id = getattr(response, "session_id", "")
        if session_id and isinstance(session_id, str) and session_id != record.session_id:
            if record.session_id:
                record.created_session_id = session_id
            else:
                record.session_id = session_id
        model = getattr(response, "model", "")
        if model and isinstance(model, str):
            record.model = model

    def end(self, record: CallRecord, code: grpc.StatusCode) -> None:
        try:
            seconds = time.perf_counter() - record.started
            if not record.model and record.session_id and self.session_model is not None:
                record.model = self.session_model(record.session_id)
            record.caller = record.caller or current_caller().name
            if record.span is not None:
                self.tracer.end_rpc(record.span, code, record)
            if not self.access:
                return
            level = logging.DEBUG if record.service in QUIET_SERVICES else logging.INFO
            if not access_log.isEnabledFor(level):
                return
            fields = record.fields(code, seconds)
            text = " ".join(
                f"{k}={v}" for k, v in fields.items() if k not in ("service", "method", "code", "duration_ms")
            )
            access_log.log(
                level,
                "%s %s %.1fms %s",
                record.method,
                code.name,
                seconds * 1000,
                text,
                extra=fields,
            )
        except Exception:
            log.exception("could not write the access record of /%s/%s", record.service, record.method)


def note_caller(name: str) -> None:
    """For an authentication layer that cannot leave `caller.CALLER` set after its handler returns:
    name the caller of the call in progress for its access record. (Not needed when CALLER stays set
    in the call's task, which the record reads at the end of the call.)"""
    record = CURRENT.get()
    if record is not None:
        record.caller = name
