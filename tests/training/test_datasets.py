"""`rnnserve data fetch`: sha256-checked, cached, atomic downloads and unpacking, from a loopback HTTP server
serving ../shared/data (and archives built from it)."""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import io
import re
import shutil
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from rnnserve.training import cli
from rnnserve.training.classifier_data import load_labelled
from rnnserve.training.data import load_corpus
from rnnserve.training.datasets import (
    REGISTRY,
    ChecksumError,
    DataFetchError,
    DataFile,
    Dataset,
    fetch,
    sha256_of,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "tiny-shakespeare" / "input.txt").is_file(),
    reason="../shared/data (the project's copy of the public data sets) is absent",
)
Serve = functools.partial[str]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _CutHandler(_QuietHandler):
    """Announces the whole file's Content-Length, sends half of it, then closes the connection."""

    def do_GET(self) -> None:
        body = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def serve() -> Iterator[Serve]:
    """serve(directory, cut=False) -> base URL of a loopback HTTP server for that directory (stopped
    afterwards); `cut` makes it break off every transfer halfway."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(directory: Path, cut: bool = False) -> str:
        handler = functools.partial(_CutHandler if cut else _QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield functools.partial(start)
    for server in servers:
        server.shutdown()
        server.server_close()


def _closed_port_url() -> str:
    """A loopback URL nobody answers on (connection refused): what being offline looks like."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietHandler)
    port = server.server_address[1]
    server.server_close()
    return f"http://127.0.0.1:{port}"


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@needs_shared_data
def test_fetch_checks_sha256_and_caches(tmp_path: Path, serve: Serve) -> None:
    folder = fetch("tiny-shakespeare", tmp_path / "cache", base_url=serve(SHARED_DATA), progress=True)
    target = folder / "input.txt"
    assert folder == tmp_path / "cache" / "tiny-shakespeare"
    assert sha256_of(target) == REGISTRY["tiny-shakespeare"].files[0].sha256
    mtime = target.stat().st_mtime_ns
    assert fetch("tiny-shakespeare", tmp_path / "cache", base_url=_closed_port_url()) == folder  # cached
    assert target.stat().st_mtime_ns == mtime and _entries(folder) == ["input.txt"]


@needs_shared_data
def test_verified_registry_checksums_match_the_shared_files() -> None:
    verified = [d for d in REGISTRY.values() if d.verified]
    assert verified, "at least Tiny Shakespeare is verified against ../shared/data"
    for dataset in verified:
        assert dataset.checksums.startswith("verified")
        for file in dataset.files:
            assert sha256_of(SHARED_DATA / dataset.name / file.path) == file.sha256, (dataset.name, file.path)


def test_registry_covers_the_standard_sets_with_urls_and_sha256() -> None:
    for name in ("tiny-shakespeare", "wikitext-2", "wikitext-103", "penn-treebank", "sst-2", "imdb"):
        assert name in REGISTRY
    for dataset in REGISTRY.values():
        assert "{folder}" in dataset.usage and dataset.checksums
        assert dataset.verified == dataset.checksums.startswith("verified")
        for file in dataset.files:
            assert file.url.startswith("https://") and re.fullmatch(r"[0-9a-f]{64}", file.sha256)
            assert not file.unpack or file.path.endswith((".zip", ".tar.gz"))


@needs_shared_data
def test_cli_data_fetch_with_mirror_env(
    tmp_path: Path, serve: Serve, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RNNSERVE_DATA_URL", serve(SHARED_DATA))
    monkeypatch.setenv("RNNSERVE_DATA_DIR", str(tmp_path / "env-cache"))
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "fetch", "tiny-shakespeare", "--no-progress"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "env-cache" / "tiny-shakespeare"
    assert f"--data {folder}/input.txt" in out
    assert _entries(folder) == ["input.txt"]
    args = parser.parse_args(["data", "list"])
    assert args.func(args) == 0
    assert "imdb:" in capsys.readouterr().out


def test_corrupted_download_is_a_checksum_error_and_leaves_nothing(tmp_path: Path, serve: Serve) -> None:
    mirror = tmp_path / "mirror" / "tiny-shakespeare"
    mirror.mkdir(parents=True)
    (mirror / "input.txt").write_text("First Citizen:\nnot quite the real thing\n")
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match="sha256"):
        fetch("tiny-shakespeare", cache, base_url=serve(tmp_path / "mirror"))
    assert _entries(cache / "tiny-shakespeare") == []  # no input.txt, no .part file


@needs_shared_data
def test_interrupted_transfer_leaves_nothing_half_written(tmp_path: Path, serve: Serve) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DataFetchError, match=r"IncompleteRead|ended after"):
        fetch("tiny-shakespeare", cache, base_url=serve(SHARED_DATA, cut=True))
    assert _entries(cache / "tiny-shakespeare") == []
    folder = fetch("tiny-shakespeare", cache, base_url=serve(SHARED_DATA))  # a rerun completes it
    assert _entries(folder) == ["input.txt"]


