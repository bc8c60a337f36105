"""A Generate closed early by its client, then the session's next calls (a real server on loopback, the
real clients).

A cancelled Generate goes on until the cancel reaches the server, and its last run lands after that: the
server's session ends up ahead of the tokens the client read (a K-step block commits 8 tokens before
the first of them is sent). The client must then read the position again before its next call, and a
position read while the Generate was still open does not count. The race that once broke this: the
next Generate reads the position while the cancelled one's last run is still in flight, is refused
(the session moved on), reads the position again and is sent again, and is closed early in turn; that
read made the session count itself in sync, at the last token it read, so the call after it was
refused with FAILED_PRECONDITION (0.3-0.5% of calls in a 16-session mix of feeds, Generates and
Generates cancelled after two messages).

The Generate's next run is held in the ORT worker (HeldRuns) until the client has read the position:
no test here waits for time to pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import HeldRuns

from rnnserve.client import AsyncClient, Client, SessionInfo
from rnnserve.server.app import RnnServeServer, background_server
from rnnserve.server.config import ServerConfig

MODEL = "lstm"  # (cell_repo) with generation graphs: a sampled Generate runs in 8-token blocks
SAMPLING: dict[str, Any] = dict(max_tokens=200, ignore_eos=True, temperature=1.0, max_tokens_per_message=1)
READ = 2  # messages (one token each) a client reads before it closes a Generate


@pytest.fixture
def server(cell_repo: Path) -> Iterator[RnnServeServer]:
    """A server of our own, for HeldRuns (every run in the ORT worker, where it can be held)."""
    config = ServerConfig(repo=cell_repo, host="127.0.0.1", port=0, inline_max_tokens=0)
    with background_server(config) as running:
        yield running


def server_position(server: RnnServeServer, session_id: str) -> int:
    return server.engine.sessions.get(session_id).position


def test_the_async_client_reads_the_position_again_after_a_resent_generate_it_closed_early(
    server: RnnServeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def run() -> tuple[list[int], int, int]:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=60) as client:
            session = await client.session(MODEL)
            start = (await session.feed("def ")).position
            reads: list[int] = []  # the positions the client read (GetSession)
            with HeldRuns(server, start=2) as runs:  # the cancelled Generate's second block waits
                first = session.generate(seed=1, **SAMPLING)
                async for message in first.messages():
                    if message.position - start >= READ:
                        break
                await first.aclose()
                assert await asyncio.to_thread(runs.held.wait, 60), "the second block never ran"

                real_info = session.info

                async def info_then_release() -> SessionInfo:
                    """The position is read while the cancelled Generate's last block is held; then
                    that block lands, and the session moves on."""
                    info = await real_info()
                    reads.append(info.position)
                    runs.release()
                    return info

                monkeypatch.setattr(session, "info", info_then_release)
                second = session.generate(seed=2, **SAMPLING)
                read = 0
                async for _ in second.messages():
                    read += 1
                    if read == READ:
                        break
                await second.aclose()
            fed = await session.feed("x")  # refused with FAILED_PRECONDITION before the fix
            return reads, fed.position, server_position(server, session.id)

    reads, fed, position = asyncio.run(run())
    # The race happened: the second Generate read the position before the first's last block landed,
    # was refused, and read it again.
    assert len(reads) >= 2 and reads[1] > reads[0], reads
    assert fed == position


def test_the_sync_client_reads_the_position_again_after_a_resent_generate_it_closed_early(
    server: RnnServeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Client(f"127.0.0.1:{server.port}", timeout=60) as client:
        session = client.session(MODEL)
        session.feed("def ")
        start = session.position
        reads: list[int] = []
        with HeldRuns(server, start=2) as runs:
            first = session.generate(seed=1, **SAMPLING)
            for message in first.messages():
                if message.position - start >= READ:
                    break
            first.close()
            assert runs.held.wait(60), "the second block never ran"
            real_info = session.info

            def info_then_release() -> SessionInfo:
                info = real_info()
                reads.append(info.position)
                runs.release()
                return info

            monkeypatch.setattr(session, "info", info_then_release)
            second = session.generate(seed=2, **SAMPLING)
            for read, _ in enumerate(second.messages(), 1):
                if read == READ:
                    break
            second.close()
        fed = session.feed("x")  # refused with FAILED_PRECONDITION before the fix
        assert len(reads) >= 2 and reads[1] > reads[0], reads
        assert fed.position == server_position(server, session.id)


def test_a_position_read_while_a_generate_is_open_does_not_count_once_it_is_closed_early(
    server: RnnServeServer,
) -> None:
    """The position read mid-stream (GetSession) is already stale when the stream is closed: the
    Generate's next block lands after it. The next feed reads the position again."""
    with Client(f"127.0.0.1:{server.port}", timeout=60) as client:
        session = client.session(MODEL)
        start = session.feed("def ").position
        with HeldRuns(server, start=2) as runs:  # the Generate's second block waits
            stream = session.generate(seed=3, **SAMPLING)
            for message in stream.messages():
                if message.position - start >= READ:
                    break
            assert runs.held.wait(60), "the second block never ran"
            read = session.info().position  # before the second block lands
            runs.release()
            stream.close()
        fed = session.feed("x")  # refused with FAILED_PRECONDITION before the fix
        assert fed.position == server_position(server, session.id)
        assert fed.position > read + 1  # the second block landed after the read
