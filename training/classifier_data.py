"""Labelled text for classifiers: TSV/CSV files and directory-per-label trees (torch-free).

- **TSV/CSV** (`.tsv`/`.tab` are tab-separated and read without quote processing, like GLUE's SST-2
  files; anything else is read as CSV with standard quoting): a header row, a text column and a label
  column. The columns are detected by name (`TEXT_COLUMNS`, `LABEL_COLUMNS`; SST-2 names its text column
  `sentence` in train.tsv and `content` in dev.tsv) unless given.
- **Directory per label** (IMDB's `pos/`, `neg/`): every subdirectory is a label, every file in it
  (recursively, hidden files skipped) is one text. IMDB's unlabelled `unsup/` is skipped by default.
- **A data set folder with splits** (`resolve_splits`): SST-2's `train.tsv` + `dev.tsv`, IMDB's
  `aclImdb/` with `train/` + `test/` label trees, or any `train`/`dev` (`valid`, `validation`, `val`)
  /`test` files or label trees. Its train split trains and its dev split (if any) validates; with no dev
  split one is held out from train (`split_holdout`, seeded), so a test split stays untouched.

Every loader returns `(texts, labels, label_names)`: labels are class ids into `label_names`. Label names
are ordered numerically when every label is an integer, else alphabetically, so class ids are stable.
"""

from __future__ import annotations

import csv
import random
import sys
from collections.abc import Sequence
from pathlib import Path

TEXT_COLUMNS: tuple[str, ...] = ("sentence", "content", "text", "review", "document", "sentence1")
LABEL_COLUMNS: tuple[str, ...] = ("label", "labels", "sentiment", "class", "polarity", "target")
SKIP_LABEL_DIRS = frozenset({"unsup"})  # IMDB's unlabelled reviews
BINARY_SENTIMENT_NAMES = ["negative", "positive"]  # the display names of labels "0"/"1"

Examples = tuple[list[str], list[int], list[str]]  # texts, class ids, label names


class DataError(ValueError):
    """A data file or directory cannot be read as labelled text (says what is wrong and how to fix it)."""


def _order_labels(raw: set[str]) -> list[str]:
    try:
        return sorted(raw, key=int)
    except ValueError:
        return sorted(raw)


def _pick_column(
    header: list[str], given: str | None, candidates: Sequence[str], what: str, path: Path
) -> int:
    lowered = [h.strip().lower() for h in header]
    if given is not None:
        if given.lower() not in lowered:
            raise DataError(f"{path}: no {what} column {given!r}; the header has {header}")
        return lowered.index(given.lower())
    for name in candidates:
        if name in lowered:
            return lowered.index(name)
    option = "--text-column" if what == "text" else "--label-column"
    raise DataError(
        f"{path}: cannot find the {what} column; the header has {header}, expected one of "
        f"{list(candidates)} (or name it with {option})"
    )


