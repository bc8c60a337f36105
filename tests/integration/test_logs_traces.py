"""Logs and traces against a real server on loopback: one JSON access record per call (request id,
session, model, the caller's token name, code, message counts), the request id returned to the client,
no token value or request text in any log line; and, with the `otel` extra, a span per RPC and per
engine run (skipped with a reason where the OpenTelemetry SDK is not installed).

What a test checks is waited for through the server's call tracker (every call has ended, so its
record is written), never for a time to pass.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from rnnserve.server import logs
from rnnserve.server.app import RnnServeServer, background_server
from rnnserve.server.auth import hash_token
from rnnserve.server.config import ServerConfig
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

TOKEN = "rns_s3cret-value-never-logged-7f3a"  # a test token
TEXT = "def add(a, b):\n    return a + b  # kappa-marker"  # request text: must never be logged
SECRET_BITS = ("s3cret-value", "kappa-marker", "Bearer")
AUTH = (("authorization", f"Bearer {TOKEN}"),)
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def tiny_repo(lm_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with only the `tiny` LM (fast to load)."""
    repo = tmp_path_factory.mktemp("tiny-logs")
    shutil.copytree(lm_repo / "tiny", repo / "tiny")
    return repo


class Captured(logging.Handler):
    """Keeps every record it sees, and each formatted as the JSON log would write it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logs.JsonFormatter())
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))

    def access(self, method: str) -> list[dict[str, Any]]:
        """The access records of `method`, parsed back from their JSON lines."""
        out = []
        for record, line in zip(self.records, self.lines, strict=True):
            if record.name == logs.ACCESS_LOGGER and getattr(record, "method", None) == method:
                out.append(json.loads(line))
        return out


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    logger = logging.getLogger("rnnserve")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def auth_config(repo: Path, **kwargs: Any) -> ServerConfig:
    env = (("RNNSERVE_AUTH_TOKEN_ALICE", f"sha256:{hash_token(TOKEN)}"),)
    return ServerConfig(repo=repo, host="127.0.0.1", port=0, auth_env=env, **kwargs)


def settle(server: RnnServeServer) -> None:
    """Wait until no call is in flight on the server: every call's record is written by then."""
    assert server.loop is not None
    idle = asyncio.run_coroutine_threadsafe(server.calls.wait_finished(60), server.loop)
    assert idle.result(timeout=90), "calls still in flight on the server"


def request_id(metadata: Any) -> str:
    values = [v for k, v in metadata or () if k == logs.REQUEST_ID_HEADER]
    assert len(values) == 1, metadata
    return str(values[0])


