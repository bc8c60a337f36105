"""Races between clients of one server, over gRPC on loopback with the real client (issue 12).

Each race is set up with a hook inside the real server that reports (through a threading.Event) the
moment the race needs: two requests waiting for a session, a tokenisation in progress. Nothing waits
for a time to pass, so the outcome does not depend on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from rnnserve.client import Client
from rnnserve.client.errors import NotFoundError
from rnnserve.server.app import RnnServeServer, background_server
from rnnserve.server.config import ServerConfig
from rnnserve.server.inputs import INLINE_TOKENIZE_CHARS
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

FEED = "def add(a, b):\n    return a + b\n" * 19  # 608 characters: longer than one chunk (256 tokens)


@pytest.fixture
def server(lm_repo: Path) -> Iterator[RnnServeServer]:
    """A server of our own, for the hooks (4 MiB messages, as the default server takes)."""
    config = ServerConfig(repo=lm_repo, host="127.0.0.1", port=0, max_message_bytes=4 * 1024 * 1024)
    with background_server(config) as running:
        yield running


class ReportingLock(asyncio.Lock):
    """A session lock that sets `two_waiting` once two requests wait for it (on the server's loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.waited = 0
        self.two_waiting = threading.Event()

    async def acquire(self) -> bool:
        if self.locked():
            self.waited += 1
            if self.waited >= 2:
                self.two_waiting.set()
        return await super().acquire()


def test_closing_a_session_while_feeds_wait_on_it_refuses_them_and_stops_its_generate(
    server: RnnServeServer,
) -> None:
    """Item 1, as reported: a Generate whose reader stalls (small HTTP/2 windows), two long feeds from
    other streams waiting for the session, CloseSession. The feeds get NOT_FOUND, the Generate stops
    early with NOT_FOUND, and new sessions get rows of their own."""
    url = f"127.0.0.1:{server.port}"
    stalled = grpc.insecure_channel(
        url, options=[("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    )
    with Client(url, timeout=60) as client, stalled, ThreadPoolExecutor(2) as pool:
        session = client.session("tiny")
        lock = ReportingLock()
        server.engine.sessions.get(session.id).lock = lock
        request = pb.GenerateRequest(
            session_id=session.id, max_tokens=4000, ignore_eos=True, prompt_text="de"
        )
        generate = pb_grpc.RnnServeStub(stalled).Generate(request, timeout=60)
        first = next(generate)  # then this reader stops reading: the server's writes stall
        feeds = [pool.submit(client.attach(session.id).feed, FEED) for _ in range(2)]
        assert lock.two_waiting.wait(60), "the feeds never reached the session"
        session.close()
        made = [first]
        with pytest.raises(grpc.RpcError) as ended:
            made += list(generate)
        assert ended.value.code() == grpc.StatusCode.NOT_FOUND, ended.value
        assert 1 <= len(made) < 4000
        for feed in feeds:
            with pytest.raises(NotFoundError):
                feed.result(timeout=60)
        with pytest.raises(NotFoundError):
            session.info()
        # New sessions: distinct rows, each as a fresh session fed the same text.
        a, b, fresh = client.session("tiny"), client.session("tiny"), client.session("tiny")
        a.feed(FEED)
        b.feed("class Point:")
        fresh.feed(FEED)
        got, expected = a.feed("x", top_k=8), fresh.feed("x", top_k=8)
        assert [c.id for c in got.top] == [c.id for c in expected.top]
        assert [c.logprob for c in got.top] == pytest.approx([c.logprob for c in expected.top], abs=1e-6)
        slab = server.engine.sessions.slab(server.engine.repository.get("tiny"))
        assert slab.in_use == 3


def test_a_big_message_is_tokenised_off_the_event_loop_while_other_clients_are_served(
    server: RnnServeServer,
) -> None:
    """Item 3: the tokenizer is held inside a big message's tokenisation (by a hook around the real
    tokenizer) while another client calls ListModels: the call is answered meanwhile, and the
    tokenisation ran on another thread than the event loop's."""
    codec = server.engine.repository.get("tiny").codec
    started, release = threading.Event(), threading.Event()
    threads: list[int] = []

    class Held:
        """The real tokenizer, held in big encodings until the test releases it."""

        def __init__(self, tokenizer: Any) -> None:
            self.tokenizer = tokenizer

        def __getattr__(self, name: str) -> Any:
            method = getattr(self.tokenizer, name)
            if name not in ("encode", "encode_batch"):
                return method

            def held(texts: Any, *args: Any, **kwargs: Any) -> Any:
                if sum(map(len, [texts] if isinstance(texts, str) else texts)) > INLINE_TOKENIZE_CHARS:
                    threads.append(threading.get_ident())
                    started.set()
                    release.wait(60)
                return method(texts, *args, **kwargs)

            return held

    loop_thread = asyncio.run_coroutine_threadsafe(_thread_ident(), server.loop).result(10)  # type: ignore[arg-type]
    codec.tokenizer = Held(codec.tokenizer)  # type: ignore[assignment]
    big = "def add(a, b):\n    return a + b\n" * 2000  # 64,000 characters, one message
    url = f"127.0.0.1:{server.port}"
    try:
        with (
            Client(url, timeout=60) as client,
            Client(url, timeout=60) as other,
            ThreadPoolExecutor(1) as pool,
        ):
            session = client.session("tiny")
            feed = pool.submit(session.feed, big)
            assert started.wait(60), "the big message was never tokenised"
            assert [m.name for m in other.models()]  # answered while the tokenisation is held
            assert not feed.done()
            release.set()
            assert feed.result(timeout=60).position == len(big)
        assert threads and loop_thread not in threads
    finally:
        release.set()
        codec.tokenizer = codec.tokenizer.tokenizer  # type: ignore[attr-defined]


async def _thread_ident() -> int:
    return threading.get_ident()
