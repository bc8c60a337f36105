"""Public data sets by name: `rnnserve data fetch NAME` downloads them, checks their sha256 and caches them.

Files land in `<cache>/<NAME>/<file>`, where the cache is `--cache-dir`, else `$RNNSERVE_DATA_DIR`, else
`~/.cache/rnnserve/data`. Each file is downloaded to a temporary file in the same folder and moved into
place only once its checksum matches, so an interrupted or corrupted download leaves nothing half-written.
`$RNNSERVE_DATA_URL` (or `--url`) replaces the publishers' URLs by a mirror laid out as
`<base>/<NAME>/<file>`.
Offline, train on a local copy instead: `rnnserve train lm --data DIR_OR_FILE`.

This module does not import torch.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "RNNSERVE_DATA_DIR"
MIRROR_ENV = "RNNSERVE_DATA_URL"
_CHUNK = 1 << 16


class DataFetchError(Exception):
    """A data set could not be fetched (unknown name, network failure, checksum mismatch)."""


class ChecksumError(DataFetchError):
    """A downloaded file's sha256 is not the registered one (nothing was written to the cache)."""


@dataclass(frozen=True)
class DataFile:
    path: str  # inside the data set's folder
    url: str  # the publisher's URL
    sha256: str


@dataclass(frozen=True)
class Dataset:
    name: str
    description: str
    files: tuple[DataFile, ...]
    train_hint: str  # the `--data` argument (relative to the data set's folder) that trains on it


_PT_EXAMPLES = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2"
REGISTRY: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            "tiny-shakespeare",
            "Tiny Shakespeare, the char-rnn corpus (1.1M chars, public domain)",
            (
                DataFile(
                    "input.txt",
                    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                ),
            ),
            "input.txt",
        ),
        Dataset(
            "wikitext-2",
            "WikiText-2 valid and test splits, tokenised with <unk> (CC BY-SA 3.0); a word-level corpus",
            (
                DataFile(
                    "valid.txt",
                    f"{_PT_EXAMPLES}/valid.txt",
                    "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
                ),
                DataFile(
                    "test.txt",
                    f"{_PT_EXAMPLES}/test.txt",
                    "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
                ),
            ),
            "valid.txt",
        ),
    )
}


def default_cache_dir() -> Path:
    """`$RNNSERVE_DATA_DIR`, else `~/.cache/rnnserve/data`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "rnnserve" / "data"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _url(dataset: Dataset, file: DataFile, base_url: str | None) -> str:
    base = base_url or os.environ.get(MIRROR_ENV)
    return f"{base.rstrip('/')}/{dataset.name}/{file.path}" if base else file.url


def _download(url: str, target: Path, sha256: str, timeout: float) -> None:
    """Stream `url` into a temporary file beside `target`; move it into place only if the sha256 matches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ChecksumError(
                f"{url}: sha256 {digest.hexdigest()} is not the expected {sha256} (corrupted or changed "
                "download; nothing was cached)"
            )
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def fetch(
    name: str, cache_dir: str | Path | None = None, base_url: str | None = None, timeout: float = 60.0
) -> Path:
    """Download (or find in the cache) every file of data set `name`; returns its folder."""
    if name not in REGISTRY:
        raise DataFetchError(f"unknown data set {name!r}; known: {', '.join(sorted(REGISTRY))}")
    dataset = REGISTRY[name]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / name
    for file in dataset.files:
        target = folder / file.path
        if target.is_file() and sha256_of(target) == file.sha256:
            continue
        url = _url(dataset, file, base_url)
        try:
            _download(url, target, file.sha256, timeout)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DataFetchError(
                f"could not download {url} ({reason}). Offline? Copy the files into {folder}/, point "
                f"${MIRROR_ENV} (or --url) at a mirror, or train on a local copy with "
                f"`rnnserve train lm --data DIR_OR_FILE`"
            ) from exc
    return folder
