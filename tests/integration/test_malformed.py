"""Requests whose bytes do not parse get INVALID_ARGUMENT naming the message type, on every method of
every service (rnnserve.v1, health, reflection), with at most one concise log line and no traceback.

The bytes are sent as-is over a real channel (no serializer), to a real server on loopback: what a
buggy or hostile client can do. grpc.aio alone answers them UNKNOWN (unary and server-streaming) or
INTERNAL (client-streaming) and logs an ERROR traceback for each one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from prometheus_client import REGISTRY

from rnnserve.server.errors import MALFORMED_LOG_INTERVAL_S, LogLimiter
from rnnserve.v1 import rnnserve_pb2 as pb

BAD_UTF8 = bytes.fromhex("0a03fffefd")  # field 1, a string of 3 bytes that are not UTF-8
CORRUPT = b"\x0a\x10ab"  # field 1 announces 16 bytes; 2 follow
RNNSERVE = "/rnnserve.v1.RnnServe/"
HEALTH = "/grpc.health.v1.Health/"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


@pytest.fixture
def channel(server_url: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server_url) as channel:
        yield channel


def unary(channel: grpc.Channel, method: str, data: bytes) -> None:
    channel.unary_unary(method, request_serializer=None, response_deserializer=None)(data, timeout=30)


def server_streaming(channel: grpc.Channel, method: str, data: bytes) -> None:
    list(channel.unary_stream(method, request_serializer=None, response_deserializer=None)(data, timeout=30))


def bidi(channel: grpc.Channel, method: str, data: bytes) -> None:
    call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
    list(call(iter([data]), timeout=30))


Send = Callable[[grpc.Channel, str, bytes], None]


def failure(send: Send, channel: grpc.Channel, method: str, data: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        send(channel, method, data)
    assert isinstance(info.value, grpc.RpcError)
    return info.value


def assert_concise_log(caplog: pytest.LogCaptureFixture, method: str, most: int = 1) -> list[str]:
    """No traceback, nothing at ERROR, and at most `most` single-line records about `method` (returned)."""
    for record in caplog.records:
        assert record.exc_info is None, f"traceback logged: {record.getMessage()[:300]}"
        assert record.levelno < logging.ERROR, f"logged at {record.levelname}: {record.getMessage()[:300]}"
    about = [r.getMessage() for r in caplog.records if method in r.getMessage()]
    assert len(about) <= most, about
    for line in about:
        assert "\n" not in line and len(line) < 400, line
    return about


@pytest.mark.parametrize(
    ("send", "method", "type_name"),
    [
        (unary, RNNSERVE + "GetSession", "rnnserve.v1.GetSessionRequest"),
        (unary, RNNSERVE + "CreateSession", "rnnserve.v1.CreateSessionRequest"),
        (unary, RNNSERVE + "Classify", "rnnserve.v1.ClassifyRequest"),
        (server_streaming, RNNSERVE + "Generate", "rnnserve.v1.GenerateRequest"),
        (unary, HEALTH + "Check", "grpc.health.v1.HealthCheckRequest"),
        (server_streaming, HEALTH + "Watch", "grpc.health.v1.HealthCheckRequest"),
    ],
)
def test_request_with_bad_utf8_is_invalid_argument(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture, send: Send, method: str, type_name: str
) -> None:
    caplog.set_level(logging.INFO)
    error = failure(send, channel, method, BAD_UTF8)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details() == (
        f"the request is not a valid {type_name}: String field had bad UTF-8 "
        "(string fields must be valid UTF-8)"
    )
    assert_concise_log(caplog, method)


@pytest.mark.parametrize(
    ("method", "type_name"),
    [
        (RNNSERVE + "Stream", "rnnserve.v1.StreamRequest"),
        (REFLECTION, "grpc.reflection.v1alpha.ServerReflectionRequest"),
    ],
)
def test_stream_message_with_bad_utf8_is_invalid_argument(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture, method: str, type_name: str
) -> None:
    caplog.set_level(logging.INFO)
    error = failure(bidi, channel, method, BAD_UTF8)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith(
        f"message 1 of the stream is not a valid {type_name}: String field had bad UTF-8"
    )
    assert_concise_log(caplog, method)


@pytest.mark.parametrize(
    ("send", "method"),
    [
        (unary, RNNSERVE + "ListModels"),
        (unary, RNNSERVE + "GetSession"),
        (server_streaming, RNNSERVE + "Generate"),
    ],
)
def test_corrupt_wire_format_is_invalid_argument(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture, send: Send, method: str
) -> None:
    caplog.set_level(logging.INFO)
    error = failure(send, channel, method, CORRUPT)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "is not a valid rnnserve.v1." in error.details()
    assert "serialized by protobuf from the service's .proto" in error.details()  # what to do about it
    assert_concise_log(caplog, method)


def test_malformed_message_mid_stream_ends_the_stream_and_leaves_the_session(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture, client: object
) -> None:
    from rnnserve.client import Client

    assert isinstance(client, Client)
    caplog.set_level(logging.INFO)
    with client.session("tiny") as session:
        good = pb.StreamRequest(session_id=session.id, text="ab").SerializeToString()
        call = channel.stream_stream(
            RNNSERVE + "Stream", request_serializer=None, response_deserializer=pb.StreamResponse.FromString
        )(iter([good, BAD_UTF8, good]), timeout=30)
        answered = []
        with pytest.raises(grpc.RpcError) as info:
            answered.extend(call)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(
            "message 2 of the stream is not a valid rnnserve.v1.StreamRequest"
        )
        assert [r.position for r in answered] == [2]
        assert session.info().position == 2  # the first message applied, nothing after it
        assert session.feed("c").position == 3
    assert_concise_log(caplog, RNNSERVE + "Stream")


def test_a_flood_of_malformed_requests_logs_one_line_and_counts_them_all(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    method = RNNSERVE + "CloseSession"  # no other test sends it malformed bytes: its log line is ours
    labels = {"service": "rnnserve.v1.RnnServe", "method": "CloseSession"}
    before = REGISTRY.get_sample_value("rnnserve_requests_malformed_total", labels) or 0.0
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    for _ in range(25):
        assert failure(unary, channel, method, BAD_UTF8).code() == grpc.StatusCode.INVALID_ARGUMENT
    # One line per interval at most (the bound allows for a machine slow enough to span intervals).
    lines = assert_concise_log(
        caplog, method, 1 + int((time.monotonic() - started) // MALFORMED_LOG_INTERVAL_S)
    )
    assert lines and lines[0].startswith(f"malformed request to {method} from ")
    assert "is not a valid rnnserve.v1.CloseSessionRequest: String field had bad UTF-8" in lines[0]
    assert REGISTRY.get_sample_value("rnnserve_requests_malformed_total", labels) == before + 25


def test_log_limiter_counts_what_it_holds_back() -> None:
    now = [100.0]
    limiter = LogLimiter(60.0, clock=lambda: now[0])
    assert limiter.allow() == 0  # the first one is logged
    assert [limiter.allow() for _ in range(3)] == [None, None, None]
    now[0] += 59.9
    assert limiter.allow() is None
    now[0] += 0.1
    assert limiter.allow() == 4  # logged, saying how many were held back since the last line
    assert limiter.allow() is None