def test_offline_error_points_to_local_data(tmp_path: Path, serve: Serve) -> None:
    for base in (_closed_port_url(), serve(tmp_path / "empty")):  # connection refused; 404
        with pytest.raises(DataFetchError, match="--data") as err:
            fetch("penn-treebank", tmp_path / "cache", base_url=base)
        message = str(err.value)
        assert "RNNSERVE_DATA_DIR" in message and "RNNSERVE_DATA_URL" in message
        assert str(tmp_path / "cache" / "penn-treebank") in message
        assert _entries(tmp_path / "cache" / "penn-treebank") == []
    with pytest.raises(DataFetchError, match="unknown data set"):
        fetch("imagenet", tmp_path / "cache")


def _publish(mirror: Path, name: str, archive: str, data: bytes) -> Dataset:
    """Put `data` on the mirror as <name>/<archive>; the Dataset that fetches and unpacks it."""
    (mirror / name).mkdir(parents=True)
    (mirror / name / archive).write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    return Dataset(name, "test archive", (DataFile(archive, "https://example.invalid/x", sha, unpack=True),),
                   "rnnserve train lm --data {folder}", "test", verified=False)  # fmt: skip


@needs_shared_data
def test_zip_archive_is_unpacked_after_the_checksum_into_a_wikitext_layout(
    tmp_path: Path, serve: Serve
) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:  # WikiText's own zip layout
        z.write(SHARED_DATA / "wikitext-2" / "valid.txt", "wikitext-2/wiki.train.tokens")
        z.write(SHARED_DATA / "wikitext-2" / "test.txt", "wikitext-2/wiki.valid.tokens")
    dataset = _publish(tmp_path / "mirror", "wt", "wt.zip", buf.getvalue())
    folder = fetch(dataset, tmp_path / "cache", base_url=serve(tmp_path / "mirror"))
    unpacked = folder / "wikitext-2"
    assert (unpacked / "wiki.train.tokens").read_bytes() == (
        SHARED_DATA / "wikitext-2" / "valid.txt"
    ).read_bytes()
    assert _entries(folder) == [".wt.zip.unpacked", "wikitext-2", "wt.zip"]  # no staging folder left
    assert fetch(dataset, tmp_path / "cache", base_url=_closed_port_url()) == folder  # cached
    corpus = load_corpus(unpacked)  # the layout is picked up: train and valid files, tokenized lines
    assert corpus.tokenized and corpus.sources["train"].endswith("wiki.train.tokens")
    assert len(corpus.train) == 3760 and len(corpus.valid) == 4358


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tar_gz_archive_copied_into_the_cache_is_unpacked_offline(tmp_path: Path, serve: Serve) -> None:
    reviews = {  # IMDB's layout: aclImdb/<split>/<label>/<id>_<stars>.txt
        "aclImdb/train/pos/0_9.txt": b"a wonderful film",
        "aclImdb/train/neg/0_2.txt": b"a dull mess",
        "aclImdb/train/unsup/0_0.txt": b"unlabelled",
        "aclImdb/test/pos/1_8.txt": b"great fun",
    }
    dataset = _publish(tmp_path / "mirror", "reviews", "reviews.tar.gz", _tar_gz(reviews))
    cache = tmp_path / "cache"
    (cache / "reviews").mkdir(parents=True)
    shutil.copy(tmp_path / "mirror" / "reviews" / "reviews.tar.gz", cache / "reviews")  # a local copy
    (cache / "reviews" / "aclImdb").mkdir()  # debris of an unpacking that was interrupted
    (cache / "reviews" / "aclImdb" / "partial.txt").write_text("half")
    folder = fetch(dataset, cache, base_url=_closed_port_url())  # no network needed
    assert load_labelled(folder / "aclImdb" / "train") == (
        ["a dull mess", "a wonderful film"],
        [0, 1],
        ["neg", "pos"],
    )
    assert not (folder / "aclImdb" / "partial.txt").exists()


def test_archive_member_outside_the_folder_is_refused(tmp_path: Path, serve: Serve) -> None:
    dataset = _publish(tmp_path / "mirror", "evil", "evil.tar.gz", _tar_gz({"../escaped.txt": b"x"}))
    with pytest.raises(DataFetchError, match="cannot unpack"):
        fetch(dataset, tmp_path / "cache", base_url=serve(tmp_path / "mirror"))
    assert not (tmp_path / "cache" / "escaped.txt").exists()
    assert _entries(tmp_path / "cache" / "evil") == ["evil.tar.gz"]  # verified archive kept, no marker
