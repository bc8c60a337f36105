"""The asyncio client gives what the sync client gives, and the same errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rnnserve.client import (
    AsyncClient,
    AsyncGenerateStream,
    Client,
    GenerateMessage,
    InvalidArgumentError,
    NotFoundError,
    RnnserveError,
)

TEXT = "def add(a, b):\n    return a"


def test_async_feed_and_generate_match_the_sync_client(client: Client, server_url: str) -> None:
    with client.session("tiny") as session:
        expected_feed = session.feed(TEXT)
        expected_tokens = [t.id for t in session.generate(max_tokens=20, temperature=1.0, seed=4)]

    async def run() -> tuple[list[int], list[int], int]:
        async with AsyncClient(server_url) as aclient, await aclient.session("tiny") as session:
            for piece in (TEXT[:5], TEXT[5:]):
                out = await session.feed(piece)
            tokens = [t.id async for t in session.generate(max_tokens=20, temperature=1.0, seed=4)]
            return [c.id for c in out.top], tokens, (await session.info()).position

    top, tokens, position = asyncio.run(run())
    assert top == [c.id for c in expected_feed.top]
    assert tokens == expected_tokens
    assert position == len(TEXT) + 20


def test_async_errors_and_many_concurrent_sessions(server_url: str) -> None:
    async def run() -> list[int]:
        async with AsyncClient(server_url) as aclient:
            with pytest.raises(NotFoundError):
                await aclient.session("nope")
            session = await aclient.session("tiny")
            with pytest.raises(InvalidArgumentError, match="out of range"):
                await session.feed([10**6])
            assert (await session.feed("ok")).position == 2  # the session survived the bad message
            await session.close()

            async def one(i: int) -> int:
                async with await aclient.session("tiny") as s:
                    for _ in range(5):
                        out = await s.feed(f"x{i}")
                    return out.position

            return list(await asyncio.gather(*(one(i) for i in range(32))))

    positions = asyncio.run(run())
    assert positions == [5 * len(f"x{i}") for i in range(32)]


def test_async_session_is_an_async_context_manager_like_the_sync_clients(server_url: str) -> None:
    # Issue 12 item 10: the README's form, `async with client.session(...)`, raised TypeError ('coroutine'
    # object does not support the asynchronous context manager protocol); `await` keeps working.
    async def run() -> None:
        async with AsyncClient(server_url) as aclient:
            async with aclient.session("tiny") as session:
                assert (await session.feed("ab")).position == 2
                assert (await (await aclient.attach(session.id)).info()).position == 2
            with pytest.raises(NotFoundError):  # leaving `async with` closed the session
                await aclient.attach(session.id)
            kept = await aclient.session("tiny")  # awaited: open until closed
            async with aclient.attach(kept.id) as handle:  # attach has the same two forms
                assert handle.id == kept.id and handle.position == 0
            with pytest.raises(NotFoundError):
                await aclient.attach(kept.id)

    asyncio.run(run())


def test_async_generate_gives_messages_tokens_and_text_like_the_sync_stream(
    client: Client, server_url: str
) -> None:
    kwargs: dict[str, Any] = {"max_tokens": 30, "temperature": 1.0, "seed": 9, "ignore_eos": True}
    with client.session("tiny") as session:
        stream = session.generate(TEXT, **kwargs)
        expected = [(t.id, t.text, t.position, t.finish_reason) for t in stream]

    async def run() -> tuple[list[GenerateMessage], AsyncGenerateStream, int]:
        async with AsyncClient(server_url) as aclient, aclient.session("tiny") as session:
            async with session.generate(TEXT, **kwargs) as blocks:
                messages = [m async for m in blocks.messages()]
            with pytest.raises(RnnserveError, match="once"):
                [m async for m in blocks.messages()]
            return messages, blocks, session.position

    messages, blocks, position = asyncio.run(run())
    assert [(t.id, t.text, t.position, t.finish_reason) for m in messages for t in m.tokens] == expected
    assert [(t.id, t.text, t.position, t.finish_reason) for t in blocks.tokens] == expected
    assert blocks.text == stream.text and blocks.finish_reason == stream.finish_reason == "length"
    assert [m.finish_reason for m in messages] == [None] * (len(messages) - 1) + ["length"]
    assert position == expected[-1][2] == len(TEXT) + 30
