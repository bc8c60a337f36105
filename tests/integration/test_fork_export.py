"""Fork, export and import sessions with the real clients on a real server (issue 14): a copy continues
exactly as its source; and a session the server lost messages of is put back by the client's log."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rnnserve.cli import main
from rnnserve.client import (
    AsyncClient,
    Client,
    FeedOutput,
    InvalidArgumentError,
    ReloadResult,
    Session,
)
from rnnserve.server.service import RnnServeServicer
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

TEXT = "def add(a, b):\n    return a"
SAMPLING: dict[str, Any] = dict(max_tokens=16, temperature=1.0, ignore_eos=True, seed=3)


def needs(*methods: str) -> None:
    """Skip unless the server in this tree implements `methods` (the generated base only refuses them)."""
    for method in methods:
        if getattr(RnnServeServicer, method) is getattr(pb_grpc.RnnServeServicer, method):
            pytest.skip(f"server side of {method} not in this tree yet")


def same_output(a: FeedOutput, b: FeedOutput) -> None:
    assert a.position == b.position
    assert [c.id for c in a.top] == [c.id for c in b.top]
    np.testing.assert_allclose([c.logprob for c in a.top], [c.logprob for c in b.top], atol=1e-5)


def continues_alike(source: Session, copy: Session) -> None:
    """The same next-token distribution after the same input, then the same seeded generation."""
    assert copy.position == source.position and copy.model == source.model
    same_output(source.feed("    "), copy.feed("    "))
    assert [t.id for t in source.generate(**SAMPLING)] == [t.id for t in copy.generate(**SAMPLING)]


def test_a_fork_continues_exactly_as_its_source(client: Client) -> None:
    needs("ForkSession")
    with client.session("tiny") as source:
        source.feed(TEXT)
        with source.fork(ttl_seconds=60) as fork:
            assert fork.id != source.id and fork.info().ttl_seconds == 60
            continues_alike(source, fork)


def test_an_exported_session_imported_continues_exactly_as_its_source(client: Client) -> None:
    needs("ExportSession", "ImportSession")
    with client.session("tiny") as source:
        source.feed(TEXT)
        list(source.generate(**SAMPLING))  # a generation in the history too
        snapshot = source.export()
        with client.import_session(snapshot) as copy:
            assert copy.id != source.id
            continues_alike(source, copy)


def test_importing_bytes_that_are_not_a_snapshot_is_invalid_argument(client: Client) -> None:
    needs("ImportSession")
    with pytest.raises(InvalidArgumentError):
        client.import_session(b"\xff\x00 certainly not a snapshot")


def test_the_async_client_forks_exports_and_imports(client: Client, server_url: str) -> None:
    needs("ForkSession", "ExportSession", "ImportSession")

    async def run() -> list[list[int]]:
        async with AsyncClient(server_url) as aclient, aclient.session("tiny") as source:
            await source.feed(TEXT)
            fork = await source.fork()
            async with aclient.import_session(await source.export()) as imported:
                runs = [[t.id async for t in s.generate(**SAMPLING)] for s in (source, fork, imported)]
            await fork.close()
            return runs

    first, *copies = asyncio.run(run())
    assert copies == [first, first]
    with client.session("tiny") as reference:
        reference.feed(TEXT)
        assert [t.id for t in reference.generate(**SAMPLING)] == first


def test_a_session_the_server_lost_messages_of_is_restored_from_the_client_log(client: Client) -> None:
    """The server loses the last messages of a session (as a restart with write-behind persistence may):
    simulated by importing a snapshot taken before them and pointing the client's handle at the copy.
    The next feed is refused (the server is behind); the client resends its feed and its generation from
    the server's position, then the message, and the session ends up as if nothing was lost."""
    needs("ExportSession", "ImportSession")
    with client.session("tiny") as reference, client.session("tiny") as session:
        for handle in (reference, session):
            handle.feed(TEXT)
        snapshot = session.export()
        for handle in (reference, session):
            handle.feed("    ")
            list(handle.generate(**SAMPLING))
        behind = client.import_session(snapshot)  # the session as the server kept it
        assert behind.position == len(TEXT) < session.position
        session.close()
        session.id, session.closed = behind.id, False
        for entry in session._log.entries:  # the same messages, addressed to the copy
            entry.request.session_id = behind.id
        same_output(reference.feed("x"), session.feed("x"))
        assert session.info().position == reference.position


def test_reload_models_reports_what_changed(client: Client) -> None:
    needs("ReloadModels")
    result = client.reload_models()
    assert isinstance(result, ReloadResult)
    assert result.refused == [] and result.unloaded == []


def test_the_cli_exports_imports_and_forks_sessions(
    client: Client, server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    needs("ForkSession", "ExportSession", "ImportSession", "ReloadModels")
    with client.session("tiny") as source:
        source.feed(TEXT)
        path = tmp_path / "session.bin"
        assert main(["session", "export", source.id, "-o", str(path), "--url", server_url]) == 0
        assert main(["session", "import", str(path), "--url", server_url]) == 0
        imported = capsys.readouterr().out.strip()
        assert main(["session", "fork", source.id, "--url", server_url]) == 0
        forked = capsys.readouterr().out.strip()
        with client.attach(imported) as first, client.attach(forked) as second:
            assert first.position == source.position
            continues_alike(first, second)
        assert main(["reload", "--url", server_url]) == 0
        assert main(["session", "fork", "0" * 32, "--url", server_url]) == 1  # NOT_FOUND, said plainly
