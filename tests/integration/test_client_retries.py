"""The clients' retries (issue 14), through a real gRPC proxy that breaks calls (tests/faults.py) in
front of a real server: every message is applied once and every token seen once, whatever is retried.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from faults import FaultProxy

from rnnserve.client import (
    AsyncClient,
    Client,
    FeedOutput,
    InvalidArgumentError,
    NotFoundError,
    RetryPolicy,
    SessionDiverged,
    UnavailableError,
)
from rnnserve.client.retry import Attempts
from rnnserve.client.session_log import LoggedInput, SessionLog
from rnnserve.server import generate_call
from rnnserve.v1 import rnnserve_pb2 as pb

TEXT = "def add(a, b):\n    return a"
FAST = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.01)  # retries without waiting long
SAMPLING: dict[str, Any] = dict(max_tokens=24, temperature=1.0, ignore_eos=True, max_tokens_per_message=1)


@pytest.fixture
def proxy(server_url: str) -> Iterator[FaultProxy]:
    with FaultProxy(server_url) as running:
        yield running


def needs_generate_retries() -> None:
    if "request_id" not in inspect.getsource(generate_call):
        pytest.skip("server side of GenerateRequest.request_id not in this tree yet")


def same_output(a: FeedOutput, b: FeedOutput) -> None:
    assert a.position == b.position
    assert [c.id for c in a.top] == [c.id for c in b.top]
    np.testing.assert_allclose([c.logprob for c in a.top], [c.logprob for c in b.top], atol=1e-5)


# -- the pure pieces --------------------------------------------------------------------------------


def test_backoff_has_full_jitter_under_its_cap_and_attempts_are_bounded() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.1, max_backoff_s=0.3, multiplier=2.0)
    assert all(0 <= policy.backoff(n) <= min(0.3, 0.1 * 2**n) for n in range(6) for _ in range(50))
    attempts = Attempts(policy)
    down = UnavailableError("down", grpc.StatusCode.UNAVAILABLE)
    assert attempts.retry_after(down) is not None and attempts.retry_after(down) is not None
    assert attempts.retry_after(down) is None  # the third attempt was the last
    assert Attempts(policy).retry_after(InvalidArgumentError("bad", grpc.StatusCode.INVALID_ARGUMENT)) is None
    assert Attempts(None).retry_after(down) is None
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def _input(start: int, end: int) -> LoggedInput:
    return LoggedInput(start, end, pb.StreamRequest(tokens=pb.TokenIds(ids=[2] * (end - start))))


def test_session_log_resends_from_a_boundary_and_says_what_it_cannot() -> None:
    log = SessionLog(0, max_messages=3, max_tokens=100)
    for start, end in [(0, 5), (5, 9), (9, 20), (20, 30)]:
        log.add(_input(start, end))
    assert log.floor == 5 and log.end == 30  # bounded: 3 messages
    assert log.resend_from(30, 30) is None and log.resend_from(31, 30) is None  # the server is not behind
    assert log.resend_from(3, 25) is None  # the client's message does not start where the log ends
    assert [e.start for e in log.resend_from(9, 30) or []] == [9, 20]
    with pytest.raises(SessionDiverged, match="inside a feed of 11 tokens"):
        log.resend_from(12, 30)
    with pytest.raises(SessionDiverged, match="only from position 5"):
        log.resend_from(0, 30)
    log.add(_input(40, 41))  # not after the last: what came between is unknown
    assert log.floor == 40
    with pytest.raises(SessionDiverged):
        log.resend_from(35, 41)
    big = SessionLog(0, max_messages=10, max_tokens=10)
    big.add(_input(0, 4))
    big.add(_input(4, 8))
    big.add(_input(8, 11))  # over the token bound: the oldest goes
    assert big.floor == 4 and len(big.entries) == 2
    big.add(_input(11, 23))  # longer than the bound alone: nothing is kept
    assert big.floor == 23 and big.entries == ()


# -- feeds ------------------------------------------------------------------------------------------


def test_a_feed_whose_reply_was_lost_is_applied_once(proxy: FaultProxy, client: Client) -> None:
    with client.session("tiny") as reference, Client(proxy.url, retry=FAST) as through:
        expected = reference.feed(TEXT)
        with through.session("tiny") as session:
            session.feed(TEXT[:10])
            proxy.faults.drop_reply("Stream")
            got = session.feed(TEXT[10:])
            assert got.replayed and proxy.faults.calls["Stream"] == 2  # a new stream for the retry
            same_output(expected, got)
            same_output(reference.feed("x"), session.feed("x"))
            assert session.info().position == len(TEXT) + 1


def test_the_async_client_applies_a_feed_whose_reply_was_lost_once(proxy: FaultProxy, client: Client) -> None:
    with client.session("tiny") as reference:
        expected = reference.feed(TEXT)

    async def run() -> FeedOutput:
        async with AsyncClient(proxy.url, retry=FAST) as aclient, aclient.session("tiny") as session:
            await session.feed(TEXT[:10])
            proxy.faults.drop_reply("Stream")
            got = await session.feed(TEXT[10:])
            assert (await session.info()).position == len(TEXT)
            return got

    got = asyncio.run(run())
    assert got.replayed
    same_output(expected, got)


# -- generations ------------------------------------------------------------------------------------


def test_a_generation_cut_off_is_reissued_and_yields_each_token_once(
    proxy: FaultProxy, client: Client
) -> None:
    needs_generate_retries()
    with client.session("tiny") as reference:
        reference.feed(TEXT)
        expected = [t.id for t in reference.generate(seed=11, **SAMPLING)]
        after = reference.feed("x")
    with Client(proxy.url, retry=FAST) as through, through.session("tiny") as session:
        session.feed(TEXT)
        proxy.faults.cut_stream("Generate", 5)
        proxy.faults.cut_stream("Generate", 12)  # the reissued call is cut too, further on
        stream = session.generate(seed=11, **SAMPLING)
        tokens = list(stream)
        assert [t.id for t in tokens] == expected == [t.id for t in stream.tokens]
        assert [t.position for t in tokens] == list(range(len(TEXT) + 1, len(TEXT) + 25))
        assert stream.finish_reason == "length" and proxy.faults.calls["Generate"] == 3
        same_output(after, session.feed("x"))


def test_without_a_seed_the_client_picks_one_and_a_retry_samples_the_same(
    proxy: FaultProxy, client: Client
) -> None:
    needs_generate_retries()
    with Client(proxy.url, retry=FAST) as through, through.session("tiny") as session:
        session.feed(TEXT)
        proxy.faults.cut_stream("Generate", 3)
        stream = session.generate(**SAMPLING)
        got = [t.id for t in stream]
        seed = stream.seed
    with client.session("tiny") as reference:
        reference.feed(TEXT)
        assert [t.id for t in reference.generate(seed=seed, **SAMPLING)] == got


def test_the_async_client_reissues_a_generation_cut_off(proxy: FaultProxy, client: Client) -> None:
    needs_generate_retries()
    with client.session("tiny") as reference:
        reference.feed(TEXT)
        expected = [t.id for t in reference.generate(seed=5, **SAMPLING)]

    async def run() -> tuple[list[int], str | None]:
        async with AsyncClient(proxy.url, retry=FAST) as aclient, aclient.session("tiny") as session:
            await session.feed(TEXT)
            proxy.faults.cut_stream("Generate", 7)
            stream = session.generate(seed=5, **SAMPLING)
            ids = [t.id async for t in stream]
            assert (await session.info()).position == len(TEXT) + len(ids)
            return ids, stream.finish_reason

    assert asyncio.run(run()) == (expected, "length")


# -- the policy -------------------------------------------------------------------------------------


def test_retries_stop_after_max_attempts_with_the_last_error(proxy: FaultProxy) -> None:
    proxy.faults.refuse("ListModels", 4)
    with Client(proxy.url, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.001)) as through:
        with pytest.raises(UnavailableError, match="ListModels refused"):
            through.models()
        assert proxy.faults.calls["ListModels"] == 3
        with Client(proxy.url, retry=None) as once, pytest.raises(UnavailableError):
            once.models()
        assert proxy.faults.calls["ListModels"] == 4
        proxy.faults.refuse("ListModels", 2)
        assert [m for m in through.models() if m.name == "tiny"]  # the third attempt gets through
        with through.session("tiny") as session, pytest.raises(InvalidArgumentError):
            session.feed([10**6])  # an answer, not retried
        assert proxy.faults.calls["Stream"] == 1


def test_a_retried_close_that_finds_the_session_gone_succeeded(proxy: FaultProxy) -> None:
    with Client(proxy.url, retry=FAST) as through:
        session = through.session("tiny")
        proxy.faults.drop_reply("CloseSession")  # closed on the server; the reply is lost
        session.close()
        assert proxy.faults.calls["CloseSession"] == 2  # the retry got NOT_FOUND: closed
        with pytest.raises(NotFoundError):
            through.attach(session.id)
        other = through.session("tiny")
        again = through.attach(other.id)
        other.close()
        with pytest.raises(NotFoundError):  # without a lost reply, NOT_FOUND stays an error
            again.close()

    async def run() -> None:
        async with AsyncClient(proxy.url, retry=FAST) as aclient:
            session = await aclient.session("tiny")
            proxy.faults.drop_reply("CloseSession")
            await session.close()

    asyncio.run(run())
    assert proxy.faults.calls["CloseSession"] == 6