def traffic(port: int) -> dict[str, Any]:
    """CreateSession, a two-message Stream, a Generate, and three calls that fail; what each returned."""
    seen: dict[str, Any] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RnnServeStub(channel)
        info, call = stub.CreateSession.with_call(
            pb.CreateSessionRequest(model="tiny"),
            metadata=(*AUTH, ("x-request-id", "req-create-1")),
            timeout=60,
        )
        seen["session_id"] = info.session_id
        seen["create_rid"] = request_id(call.trailing_metadata())

        messages = [
            pb.StreamRequest(session_id=info.session_id, text=TEXT),
            pb.StreamRequest(text=TEXT),
        ]
        stream = stub.Stream(iter(messages), metadata=AUTH, timeout=60)
        assert len(list(stream)) == 2
        seen["stream_rid"] = request_id(stream.trailing_metadata())

        generate = stub.Generate(
            pb.GenerateRequest(session_id=info.session_id, max_tokens=6, ignore_eos=True, prompt_text=TEXT),
            metadata=(*AUTH, ("x-request-id", "gen-2")),
            timeout=60,
        )
        seen["generated"] = sum(len(r.token_ids) for r in generate)
        seen["generate_rid"] = request_id(generate.trailing_metadata())

        with pytest.raises(grpc.RpcError) as missing:  # an error call, with a request id not fit to use
            stub.GetSession(
                pb.GetSessionRequest(session_id="no-such-session"),
                metadata=(*AUTH, ("x-request-id", "has spaces in it")),
                timeout=60,
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        seen["missing_rid"] = request_id(missing.value.trailing_metadata())

        with pytest.raises(grpc.RpcError) as unknown_model:
            stub.CreateSession(pb.CreateSessionRequest(model="nope"), metadata=AUTH, timeout=60)
        assert unknown_model.value.code() == grpc.StatusCode.NOT_FOUND

        with pytest.raises(grpc.RpcError) as bad_token:  # refused by authentication: no caller
            stub.ListModels(
                pb.ListModelsRequest(), metadata=(("authorization", "Bearer s3cret-value-wrong"),), timeout=60
            )
        assert bad_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
        seen["refused_rid"] = request_id(bad_token.value.trailing_metadata())
    return seen


def test_json_access_log(tiny_repo: Path, captured: Captured) -> None:
    with background_server(auth_config(tiny_repo)) as server:
        seen = traffic(server.port)
        settle(server)
    session_id = seen["session_id"]

    (create,) = captured.access("CreateSession")[:1]
    assert create["logger"] == "rnnserve.access" and create["level"] == "INFO"
    assert {"time", "message", "duration_ms", "peer"} <= create.keys()
    assert create["service"] == "rnnserve.v1.RnnServe"
    assert create["code"] == "OK"
    assert create["request_id"] == seen["create_rid"] == "req-create-1"  # the client's, echoed back
    assert create["session_id"] == session_id  # from the answer
    assert create["model"] == "tiny"
    assert create["caller"] == "alice"  # the token's name
    assert "messages_in" not in create  # unary

    (stream,) = captured.access("Stream")
    assert stream["code"] == "OK"
    assert GENERATED_ID.match(stream["request_id"]) and stream["request_id"] == seen["stream_rid"]
    assert stream["session_id"] == session_id  # the first message's
    assert stream["model"] == "tiny"  # the session's
    assert stream["caller"] == "alice"
    assert stream["messages_in"] == 2 and stream["messages_out"] == 2

    (generate,) = captured.access("Generate")
    assert generate["code"] == "OK"
    assert generate["request_id"] == seen["generate_rid"] == "gen-2"
    assert generate["session_id"] == session_id
    assert generate["model"] == "tiny"
    assert generate["caller"] == "alice"
    assert generate["messages_in"] == 1 and 1 <= generate["messages_out"] <= seen["generated"] == 6

    (missing,) = captured.access("GetSession")
    assert missing["code"] == "NOT_FOUND"
    assert missing["session_id"] == "no-such-session"
    assert "model" not in missing  # no such session: no model to name
    assert GENERATED_ID.match(missing["request_id"]) and missing["request_id"] == seen["missing_rid"]

    failed_create = [r for r in captured.access("CreateSession") if r["code"] != "OK"]
    assert [(r["code"], r["model"], r["caller"]) for r in failed_create] == [("NOT_FOUND", "nope", "alice")]

    (refused,) = captured.access("ListModels")
    assert refused["code"] == "UNAUTHENTICATED"
    assert "caller" not in refused  # nobody was authenticated
    assert refused["request_id"] == seen["refused_rid"]

    # Every line the server wrote is one JSON object; none holds a token or the request's text. Lines
    # written for a call carry its request id (auth's refusal); the others none (start, stop).
    assert captured.lines
    for record, line in zip(captured.records, captured.lines, strict=True):
        fields = json.loads(line)
        if record.name == "rnnserve.server.auth" and fields["message"].startswith("refused"):
            assert fields["request_id"] == seen["refused_rid"]
        if record.name == "rnnserve.server.app":
            assert "request_id" not in fields
        for secret in SECRET_BITS:
            assert secret not in line, line


def test_access_log_off(tiny_repo: Path, captured: Captured) -> None:
    """--no-access-log: no access records; request ids are still returned."""
    with background_server(auth_config(tiny_repo, access_log=False)) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.RnnServeStub(channel)
            _, call = stub.ListModels.with_call(pb.ListModelsRequest(), metadata=AUTH, timeout=60)
            assert GENERATED_ID.match(request_id(call.trailing_metadata()))
        settle(server)
    assert not [r for r in captured.records if r.name == logs.ACCESS_LOGGER]


def test_json_formatter_and_setup() -> None:
    """Plain log lines become JSON objects with extra fields and tracebacks; setup() installs it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access_level = logging.getLogger(logs.ACCESS_LOGGER).level
    stream = io.StringIO()
    try:
        logs.setup("json", access=False, stream=stream)
        logger = logging.getLogger("rnnserve.test")
        logger.info("hello %s", "world", extra={"model": "tiny"})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
        logging.getLogger(logs.ACCESS_LOGGER).info("not written: the access log is off")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger(logs.ACCESS_LOGGER).setLevel(access_level)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "hello world" and first["model"] == "tiny"
    assert first["level"] == "INFO" and first["logger"] == "rnnserve.test"
    assert first["time"].endswith("+00:00")
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]
    with pytest.raises(ValueError, match="log format"):
        logs.setup("yaml")


def test_request_id_validation() -> None:
    assert logs.request_id_of((("x-request-id", "abc-123"),)) == "abc-123"
    for bad in ("", "two words", "x" * 129, "tab\there"):
        assert GENERATED_ID.match(logs.request_id_of((("x-request-id", bad),)))
    assert GENERATED_ID.match(logs.request_id_of(None))


def test_cli_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from rnnserve.server import cli

    def parse(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        cli.register(parser.add_subparsers())
        return parser.parse_args(["serve", "--repo", ".", *argv])

    defaults = parse()
    assert (defaults.log_format, defaults.access_log, defaults.otel_endpoint) == ("text", True, "")
    args = parse("--log-format", "json", "--no-access-log", "--otel-endpoint", "http://collector:4317")
    assert (args.log_format, args.access_log, args.otel_endpoint) == ("json", False, "http://collector:4317")
    monkeypatch.setenv("RNNSERVE_LOG_FORMAT", "json")
    monkeypatch.setenv("RNNSERVE_ACCESS_LOG", "0")
    monkeypatch.setenv("RNNSERVE_OTEL_ENDPOINT", "http://otel:4317")
    from_env = parse()
    assert (from_env.log_format, from_env.access_log, from_env.otel_endpoint) == (
        "json",
        False,
        "http://otel:4317",
    )
    assert parse("--access-log").access_log is True  # a flag wins over the variable


def test_tracing_needs_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from rnnserve.server import tracing

    monkeypatch.setitem(__import__("sys").modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(tracing.TracingUnavailable, match=r"rnnserve\[otel\]"):
        tracing.require()


# -- traces ------------------------------------------------------------------------------------------


def test_spans_for_rpcs_and_runs(tiny_repo: Path) -> None:
    pytest.importorskip(
        "opentelemetry.sdk.trace", reason="tracing needs the otel extra (pip install .[otel])"
    )
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    from rnnserve.server.tracing import Tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    parent_trace = "0af7651916cd43dd8448eb211c80319c"
    with background_server(auth_config(tiny_repo), tracing=Tracing(provider)) as server:
        seen = traffic(server.port)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # a caller's trace context
            pb_grpc.RnnServeStub(channel).ListModels(
                pb.ListModelsRequest(),
                metadata=(*AUTH, ("traceparent", f"00-{parent_trace}-b7ad6b7169203331-01")),
                timeout=60,
            )
        settle(server)
    spans = exporter.get_finished_spans()

    def rpc(method: str) -> list[Any]:
        return [s for s in spans if s.name == f"rnnserve.v1.RnnServe/{method}"]

    (create, failed_create) = sorted(
        rpc("CreateSession"), key=lambda s: s.attributes["rnnserve.model"] != "tiny"
    )
    assert create.kind == SpanKind.SERVER
    attrs = create.attributes
    assert attrs["rpc.system"] == "grpc" and attrs["rpc.method"] == "CreateSession"
    assert attrs["rpc.service"] == "rnnserve.v1.RnnServe"
    assert attrs["rpc.grpc.status_code"] == 0
    assert attrs["rnnserve.session_id"] == seen["session_id"]
    assert attrs["rnnserve.model"] == "tiny"
    assert attrs["rnnserve.request_id"] == "req-create-1"
    assert attrs["rnnserve.caller"] == "alice"
    assert failed_create.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert failed_create.status.status_code == StatusCode.ERROR

    (stream,) = rpc("Stream")
    assert stream.attributes["rnnserve.session_id"] == seen["session_id"]
    assert stream.attributes["rnnserve.messages_in"] == 2
    (generate,) = rpc("Generate")
    assert generate.attributes["rnnserve.request_id"] == "gen-2"
    assert generate.attributes["rnnserve.model"] == "tiny"
    (missing,) = rpc("GetSession")
    assert missing.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]

    listed = [s for s in rpc("ListModels") if s.attributes["rpc.grpc.status_code"] == 0]
    assert len(listed) == 1 and listed[0].parent is not None
    assert format(listed[0].context.trace_id, "032x") == parent_trace  # joined the caller's trace

    runs = [s for s in spans if s.name == "rnnserve.run"]
    kinds = {s.attributes["rnnserve.batch.kind"] for s in runs}
    assert {"step", "generate"} <= {k for kind in kinds for k in kind.split("+")}
    for run in runs:
        assert run.parent is None  # roots: a run serves many calls (see tracing.py)
        assert run.attributes["rnnserve.model"].startswith("tiny")
        assert run.attributes["rnnserve.batch.rows"] >= 1
        assert run.attributes["rnnserve.batch.tokens"] >= 1
    for span in spans:  # no token value or request text in any attribute
        for value in span.attributes.values():
            assert not any(secret in str(value) for secret in SECRET_BITS)
