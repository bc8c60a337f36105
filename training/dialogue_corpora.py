"""Dialogue corpora on disk read into dialogues: the four readers, format detection, data sets by name.

A dialogue is a tuple of turns (strings). Readers (`read_dialogues(path, fmt)`; `fmt="auto"` picks one):
- "shakespeare": Tiny Shakespeare's layout, blocks separated by blank lines, each "Speaker:\\nspeech...".
  Every block is one turn: its speech lines joined by "\\n"; the speaker's name is **dropped** (a user's turn
  in a chat carries no name, and names are cheap, copyable tokens that would flatter both models' response
  perplexity without measuring what was said). Blocks with a name and no speech are skipped. Consecutive
  turns are cut into dialogues of `turns_per_dialogue` (default 8) in corpus order; a last piece shorter
  than 2 turns is dropped (it has no response). Speaker changes are not used to cut (Tiny Shakespeare has no
  scene markers; a fixed window is simple and reproducible). A speech longer than `max_turn_chars` (default
  500, 0 = no limit; 5% of the speeches) keeps its first lines that fit (at least the first line's first
  `max_turn_chars` characters): a turn-batched model pads every turn of a batch to the longest, and a few
  3,000-character monologues would make most of each batch padding.
- "turns": a text file with one turn per line and a blank line between dialogues.
- "jsonl": one dialogue per line, `{"turns": ["...", "..."]}` or a bare JSON list of strings.
- "chatterbot": the chatterbot-corpus YAML files (`conversations:` lists of lists of strings) of one
  language, read from the PyPI wheel itself (zip, as `rnnserve data fetch chatterbot-corpus` caches it), a
  folder holding that wheel, or a folder of .yml files. YAML is read with PyYAML's BaseLoader, so every
  scalar stays a string ("yes" is not True, "42" is not an int); entries that are not lists are skipped.
Malformed input raises DialogueFormatError naming the file and line, quoting at most 80 characters.
A turn may not contain "<eos>" (the end-of-turn token's text): it would end the turn inside the stream.
`resolve_source` turns `--data` (a path, or a name of NAMED_SOURCES fetched into the data cache) into a path.

Splitting, the tokenizer, encoding and batches are `rnnserve.training.dialogue_data`'s (which re-exports
every public name here). This module imports no torch.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rnnserve.training.dialogue_cli import DEFAULT_MAX_TURN_CHARS, DEFAULT_TURNS_PER_DIALOGUE, FORMATS
from rnnserve.training.tokenizer import SPECIAL_TOKENS

Dialogue = tuple[str, ...]
_QUOTE = 80
_EOS_TEXT = SPECIAL_TOKENS["eos"]
_SPEAKER = re.compile(r"[^\s:][^:\n]{0,39}:")  # "First Citizen:", "KING RICHARD III:"


class DialogueFormatError(ValueError):
    """A dialogue file is malformed; the message names the file and line and quotes the input."""


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTE else text[:_QUOTE] + "...")


def _fail(path: str | Path, line: int, what: str, text: str) -> DialogueFormatError:
    where = f"{path}:{line}" if line else str(path)  # YAML turns: no line number at hand
    return DialogueFormatError(f"{where}: {what}: {_quote(text)}")


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        bad = data[exc.start : exc.start + _QUOTE].decode("utf-8", "replace")
        raise _fail(path, line, "not UTF-8 text", bad) from exc


def _check_turn(path: str | Path, line: int, turn: str) -> str:
    if _EOS_TEXT in turn:
        raise _fail(path, line, f"a turn contains {_EOS_TEXT!r}, the end-of-turn token", turn)
    return turn


# --- readers -------------------------------------------------------------------------------------------


def _blocks(text: str) -> Iterator[tuple[int, list[str]]]:
    """(first line number, lines) of each run of non-blank lines."""
    block: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            start = start or number
            block.append(line)
        elif block:
            yield start, block
            block, start = [], 0
    if block:
        yield start, block


def _is_shakespeare(text: str) -> bool:
    """Every block starts with a "Speaker:" line (how `fmt="auto"` recognises the layout)."""
    firsts = [lines[0].strip() for _, lines in _blocks(text)]
    return bool(firsts) and all(_SPEAKER.fullmatch(f) for f in firsts)


def _cap_lines(lines: list[str], max_chars: int) -> str:
    """The first lines whose "\n"-joined text fits in `max_chars` (0: all), at least the first line cut."""
    text = "\n".join(lines)
    if not max_chars or len(text) <= max_chars:
        return text
    kept = lines[0][:max_chars]
    for line in lines[1:]:
        if len(kept) + 1 + len(line) > max_chars:
            break
        kept += "\n" + line
    return kept


def read_shakespeare(
    path: str | Path,
    turns_per_dialogue: int = DEFAULT_TURNS_PER_DIALOGUE,
    max_turn_chars: int = DEFAULT_MAX_TURN_CHARS,
) -> list[Dialogue]:
    """Tiny Shakespeare's speeches as turns (names dropped), cut into dialogues of `turns_per_dialogue`."""
    if turns_per_dialogue < 2:
        raise ValueError(f"turns_per_dialogue must be >= 2, got {turns_per_dialogue}")
    file = Path(path)
    turns: list[str] = []
    for number, lines in _blocks(_read_text(file)):
        if not _SPEAKER.fullmatch(lines[0].strip()):
            raise _fail(file, number, "expected a 'Speaker:' line opening the block", lines[0])
        if len(lines) > 1:  # a name without a speech is no turn
            turns.append(_check_turn(file, number + 1, _cap_lines(lines[1:], max_turn_chars)))
    pieces = [tuple(turns[i : i + turns_per_dialogue]) for i in range(0, len(turns), turns_per_dialogue)]
    return [p for p in pieces if len(p) >= 2]


