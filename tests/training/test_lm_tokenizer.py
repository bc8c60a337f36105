"""Tokenizers: exact char round-trips, word decoding, <unk> handling, special ids."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from rnnserve.training.tokenizer import (
    SPECIAL_TOKENS,
    build_char_tokenizer,
    build_word_tokenizer,
    special_token_ids,
)

TEXT = "def f(x):\n\treturn x  + 1\n\nclass A:\n    pass\n"


def test_special_tokens_come_first() -> None:
    assert list(SPECIAL_TOKENS.values()) == ["<unk>", "<eos>"]
    for tok in (build_char_tokenizer(TEXT), build_word_tokenizer(TEXT)):
        assert special_token_ids(tok) == {"unk": 0, "eos": 1}
        assert tok.id_to_token(0) == "<unk>" and tok.id_to_token(1) == "<eos>"


def test_char_round_trip_is_exact_with_whitespace() -> None:
    tok = build_char_tokenizer(TEXT)
    for s in (TEXT, "  \n\t\n", "return (x)\n", ""):
        enc = tok.encode(s)
        assert len(enc.ids) == len(s)  # one token per character
        assert tok.decode(enc.ids) == s


def test_char_vocab_is_deterministic_and_counts_cap() -> None:
    a, b = build_char_tokenizer(TEXT, min_count=2), build_char_tokenizer(TEXT, min_count=2)
    assert a.get_vocab() == b.get_vocab()
    assert a.token_to_id("x") is not None and a.token_to_id("e") is not None
    assert a.token_to_id("A") is None  # seen once
    assert a.encode("A€").ids == [0, 0]


def test_char_tokenizer_survives_json(tmp_path: Path) -> None:
    tok = build_char_tokenizer(TEXT)
    tok.save(str(tmp_path / "tokenizer.json"))
    again = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert again.encode(TEXT).ids == tok.encode(TEXT).ids
    assert again.decode(again.encode(TEXT).ids) == TEXT


def test_word_tokenizer_decodes_with_single_spaces_and_unk() -> None:
    tok = build_word_tokenizer("the cat sat on the mat . the cat", min_freq=1)
    ids = tok.encode("the  cat\nsat on a mat.").ids
    assert ids[4] == special_token_ids(tok)["unk"]  # "a" was never seen
    assert tok.decode([i for i in ids if i != 0]) == "the cat sat on mat ."


def test_word_tokenizer_min_freq_and_max_size() -> None:
    text = "a a a b b c"
    tok = build_word_tokenizer(text, min_freq=2)
    assert tok.token_to_id("c") is None and tok.token_to_id("a") == 2
    assert build_word_tokenizer(text, max_size=3).get_vocab_size() == 3  # 2 specials + "a"
