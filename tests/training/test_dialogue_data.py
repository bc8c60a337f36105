"""Dialogue corpora: the Tiny Shakespeare split, the simple-text, JSONL and chatterbot readers with their
errors, and the encodings (turn-batched layout, flat stream, response targets)."""

from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path

import pytest
import torch

from rnnserve.training.dialogue_data import (
    DialogueFormatError,
    build_dialogue_tokenizer,
    detect_format,
    dialogue_batch,
    encode_dialogues,
    flat_batch,
    flat_stream,
    length_batches,
    prepare_dialogue_data,
    read_chatterbot,
    read_dialogues,
    read_jsonl,
    read_shakespeare,
    read_turns_text,
    response_targets,
    split_dialogues,
)

SHAKESPEARE_SAMPLE = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

TITUS:

First Citizen:
You are all resolved rather to die than to famish?
Answer me.

All:
Resolved. resolved.
"""


def test_shakespeare_blocks_become_turns_without_speaker_names(tmp_path: Path) -> None:
    path = tmp_path / "play.txt"
    path.write_text(SHAKESPEARE_SAMPLE)
    assert detect_format(path) == "shakespeare"
    dialogues = read_shakespeare(path, turns_per_dialogue=2)
    assert dialogues == [
        ("Before we proceed any further, hear me speak.", "Speak, speak."),
        ("You are all resolved rather to die than to famish?\nAnswer me.", "Resolved. resolved."),
    ]  # TITUS says nothing: no turn
    assert read_shakespeare(path, turns_per_dialogue=3) == [
        (
            "Before we proceed any further, hear me speak.",
            "Speak, speak.",
            "You are all resolved rather to die than to famish?\nAnswer me.",
        ),
    ]  # fmt: skip  (the one-turn remainder has no response: dropped)


def test_shakespeare_split_is_deterministic_disjoint_and_complete(shared_data: Path) -> None:
    dialogues = read_dialogues(shared_data / "tiny-shakespeare" / "input.txt")
    assert len(dialogues) > 800 and all(2 <= len(d) <= 8 for d in dialogues)
    first, again = split_dialogues(dialogues, seed=0), split_dialogues(dialogues, seed=0)
    assert first == again
    ids = {name: {id(d) for d in getattr(first, name)} for name in ("train", "valid", "test")}
    assert not (ids["train"] & ids["valid"] or ids["train"] & ids["test"] or ids["valid"] & ids["test"])
    assert set().union(*ids.values()) == {id(d) for d in dialogues}
    assert len(first.valid) == len(first.test) == round(len(dialogues) * 0.05)
    assert split_dialogues(dialogues, seed=1).valid != first.valid


def test_split_of_a_small_corpus_keeps_order_and_holds_out_at_least_one() -> None:
    dialogues = [(f"q{i}", f"a{i}") for i in range(10)]
    splits = split_dialogues(dialogues, seed=3)
    assert len(splits.valid) == len(splits.test) == 1 and len(splits.train) == 8
    assert splits.train == sorted(splits.train, key=dialogues.index)
    with pytest.raises(ValueError, match="summing to 1"):
        split_dialogues(dialogues, (0.5, 0.5, 0.5))


def test_turns_text_reader(tmp_path: Path) -> None:
    path = tmp_path / "chat.txt"
    path.write_text("hi there\n  how are you?  \n\n\n\nfine\nthanks\nbye\n")
    assert detect_format(path) == "turns"
    assert read_dialogues(path) == [("hi there", "how are you?"), ("fine", "thanks", "bye")]


def test_turns_text_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "chat.txt"
    path.write_text("hello\nsay <eos> now " + "x" * 200 + "\n")
    with pytest.raises(DialogueFormatError, match=r"chat\.txt:2: a turn contains '<eos>'") as err:
        read_turns_text(path)
    assert "x" * 81 not in str(err.value)  # the quote is cut
    path.write_bytes(b"fine\n\nok\n\xff\xfe bad\n")
    with pytest.raises(DialogueFormatError, match=r"chat\.txt:4: not UTF-8"):
        read_turns_text(path)
    path.write_text("\n\n")
    with pytest.raises(DialogueFormatError, match="no dialogues"):
        read_turns_text(path)


def test_jsonl_reader(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    rows = [{"turns": ["hi", "hello"]}, ["a", "b", "c"], {"turns": ["only one"], "id": 7}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    assert detect_format(path) == "jsonl"
    assert read_jsonl(path) == [("hi", "hello"), ("a", "b", "c"), ("only one",)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"turns": ["a", "b"]', r"chat\.jsonl:2: invalid JSON"),
        ('{"text": ["a"]}', r'chat\.jsonl:2: a JSON object needs a "turns" list'),
        ('{"turns": ["a", 3]}', r"chat\.jsonl:2: expected a non-empty list of strings"),
        ('"just text"', r"chat\.jsonl:2: expected a non-empty list of strings"),
        ("[]", r"chat\.jsonl:2: expected a non-empty list of strings"),
        ('["a", "  "]', r"chat\.jsonl:2: turn 2 is empty"),
        ('["a <eos> b"]', r"chat\.jsonl:2: a turn contains '<eos>'"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text('["fine", "ok"]\n' + line + "\n")
    with pytest.raises(DialogueFormatError, match=message):
        read_jsonl(path)


def test_long_malformed_line_is_quoted_short(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text("{" + "y" * 500 + "\n")
    with pytest.raises(DialogueFormatError) as err:
        read_jsonl(path)
    assert "y" * 79 in str(err.value) and "y" * 81 not in str(err.value)


def test_chatterbot_reader_reads_the_wheel_and_keeps_scalars_as_text(tmp_path: Path) -> None:
    yml = (
        "categories:\n- greetings\nconversations:\n- - Hello\n  - Hi\n- - Is it true?\n  - yes\n  - '1963'\n"
        "- a stray string\n- - alone\n"
    )
    wheel = tmp_path / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("chatterbot_corpus/data/english/greetings.yml", yml)
        z.writestr("chatterbot_corpus/data/french/greetings.yml", yml.replace("Hello", "Bonjour"))
    expected = [("Hello", "Hi"), ("Is it true?", "yes", "1963")]  # one-turn entries dropped
    assert detect_format(tmp_path) == "chatterbot"
    assert read_dialogues(tmp_path) == read_dialogues(wheel) == expected


def test_chatterbot_reader_errors(tmp_path: Path) -> None:
    wheel = tmp_path / "chatterbot_corpus-9.whl"
    wheel.write_text("not a zip")
    with pytest.raises(DialogueFormatError, match="not a readable chatterbot-corpus wheel"):
        read_dialogues(wheel)
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("chatterbot_corpus/data/english/a.yml", "conversations:\n- - ok\n  - [unclosed\n")
    with pytest.raises(DialogueFormatError, match=r"a\.yml:4: invalid YAML"):
        read_dialogues(wheel)
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("chatterbot_corpus/data/english/a.yml", "conversations:\n- - say <eos>\n  - no\n")
    with pytest.raises(DialogueFormatError, match=r"a\.yml: a turn contains '<eos>'"):
        read_dialogues(wheel)
    with pytest.raises(DialogueFormatError, match=r"no chatterbot-corpus \.yml files for language 'french'"):
        read_chatterbot(wheel, "french")


def test_encoding_layouts_and_flat_stream() -> None:
    dialogues = [("ab", "c", "ba"), ("ca", "b")]
    tok = build_dialogue_tokenizer(dialogues)
    encoded = encode_dialogues(tok, dialogues)
    eos = tok.token_to_id("<eos>")
    assert eos == 1
    for dialogue, enc in zip(dialogues, encoded, strict=True):
        assert [tok.decode(t[:-1]) for t in enc] == list(dialogue) and all(t[-1] == eos for t in enc)
        by_hand = tok.encode("".join(t + "<eos>" for t in dialogue), add_special_tokens=False).ids
        assert flat_stream(enc) == by_hand == [i for t in enc for i in t]
    batch = dialogue_batch(encoded)
    assert batch.turns.shape == (2, 3, 3) and batch.turns.dtype == torch.int64
    assert batch.lengths.tolist() == [[3, 2, 3], [3, 2, 0]]
    assert batch.turns[0, 1, :2].tolist() == encoded[0][1]
    flat = flat_batch(encoded)
    assert flat.inputs.shape == (2, 7)
    assert flat.inputs[0].tolist() == flat_stream(encoded[0])[:-1]
    assert flat.targets[0].tolist() == flat_stream(encoded[0])[1:]
    assert flat.mask.sum(1).tolist() == [7, 4]
    # responses: every token of turns 2+ with its <eos>; turn 1 (3 tokens, the first never predicted) is not
    assert response_targets(encoded[0]) == [False, False, True, True, True, True, True]
    assert flat.response.sum().item() == 5 + 2 and not (flat.response & ~flat.mask).any()


def test_prepare_and_length_batches_cover_every_dialogue() -> None:
    dialogues = [("x" * (i % 7 + 1), "y" * (i % 5 + 1)) for i in range(40)]
    data = prepare_dialogue_data(dialogues, seed=0)
    assert len(data.train) == 36 and len(data.valid) == len(data.test) == 2
    batches = length_batches(data.train, 8, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(36))
    assert batches == length_batches(data.train, 8, random.Random(0))