def read_table(
    path: str | Path, text_column: str | None = None, label_column: str | None = None
) -> tuple[list[str], list[str]]:
    """(texts, raw label strings) from a TSV/CSV file with a header row."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p} is not a file")
    tabbed = p.suffix.lower() in (".tsv", ".tab")
    csv.field_size_limit(sys.maxsize)
    with p.open(newline="", encoding="utf-8") as f:
        reader = (
            csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tabbed else csv.reader(f)
        )  # GLUE TSVs hold raw quote characters in the text
        header = next(reader, None)
        if header is None:
            raise DataError(f"{p} is empty (expected a header row)")
        ti = _pick_column(header, text_column, TEXT_COLUMNS, "text", p)
        li = _pick_column(header, label_column, LABEL_COLUMNS, "label", p)
        texts: list[str] = []
        labels: list[str] = []
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if max(ti, li) >= len(row):
                raise DataError(f"{p}:{lineno}: {len(row)} fields, expected at least {max(ti, li) + 1}")
            texts.append(row[ti])
            labels.append(row[li].strip())
    if not texts:
        raise DataError(f"{p} has a header but no examples")
    return texts, labels


def read_label_dirs(path: str | Path, labels: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(texts, raw labels) from `path/<label>/**/<file>`; `labels` picks (and orders) subdirectories."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    if labels is None:
        names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        names = [n for n in names if n not in SKIP_LABEL_DIRS]
    else:
        names = list(labels)
        missing = [n for n in names if not (root / n).is_dir()]
        if missing:
            raise DataError(f"{root} has no label directories {missing}")
    texts: list[str] = []
    raw: list[str] = []
    for name in names:
        files = sorted(
            f
            for f in (root / name).rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts)
        )
        for f in files:
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            raw.append(name)
    if len(set(raw)) < 2:
        raise DataError(
            f"{root} needs at least two label subdirectories holding files (found {sorted(set(raw))})"
        )
    return texts, raw


def load_labelled(
    path: str | Path,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
) -> Examples:
    """(texts, class ids, label names) from a TSV/CSV file or a directory-per-label tree.

    `label_names` fixes the classes and their order (a dev split must use the training split's): for a
    file they are the raw label values, for a directory the subdirectory names.
    """
    p = Path(path)
    if p.is_dir():
        texts, raw = read_label_dirs(p, label_names)
    elif p.is_file():
        texts, raw = read_table(p, text_column, label_column)
    else:
        raise DataError(f"{p} does not exist")
    names = list(label_names) if label_names is not None else _order_labels(set(raw))
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(raw) - set(index))
    if unknown:
        raise DataError(f"{p} has labels {unknown} that are not among the known classes {names}")
    if label_names is None and len(names) < 2:
        raise DataError(f"{p} has a single label {names}: a classifier needs at least two")
    return texts, [index[r] for r in raw], names


SPLIT_STEMS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "dev": ("dev", "valid", "validation", "val"),
    "test": ("test",),
}
TABLE_SUFFIXES = (".tsv", ".tab", ".csv")


def find_splits(folder: str | Path) -> dict[str, Path]:
    """{"train": ..., "dev": ..., "test": ...}: the split files (TSV/CSV) or label trees (subdirectories)
    directly in `folder`; empty when `folder` has no train split (e.g. it is itself a label tree)."""
    root = Path(folder)
    if not root.is_dir():
        return {}
    found: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        is_table = entry.is_file() and entry.suffix.lower() in TABLE_SUFFIXES
        stem = entry.stem.lower() if is_table else entry.name.lower() if entry.is_dir() else None
        for split, stems in SPLIT_STEMS.items():
            if stem in stems:
                found.setdefault(split, []).append(entry)
    if "train" not in found:
        return {}
    for split, entries in found.items():
        if len(entries) > 1:
            raise DataError(f"{root} has several {split} splits: {[e.name for e in entries]}")
    return {split: entries[0] for split, entries in found.items()}


def resolve_splits(train: str | Path, dev: str | Path | None = None) -> tuple[Path, Path | None]:
    """(train, dev) paths to load: `train` itself, or its train split when it is a data set folder with
    splits (module docstring); `dev` is the given one, else the folder's dev split, else None (hold one
    out)."""
    splits = find_splits(train)
    if not splits:
        return Path(train), Path(dev) if dev is not None else None
    return splits["train"], Path(dev) if dev is not None else splits.get("dev")


def display_names(raw_names: Sequence[str], given: Sequence[str] | None = None) -> list[str]:
    """The names shown to users: `given` if any, "negative"/"positive" for raw "0"/"1", else the raw names."""
    if given is not None:
        if len(given) != len(raw_names):
            raise DataError(
                f"{len(given)} label names {list(given)} for {len(raw_names)} classes {list(raw_names)}"
            )
        return list(given)
    if list(raw_names) == ["0", "1"]:
        return list(BINARY_SENTIMENT_NAMES)
    return list(raw_names)


def subsample(texts: list[str], labels: list[int], n: int | None, seed: int) -> tuple[list[str], list[int]]:
    """A random subset of `n` examples (all when n is None or >= the size), in their original order."""
    if n is None or n >= len(texts):
        return texts, labels
    keep = sorted(random.Random(seed).sample(range(len(texts)), n))
    return [texts[i] for i in keep], [labels[i] for i in keep]


def split_holdout(
    texts: list[str], labels: list[int], fraction: float, seed: int
) -> tuple[tuple[list[str], list[int]], tuple[list[str], list[int]]]:
    """((train texts, labels), (held-out texts, labels)): a random `fraction` is held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {fraction}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(len(order) * fraction))
    dev, train = sorted(order[:cut]), sorted(order[cut:])
    if not train:
        raise DataError("too few examples to hold out a dev split")
    return ([texts[i] for i in train], [labels[i] for i in train]), (
        [texts[i] for i in dev],
        [labels[i] for i in dev],
    )


def length_buckets(
    lengths: Sequence[int], batch_size: int, rng: random.Random, pool: int = 50
) -> list[list[int]]:
    """Batches of indices: shuffle, sort by length within pools of `pool` batches, shuffle the batches.

    Examples in one batch have similar lengths (little padding, fast), while the order stays random.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * pool
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches
