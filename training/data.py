"""Corpora for language-model training: documents in, one token stream out.

With no `--data`, the corpus is the Python standard library's own .py modules (no download needed):
files under `sysconfig.get_paths()["stdlib"]` in sorted path order, skipping tests, vendored packages
and generated tables, until `max_chars` is reached; each module is one document. `--data PATH` reads a
text file (one document) or a directory of .txt files (sorted, one document each). In the stream,
documents are separated by `<eos>`; the last `val_fraction` of the stream is validation.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Sequence
from pathlib import Path

DEFAULT_MAX_CHARS = 1_500_000
# Folders of the stdlib that are tests, vendored/third-party code, data tables or build artefacts.
SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "site-packages",
        "dist-packages",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "encodings",
        "pydoc_data",
        "lib-dynload",
        "__pycache__",
        "__phello__",
    }
)


def _skip(rel: Path) -> bool:
    parts = rel.parts
    return (
        any(p in SKIP_DIRS or p.startswith("config-") for p in parts[:-1])
        or parts[-1].startswith("_sysconfigdata")
        or parts[-1].startswith("test_")
    )


def stdlib_module_paths(root: Path | None = None) -> list[Path]:
    """The stdlib .py files used as the default corpus, in sorted (deterministic) order."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    rels = sorted(p.relative_to(base) for p in base.rglob("*.py"))
    return [base / rel for rel in rels if not _skip(rel)]


def default_corpus_documents(max_chars: int = DEFAULT_MAX_CHARS, root: Path | None = None) -> list[str]:
    """Whole stdlib modules, in path order, skipping any that would push the total past `max_chars`."""
    docs: list[str] = []
    total = 0
    for path in stdlib_module_paths(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or total + len(text) > max_chars:
            continue
        docs.append(text)
        total += len(text)
    if not docs:
        raise FileNotFoundError(f"no stdlib modules found under {root or sysconfig.get_paths()['stdlib']}")
    return docs


def load_documents(path: str | Path) -> list[str]:
    """A text file is one document; a directory gives its .txt files (recursive, sorted), one each."""
    p = Path(path)
    if p.is_file():
        return [p.read_text(encoding="utf-8")]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise FileNotFoundError(f"{p} contains no .txt files")
        return [f.read_text(encoding="utf-8") for f in files]
    raise FileNotFoundError(f"{p} is neither a file nor a directory")


def split_stream(stream: Sequence[int], val_fraction: float = 0.1) -> tuple[list[int], list[int]]:
    """(train, validation): the last `val_fraction` of the token stream is validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be in (0, 1)")
    cut = len(stream) - max(1, round(len(stream) * val_fraction))
    return list(stream[:cut]), list(stream[cut:])
