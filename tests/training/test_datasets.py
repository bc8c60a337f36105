"""`rnnserve data fetch`: sha256-checked, cached, atomic downloads from a loopback HTTP server."""

from __future__ import annotations

import argparse
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rnnserve.training import cli
from rnnserve.training.datasets import REGISTRY, ChecksumError, DataFetchError, fetch, sha256_of

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "tiny-shakespeare" / "input.txt").is_file(),
    reason="../shared/data (the project's copy of the public data sets) is absent",
)


@pytest.fixture
def serve() -> Iterator[functools.partial[str]]:
    """serve(directory) -> base URL of a loopback HTTP server for that directory (stopped afterwards)."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(directory: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield functools.partial(start)
    for server in servers:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@needs_shared_data
def test_fetch_checks_sha256_and_caches(tmp_path: Path, serve: functools.partial[str]) -> None:
    base = serve(SHARED_DATA)
    folder = fetch("tiny-shakespeare", tmp_path / "cache", base_url=base)
    target = folder / "input.txt"
    assert folder == tmp_path / "cache" / "tiny-shakespeare"
    assert sha256_of(target) == REGISTRY["tiny-shakespeare"].files[0].sha256
    mtime = target.stat().st_mtime_ns
    assert fetch("tiny-shakespeare", tmp_path / "cache", base_url="http://127.0.0.1:9") == folder  # cached
    assert target.stat().st_mtime_ns == mtime and sorted(p.name for p in folder.iterdir()) == ["input.txt"]


@needs_shared_data
def test_cli_data_fetch_with_mirror_env(
    tmp_path: Path,
    serve: functools.partial[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("RNNSERVE_DATA_URL", serve(SHARED_DATA))
    monkeypatch.setenv("RNNSERVE_DATA_DIR", str(tmp_path / "env-cache"))
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "fetch", "wikitext-2"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "env-cache" / "wikitext-2") in out and "--data" in out
    assert sorted(p.name for p in (tmp_path / "env-cache" / "wikitext-2").iterdir()) == [
        "test.txt",
        "valid.txt",
    ]


def test_corrupted_download_is_a_checksum_error_and_leaves_nothing(
    tmp_path: Path, serve: functools.partial[str]
) -> None:
    mirror = tmp_path / "mirror" / "tiny-shakespeare"
    mirror.mkdir(parents=True)
    (mirror / "input.txt").write_text("First Citizen:\nnot quite the real thing\n")
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match="sha256"):
        fetch("tiny-shakespeare", cache, base_url=serve(tmp_path / "mirror"))
    assert list((cache / "tiny-shakespeare").iterdir()) == []  # no input.txt, no .part file


def test_offline_error_points_to_local_data(tmp_path: Path, serve: functools.partial[str]) -> None:
    base = serve(tmp_path / "empty")  # 404s
    with pytest.raises(DataFetchError, match="--data") as err:
        fetch("wikitext-2", tmp_path / "cache", base_url=base)
    assert "RNNSERVE_DATA_URL" in str(err.value)
    assert list((tmp_path / "cache" / "wikitext-2").iterdir()) == []
    with pytest.raises(DataFetchError, match="unknown data set"):
        fetch("imagenet", tmp_path / "cache")