def read_turns_text(path: str | Path) -> list[Dialogue]:
    """One turn per line (surrounding whitespace stripped), a blank line between dialogues."""
    file = Path(path)
    dialogues: list[Dialogue] = []
    for number, lines in _blocks(_read_text(file)):
        dialogues.append(tuple(_check_turn(file, number + i, line.strip()) for i, line in enumerate(lines)))
    if not dialogues:
        raise DialogueFormatError(f"{file}: no dialogues (one turn per line, a blank line between dialogues)")
    return dialogues


def _jsonl_turns(file: Path, number: int, line: str) -> Dialogue:
    try:
        value: Any = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _fail(file, number, f"invalid JSON ({exc.msg}, column {exc.colno})", line) from exc
    if isinstance(value, dict):
        if "turns" not in value:
            raise _fail(file, number, 'a JSON object needs a "turns" list', line)
        value = value["turns"]
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise _fail(file, number, 'expected a non-empty list of strings ({"turns": [...]} or [...])', line)
    for i, turn in enumerate(value, start=1):
        if not turn.strip():
            raise _fail(file, number, f"turn {i} is empty", line)
    return tuple(_check_turn(file, number, t) for t in value)


def read_jsonl(path: str | Path) -> list[Dialogue]:
    """One dialogue per line: `{"turns": [...]}` or a bare list of strings; blank lines are skipped."""
    file = Path(path)
    dialogues = [
        _jsonl_turns(file, number, line)
        for number, line in enumerate(_read_text(file).splitlines(), start=1)
        if line.strip()
    ]
    if not dialogues:
        raise DialogueFormatError(f"{file}: no dialogues (one JSON dialogue per line)")
    return dialogues


