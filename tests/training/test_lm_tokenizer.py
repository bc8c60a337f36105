"""LM tokenizers: exact char and BPE round-trips, word decoding, <unk> handling (the corpus's own too),
pre-tokenised corpora, special ids."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from rnnserve.training.tokenizer import (
    SPECIAL_TOKENS,
    TOKENIZER_KINDS,
    build_bpe_tokenizer,
    build_char_tokenizer,
    build_tokenizer,
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


def test_word_tokenizer_keeps_specials_out_of_the_counts() -> None:
    # WikiText's own `<unk>` is our <unk>: not the words "<", "unk", ">"
    tok = build_word_tokenizer("a <unk> b <unk> <unk> c", min_freq=1)
    assert {"<", "unk", ">"}.isdisjoint(tok.get_vocab())
    assert tok.encode("b <unk> a").ids == [tok.token_to_id("b"), 0, tok.token_to_id("a")]


def test_pretokenized_word_tokenizer_splits_at_whitespace_only() -> None:
    text = "the U.S. 1 @,@ 000 @-@ year <unk> . \n = Heading = \n"
    plain = build_word_tokenizer(text)
    pre = build_word_tokenizer(text, pretokenized=True)
    assert pre.token_to_id("U.S.") is not None and plain.token_to_id("U.S.") is None  # "U", ".", "S", "."
    ids = pre.encode("the U.S. year <unk> unseen").ids
    assert ids == [pre.token_to_id("the"), pre.token_to_id("U.S."), pre.token_to_id("year"), 0, 0]
    assert pre.decode(ids) == "the U.S. year"  # <unk> is special: skipped when decoding


BPE_TEXT = "the cat sat on the mat.\n\tThe cat's hat <unk> is flat!\n" * 30


def test_bpe_round_trip_is_exact_for_any_text(tmp_path: Path) -> None:
    tok = build_bpe_tokenizer(BPE_TEXT, max_size=300, min_freq=2)
    assert special_token_ids(tok) == {"unk": 0, "eos": 1}
    assert 258 < tok.get_vocab_size() <= 300  # specials + 256 bytes + some merges
    tok.save(str(tmp_path / "tokenizer.json"))
    again = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # the decoder travels in the json
    for s in ("the cat sat", "  two  spaces\n\nand\ttabs ", "naïve café — 日本語 🙂", "x<eos>y"):
        ids = again.encode(s, add_special_tokens=False).ids
        assert 0 not in ids  # byte-level: nothing is unknown
        assert again.decode(ids, skip_special_tokens=False) == s
    assert len(tok.encode("the cat sat on the mat").ids) < len("the cat sat on the mat")  # merges learnt


def test_bpe_is_deterministic_and_keeps_specials_out_of_the_merges() -> None:
    a, b = build_bpe_tokenizer(BPE_TEXT, max_size=300), build_bpe_tokenizer(BPE_TEXT, max_size=300)
    assert a.to_str() == b.to_str()
    assert not any("unk" in t for t in a.get_vocab() if t != "<unk>")
    assert 0 in a.encode("hat <unk> is").ids  # the text "<unk>" is the special token
    with pytest.raises(ValueError, match="at least 258"):
        build_bpe_tokenizer(BPE_TEXT, max_size=100)


def test_build_tokenizer_dispatches_every_kind() -> None:
    assert TOKENIZER_KINDS == ("char", "word", "bpe")
    toks = {kind: build_tokenizer(kind, BPE_TEXT, max_size=300) for kind in TOKENIZER_KINDS}
    assert [len(toks[k].encode("the cat sat").ids) for k in TOKENIZER_KINDS] == [11, 3, 3]
    assert toks["bpe"].get_vocab_size() > 256 > toks["char"].get_vocab_size()
    with pytest.raises(ValueError, match="not one of"):
        build_tokenizer("sentencepiece", BPE_TEXT)
