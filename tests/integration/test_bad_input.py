"""Bad input gets the right status and a message a person can act on; other sessions carry on."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from rnnserve.client import (
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from rnnserve.v1 import rnnserve_pb2 as pb


@pytest.fixture
def bystander(client: Client):  # type: ignore[no-untyped-def]
    """A session fed before each bad request; it must be unaffected afterwards."""
    with client.session("tiny") as session:
        before = session.feed("def f(x):")
        yield session
        after_ref = client.session("tiny")
        expected = after_ref.feed("def f(x):    return")
        got = session.feed("    return")
        after_ref.close()
        assert got.position == expected.position == before.position + 10
        assert [c.id for c in got.top] == [c.id for c in expected.top]


def test_unknown_model(client: Client, bystander: object) -> None:
    with pytest.raises(NotFoundError, match=r"model 'nope' is not loaded \(models: bi, live, tiny\)"):
        client.session("nope")
    with pytest.raises(NotFoundError, match="no version '9'"):
        client.session("tiny", version="9")


def test_unknown_session(client: Client, bystander: object) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        client.attach("0" * 32)


def test_token_id_out_of_range_leaves_the_session_as_it_was(client: Client, bystander: object) -> None:
    with client.session("tiny") as session:
        session.feed("def ")
        with pytest.raises(InvalidArgumentError, match=r"token id 100000 at index 1 is out of range"):
            session.feed([3, 100000, 4])
        assert session.info().position == 4
        assert session.feed("x").position == 5  # the next message opens a new stream and works


def test_empty_inputs(client: Client, bystander: object) -> None:
    with client.session("tiny") as session:
        with pytest.raises(InvalidArgumentError, match="empty"):
            session.feed("")
        with pytest.raises(InvalidArgumentError, match="no tokens"):
            session.feed([])


def test_oversized_message(client: Client, bystander: object) -> None:
    with client.session("tiny") as session:
        with pytest.raises(ResourceExhaustedError):
            session.feed("x" * 300_000)  # the test server allows 256 KiB messages
        assert session.info().position == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -0.5}, "temperature must be in"),
        ({"top_p": 1.5}, "top_p must be in"),
        ({"top_k": 10_000_000}, "top_k must be in"),
        ({"max_tokens": 0}, "max_tokens must be in"),
        ({"max_tokens": 10**6}, "max_tokens must be in"),
        ({"stop_token_ids": [10**6]}, "stop_token_ids"),
        ({"stop": [""]}, "non-empty"),
        ({"flush_interval_ms": 5000}, r"flush_interval_ms must be in \[0, 1000\]"),
    ],
)
def test_nonsense_sampling_parameters(client: Client, bystander: object, kwargs: dict, match: str) -> None:
    with client.session("tiny") as session:
        with pytest.raises(InvalidArgumentError, match=match):
            list(session.generate("def ", **kwargs))
        assert session.info().position == 0  # nothing was applied, not even the prompt


def test_top_k_of_stream_reply_is_bounded(client: Client, bystander: object) -> None:
    with client.session("tiny") as session, pytest.raises(InvalidArgumentError, match="top_k"):
        session.feed("a", top_k=1000)


def test_position_gap_is_failed_precondition(client: Client, bystander: object) -> None:
    with client.session("tiny") as session:
        session.feed("abc")
        with pytest.raises(FailedPreconditionError, match="is at position 3, but the request expected 7"):
            session.feed("d", expected_position=7)
        with pytest.raises(FailedPreconditionError, match="position 3"):
            list(session.generate(max_tokens=2, expected_position=0))


def test_closed_session_is_gone(client: Client, bystander: object) -> None:
    session = client.session("tiny")
    session.close()
    with pytest.raises(NotFoundError):
        session.feed("a")


def test_stream_without_session_id_and_switching_sessions(client: Client, bystander: object) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(client.stub.Stream(iter([pb.StreamRequest(text="a")])))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message of a stream must carry session_id" in info.value.details()
    with client.session("tiny") as a, client.session("tiny") as b:
        requests = [pb.StreamRequest(session_id=a.id, text="a"), pb.StreamRequest(session_id=b.id, text="b")]
        with pytest.raises(grpc.RpcError) as info:
            list(client.stub.Stream(iter(requests)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert a.info().position == 1 and b.info().position == 0


# -- client input repeated in a status message (issue 12, item 5) -----------------------------------------
# A status message travels in trailing metadata, which clients refuse above 16 KiB: a message repeating a
# 20 kB input whole reached the client as RESOURCE_EXHAUSTED "received metadata size exceeds hard limit".
SHORT = 2200  # bytes: the server cuts any status message to 2,048 UTF-8 bytes (plus a note saying so)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert isinstance(info.value, grpc.RpcError)
    return info.value


def assert_short(error: grpc.RpcError, code: grpc.StatusCode, starts: str) -> str:
    details = error.details() or ""
    assert error.code() == code, details[:300]
    assert len(details.encode()) <= SHORT, len(details.encode())
    assert details.startswith(starts), details[:300]
    return details


@pytest.mark.parametrize(
    ("session_id", "starts"),
    [("z" * 20_000, "session 'zzz"), ("😀" * 20_000, "session '😀😀😀")],  # 😀: 4 bytes, sent as %F0%9F%98%80
)
def test_long_session_id_is_not_found_with_a_short_message(
    client: Client, bystander: object, session_id: str, starts: str
) -> None:
    error = rpc_error(lambda: client.stub.GetSession(pb.GetSessionRequest(session_id=session_id)))
    assert_short(error, grpc.StatusCode.NOT_FOUND, starts)
    error = rpc_error(lambda: client.stub.CloseSession(pb.CloseSessionRequest(session_id=session_id)))
    assert_short(error, grpc.StatusCode.NOT_FOUND, starts)


def test_long_model_name_or_version_is_not_found_with_a_readable_message(
    client: Client, bystander: object
) -> None:
    error = rpc_error(lambda: client.stub.CreateSession(pb.CreateSessionRequest(model="m" * 20_000)))
    details = assert_short(error, grpc.StatusCode.NOT_FOUND, "model 'mmm")
    assert details == f"model {'m' * 64!r}… (+19,936 more characters) is not loaded (models: bi, live, tiny)"
    request = pb.CreateSessionRequest(model="tiny", version="9" * 20_000)
    details = assert_short(
        rpc_error(lambda: client.stub.CreateSession(request)), grpc.StatusCode.NOT_FOUND, ""
    )
    assert details == f"model 'tiny' has no version {'9' * 64!r}… (+19,936 more characters) (versions: 1)"
    classify = pb.ClassifyRequest(model="m" * 20_000, texts=["fun"])
    error = rpc_error(lambda: client.stub.Classify(classify))
    assert_short(error, grpc.StatusCode.NOT_FOUND, "model 'mmm")


def test_thousands_of_bad_stop_token_ids_are_invalid_argument_with_a_short_message(
    client: Client, bystander: object
) -> None:
    with client.session("tiny") as session:
        request = pb.GenerateRequest(
            session_id=session.id, max_tokens=2, stop_token_ids=list(range(10**6, 10**6 + 5_000))
        )
        error = rpc_error(lambda: list(client.stub.Generate(request)))
        assert_short(error, grpc.StatusCode.INVALID_ARGUMENT, "stop_token_ids [1000000, 1000001")
        assert session.info().position == 0


def test_stream_switching_to_a_long_session_id_is_invalid_argument_with_a_readable_message(
    client: Client, bystander: object
) -> None:
    with client.session("tiny") as session:
        requests = [
            pb.StreamRequest(session_id=session.id, text="a"),
            pb.StreamRequest(session_id="q" * 20_000),
        ]
        error = rpc_error(lambda: list(client.stub.Stream(iter(requests))))
        details = assert_short(error, grpc.StatusCode.INVALID_ARGUMENT, "this stream is bound to session")
        assert details.endswith(f"open another stream for {'q' * 64!r}… (+19,936 more characters)")
        assert session.info().position == 1


def test_an_answer_larger_than_the_request_limit_is_sent(client: Client, bystander: object) -> None:
    # 60,000 ids (a 60 kB request) answered with their log-probabilities (~300 kB), over the test
    # server's 256 KiB message limit: the answer goes out, it does not end as RESOURCE_EXHAUSTED with the
    # message applied to the session anyway.
    with client.session("tiny") as session:
        result = session.feed([1] * 60_000, token_logprobs=True)
        assert result.position == session.info().position == 60_000
        assert len(result.token_logprobs) == 60_000