def _yaml_sources(path: Path, language: str) -> list[tuple[str, str]]:
    """(name, text) of the language's .yml files, from a wheel/zip, a folder holding one, or a folder."""
    wheels = sorted(path.glob("chatterbot_corpus-*.whl")) if path.is_dir() else [path]
    if path.is_dir() and not wheels:
        files = sorted(p for p in path.rglob("*.yml") if p.parent.name == language)
        return [(str(p), _read_text(p)) for p in files]
    try:
        with zipfile.ZipFile(wheels[-1]) as archive:  # the newest wheel if several
            names = sorted(n for n in archive.namelist() if n.endswith(".yml") and f"/{language}/" in n)
            return [(f"{wheels[-1]}!{n}", archive.read(n).decode("utf-8")) for n in names]
    except (zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise DialogueFormatError(f"{wheels[-1]}: not a readable chatterbot-corpus wheel ({exc})") from exc


def _yaml_dialogues(name: str, text: str) -> list[Dialogue]:
    import yaml

    try:
        doc = yaml.load(text, Loader=yaml.BaseLoader)  # every scalar a string
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        raise DialogueFormatError(f"{name}:{line}: invalid YAML: {exc}") from exc
    talks = doc.get("conversations", []) if isinstance(doc, dict) else None
    if not isinstance(talks, list):
        raise DialogueFormatError(f"{name}: expected 'conversations:', a list of lists of strings")
    # an entry that is not a list is skipped: 1.3.3's english/trivia.yml has one stray string
    lists = (talk for talk in talks if isinstance(talk, list))
    talks = [tuple(t.strip() for t in talk if isinstance(t, str) and t.strip()) for talk in lists]
    return [tuple(_check_turn(name, 0, t) for t in talk) for talk in talks]


def read_chatterbot(path: str | Path, language: str = "english") -> list[Dialogue]:
    """The chatterbot-corpus conversations of `language`; one-turn entries (no response) are dropped."""
    sources = _yaml_sources(Path(path), language)
    if not sources:
        raise DialogueFormatError(f"{path}: no chatterbot-corpus .yml files for language {language!r}")
    dialogues = [d for name, text in sources for d in _yaml_dialogues(name, text)]
    return [d for d in dialogues if len(d) >= 2]


def detect_format(path: str | Path) -> str:
    """The reader for `path`: .jsonl/.json -> jsonl; a wheel/zip or a folder -> chatterbot; a text file
    whose every block opens with "Speaker:" -> shakespeare; other text -> turns."""
    file = Path(path)
    if file.is_dir() or file.suffix in (".whl", ".zip"):
        return "chatterbot"
    if file.suffix in (".jsonl", ".json"):
        return "jsonl"
    return "shakespeare" if _is_shakespeare(_read_text(file)) else "turns"


def read_dialogues(
    path: str | Path,
    fmt: str = "auto",
    turns_per_dialogue: int = DEFAULT_TURNS_PER_DIALOGUE,
    max_turn_chars: int = DEFAULT_MAX_TURN_CHARS,
) -> list[Dialogue]:
    """The dialogues of `path` read as `fmt` (one of FORMATS; "auto": `detect_format`); the last two
    arguments shape Tiny Shakespeare's dialogues only."""
    if fmt not in FORMATS:
        raise ValueError(f"dialogue format {fmt!r} is not one of {FORMATS}")
    if not Path(path).exists():
        raise FileNotFoundError(f"no dialogue data at {path}")
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind == "shakespeare":
        return read_shakespeare(path, turns_per_dialogue, max_turn_chars)
    if kind == "jsonl":
        return read_jsonl(path)
    if kind == "chatterbot":
        return read_chatterbot(path)
    return read_turns_text(path)


# --- a data set by name or path ------------------------------------------------------------------------

# `--data NAME`: a registered data set (training/datasets.py), fetched into the cache, and the file in it.
NAMED_SOURCES: dict[str, tuple[str, str]] = {
    "shakespeare": ("tiny-shakespeare", "input.txt"),
    "chatterbot": ("chatterbot-corpus", ""),  # the folder holding the wheel
}


def resolve_source(data: str, cache_dir: str | Path | None = None) -> Path:
    """A path as is; a name of NAMED_SOURCES (or its registry name) fetched into the data cache."""
    from rnnserve.training.datasets import fetch

    for name, (registered, file) in NAMED_SOURCES.items():
        if data in (name, registered):
            folder = fetch(registered, cache_dir=cache_dir)
            return folder / file if file else folder
    return Path(data)
