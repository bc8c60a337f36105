"""Corpora for language-model training: files in, train/valid/test documents out (torch-free).

Where the text comes from (`load_corpus`; `TrainConfig.data` / `train_file` / `valid_file` / `test_file`):
- nothing: the Python standard library's own .py modules (no download needed): files under
  `sysconfig.get_paths()["stdlib"]` in sorted path order, skipping tests, vendored packages and generated
  tables, until `max_chars` is reached; each module is one document.
- `data=DIR` with a split layout: `train.txt`/`valid.txt`/`test.txt` (also `val`/`dev`/`validation`),
  WikiText's `wiki.{train,valid,test}.tokens` (or `.raw`), PTB's `ptb.{train,valid,test}.txt`. The train
  file is required; without a valid file one is split off train (below); test is optional.
- `data=FILE`: one text file; `data=DIR` without a split layout: its .txt files (recursive, sorted).
- `train_file=` (+ `valid_file=`, `test_file=`): explicit files, e.g. WikiText-2's valid.txt to train on
  and test.txt to validate on when its train split is not at hand.

Formats (`corpus_format`): "text" (a file is one document) or "tokenized" (WikiText/PTB: every line is a
document, tokens are space-separated and `<unk>` is already applied; the word tokenizer then splits at
whitespace only and maps the corpus's `<unk>` to ours). "auto" picks "tokenized" for `*.tokens` and
`ptb.*` files or text that holds ` <unk> ` tokens, "text" otherwise.

When the data has no validation split, one is made reproducibly: from a single text (or fewer than
`MIN_DOCS_TO_HOLD_OUT` documents) the contiguous last `val_fraction` of the characters is validation
(the usual convention, e.g. Tiny Shakespeare's first 90% / last 10%, cut exactly where nanoGPT and
char-rnn cut); from more documents, whole documents are held out, picked by a seeded shuffle
(`split_seed`) until they hold `val_fraction` of the characters. Tokenizers are built on the training
split only (see `rnnserve.training.train._prepare_data`), so validation words never enter a vocabulary.
In a token stream every document is followed by `<eos>`.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from rnnserve.training.config import TrainConfig
from rnnserve.training.tokenizer import TOKENIZER_KINDS, build_tokenizer, special_token_ids

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


SPLIT_NAMES: dict[str, tuple[str, ...]] = {  # a split's file-name part (between dots) -> split
    "train": ("train",),
    "valid": ("valid", "val", "validation", "dev"),
    "test": ("test",),
}
SPLIT_SUFFIXES = (".txt", ".tokens", ".raw")
CORPUS_FORMATS = ("auto", "text", "tokenized")
MIN_DOCS_TO_HOLD_OUT = 10  # fewer documents: the validation split is the tail of their concatenation


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


def find_split_files(directory: str | Path) -> dict[str, Path]:
    """{"train": ..., "valid": ..., "test": ...} for the split files directly in `directory` (any may be
    missing; empty when it has no split layout). Two candidates for one split are an error."""
    found: dict[str, list[Path]] = {}
    for f in sorted(Path(directory).iterdir()):
        if not f.is_file() or f.suffix not in SPLIT_SUFFIXES:
            continue
        parts = set(f.name.lower().split(".")[:-1])
        for split, names in SPLIT_NAMES.items():
            if parts & set(names):
                found.setdefault(split, []).append(f)
    for split, files in found.items():
        if len(files) > 1:
            listed = ", ".join(f.name for f in files)
            raise ValueError(f"{directory}: several {split} files ({listed}); name one with --{split}-file")
    return {split: files[0] for split, files in found.items()}


def _is_tokenized(path: Path, text: str) -> bool:
    name = path.name.lower()
    return name.endswith(".tokens") or name.startswith("ptb.") or " <unk> " in text[:1_000_000]


def read_split(path: str | Path, corpus_format: str = "auto") -> tuple[str, bool]:
    """(text, tokenized) of one split file (`corpus_format` "auto" detects whether it is tokenized)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} is not a file")
    text = p.read_text(encoding="utf-8")
    return text, _is_tokenized(p, text) if corpus_format == "auto" else corpus_format == "tokenized"


def line_documents(texts: list[str]) -> list[str]:
    """Every line of every text is a document, blank lines too (as WikiText/PTB are counted)."""
    lines: list[str] = []
    for text in texts:
        lines.extend(text.removesuffix("\n").split("\n") if text else [])
    return lines


