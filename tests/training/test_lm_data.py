"""Corpora: the default stdlib corpus, --data files and directories, the split."""

from __future__ import annotations

from pathlib import Path

import pytest

from rnnserve.training.data import default_corpus_documents, load_documents, split_stream, stdlib_module_paths
from rnnserve.training.tokenizer import build_char_tokenizer


def test_default_corpus_is_deterministic_capped_and_skips_tests() -> None:
    docs = default_corpus_documents(max_chars=200_000)
    assert docs == default_corpus_documents(max_chars=200_000)
    assert 0 < sum(map(len, docs)) <= 200_000
    paths = stdlib_module_paths()
    assert paths == sorted(paths) and all(p.suffix == ".py" for p in paths)
    assert not any({"test", "site-packages", "idlelib"} & set(p.parts) for p in paths)


def test_default_corpus_char_vocab_is_small() -> None:
    tok = build_char_tokenizer(default_corpus_documents(max_chars=300_000), min_count=5)
    assert 60 <= tok.get_vocab_size() <= 120


def test_load_documents_file_and_directory(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.md").write_text("not text")
    assert load_documents(tmp_path) == ["first", "second"]
    assert load_documents(tmp_path / "a.txt") == ["first"]
    with pytest.raises(FileNotFoundError):
        load_documents(tmp_path / "missing")


def test_split_stream_last_tenth_is_validation() -> None:
    train, val = split_stream(list(range(100)))
    assert train == list(range(90)) and val == list(range(90, 100))


SHAKESPEARE = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tiny-shakespeare" / "input.txt"
)


@pytest.mark.shared_data
@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent")
def test_tiny_shakespeare_as_data() -> None:
    docs = load_documents(SHAKESPEARE)
    assert len(docs) == 1 and len(docs[0]) == 1_115_394
    assert build_char_tokenizer(docs).get_vocab_size() == 65 + 2  # its 65 characters and the specials