def split_text_tail(
    docs: list[str], val_fraction: float, at_line: bool = False
) -> tuple[list[str], list[str]]:
    """(train, valid): the last `val_fraction` of the concatenated characters is validation, cut at
    character `int(total * (1 - val_fraction))`, or just after the line break before it (`at_line`)."""
    _check_fraction(val_fraction)
    total = sum(map(len, docs))
    cut = int(total * (1 - val_fraction))
    train: list[str] = []
    valid: list[str] = []
    seen = 0
    for doc in docs:
        if seen + len(doc) <= cut:
            train.append(doc)
        elif seen >= cut:
            valid.append(doc)
        else:
            at = cut - seen
            if at_line:
                at = doc.rfind("\n", 0, at) + 1  # 0 when the document has no earlier line break
            train.append(doc[:at])
            valid.append(doc[at:])
        seen += len(doc)
    train = [d for d in train if d]
    if not train or not valid:
        raise ValueError(f"{total} characters are too few to hold out {val_fraction:.0%} for validation")
    return train, valid


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, valid): whole documents, picked by a seeded shuffle until they hold `val_fraction` of the
    characters, are validation; both keep the original document order."""
    _check_fraction(val_fraction)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    target = sum(map(len, docs)) * val_fraction
    held: set[int] = set()
    chars = 0
    for i in order[:-1]:  # at least one document stays for training
        if chars >= target:
            break
        held.add(i)
        chars += len(docs[i])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be in (0, 1)")


def hold_out(
    docs: list[str], val_fraction: float, seed: int, at_line: bool = False
) -> tuple[list[str], list[str], str]:
    """(train, valid, how): the validation split made when the data has none (see the module docstring).
    `docs` are whole files or modules; `at_line` keeps a tail cut on a line boundary."""
    if len(docs) >= MIN_DOCS_TO_HOLD_OUT:
        train, valid = split_documents(docs, val_fraction, seed)
        return train, valid, f"{len(valid)} of {len(docs)} documents held out (seed {seed})"
    train, valid = split_text_tail(docs, val_fraction, at_line)
    return train, valid, f"the last {val_fraction:.0%} of the characters"


@dataclass
class Corpus:
    """Documents per split, and where they came from (`sources`: split -> description)."""

    train: list[str]
    valid: list[str]
    test: list[str] | None
    tokenized: bool  # WikiText/PTB-style: line documents, space-separated tokens, <unk> applied
    sources: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """A few lines saying which files (or which split rule) each split came from, and their sizes."""
        lines = [f"corpus ({'tokenized, one document per line' if self.tokenized else 'plain text'}):"]
        for split in ("train", "valid", "test"):
            docs = getattr(self, split)
            if docs is not None:
                size = f"{len(docs)} documents, {sum(map(len, docs)):,} chars"
                lines.append(f"  {split}: {self.sources.get(split, '?')} ({size})")
        return "\n".join(lines)


def load_corpus(
    data: str | Path | None = None,
    *,
    train_file: str | Path | None = None,
    valid_file: str | Path | None = None,
    test_file: str | Path | None = None,
    corpus_format: str = "auto",
    val_fraction: float = 0.1,
    split_seed: int = 0,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> Corpus:
    """The train/valid/test documents that `data` or the explicit files describe (module docstring)."""
    if corpus_format not in CORPUS_FORMATS:
        raise ValueError(f"corpus_format must be one of {CORPUS_FORMATS}, got {corpus_format!r}")
    files = _split_files(data, train_file, valid_file, test_file)
    if files:
        return _corpus_from_files(files, corpus_format, val_fraction, split_seed)
    if data is None:
        docs, source, tokenized = default_corpus_documents(max_chars), "the Python stdlib's modules", False
    else:
        docs, source = load_documents(data), str(data)
        tokenized = corpus_format == "tokenized" or (
            corpus_format == "auto" and all(_is_tokenized(Path(data), d) for d in docs)
        )
    train, valid, how = hold_out(docs, val_fraction, split_seed, at_line=tokenized)
    sources = {"train": f"{source}, less validation", "valid": f"{source}: {how}"}
    if tokenized:
        train, valid = line_documents(train), line_documents(valid)
    return Corpus(train, valid, None, tokenized, sources)


def _split_files(
    data: str | Path | None, train: str | Path | None, valid: str | Path | None, test: str | Path | None
) -> dict[str, Path]:
    """The explicit split files, else those of a `data` directory's split layout, else {}."""
    if data is not None and train is not None:
        raise ValueError("give either --data or --train-file, not both")
    if train is None and (valid is not None or test is not None):
        raise ValueError("--valid-file/--test-file need --train-file (or --data DIR with a split layout)")
    if train is not None:
        given = {"train": train, "valid": valid, "test": test}
        return {split: Path(path) for split, path in given.items() if path is not None}
    if data is None or not Path(data).is_dir():
        return {}
    files = find_split_files(data)
    if files and "train" not in files:
        have = ", ".join(f"{k}={v.name}" for k, v in files.items())
        first = next(iter(files.values()))
        raise ValueError(
            f"{data} has split files ({have}) but no train file; name the files to use, e.g. "
            f"--train-file {files.get('valid', first)} --valid-file {files.get('test', first)}"
        )
    return files


def _corpus_from_files(files: dict[str, Path], corpus_format: str, val_fraction: float, seed: int) -> Corpus:
    text, tokenized = read_split(files["train"], corpus_format)
    fmt = "tokenized" if tokenized else "text"  # every split is read as the train file is
    sources = {split: str(path) for split, path in files.items()}
    train = [text]
    if "valid" in files:
        valid = [read_split(files["valid"], fmt)[0]]
    else:
        train, valid, how = hold_out(train, val_fraction, seed, at_line=tokenized)
        sources["train"] += ", less validation"
        sources["valid"] = f"{files['train']}: {how}"
    test = [read_split(files["test"], fmt)[0]] if "test" in files else None
    if tokenized:
        train, valid = line_documents(train), line_documents(valid)
        test = line_documents(test) if test is not None else None
    return Corpus(train, valid, test, tokenized, sources)


def encode_documents(tok: Tokenizer, docs: list[str], chunk: int = 10_000) -> list[int]:
    """One token stream: each document's ids followed by `<eos>`. Encoded `chunk` documents at a time, so
    the per-document Encoding objects of a large corpus (WikiText-103: 1.8M lines) never all coexist."""
    eos = special_token_ids(tok)["eos"]
    stream: list[int] = []
    for start in range(0, len(docs), chunk):
        for enc in tok.encode_batch(docs[start : start + chunk], add_special_tokens=False):
            stream.extend(enc.ids)
            stream.append(eos)
    return stream


@dataclass
class LMData:
    """A language model's data: the tokenizer (learnt on `corpus.train`) and each split's token stream."""

    tokenizer: Tokenizer
    train: list[int]
    valid: list[int]
    test: list[int] | None
    corpus: Corpus

    def describe(self) -> str:
        """`Corpus.describe()` plus the vocabulary and each split's tokens and `<unk>` rate."""
        unk = special_token_ids(self.tokenizer)["unk"]
        lines = [
            self.corpus.describe(),
            f"  vocabulary: {self.tokenizer.get_vocab_size()} (train split only)",
        ]
        for split in ("train", "valid", "test"):
            ids = getattr(self, split)
            if ids:
                rate = sum(1 for i in ids if i == unk) / len(ids)
                lines.append(f"  {split} tokens: {len(ids):,} ({rate:.2%} <unk>)")
        return "\n".join(lines)


def prepare_lm_data(config: TrainConfig) -> LMData:
    """Load the corpus `config` names, learn the tokenizer on its training split, encode every split."""
    if config.tokenizer not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer must be one of {TOKENIZER_KINDS}, got {config.tokenizer!r}")
    corpus = load_corpus(
        config.data,
        train_file=config.train_file,
        valid_file=config.valid_file,
        test_file=config.test_file,
        corpus_format=config.corpus_format,
        val_fraction=config.val_fraction,
        split_seed=config.split_seed,
        max_chars=config.max_chars,
    )
    tok = build_tokenizer(
        config.tokenizer,
        corpus.train,
        min_count=config.min_count,
        max_size=config.max_vocab or None,  # 0 = no cap
        pretokenized=corpus.tokenized,
    )
    test = encode_documents(tok, corpus.test) if corpus.test is not None else None
    return LMData(tok, encode_documents(tok, corpus.train), encode_documents(tok, corpus.valid), test, corpus)
