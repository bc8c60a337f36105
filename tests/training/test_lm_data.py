"""Corpora: the default stdlib corpus, --data files and directories, split layouts (WikiText, PTB,
train/valid/test), explicit files, seeded and tail splits, vocabularies from the training split only."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from rnnserve.training import cli
from rnnserve.training.config import TrainConfig
from rnnserve.training.data import (
    default_corpus_documents,
    encode_documents,
    find_split_files,
    load_corpus,
    load_documents,
    prepare_lm_data,
    stdlib_module_paths,
)
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


SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SHAKESPEARE = SHARED / "tiny-shakespeare" / "input.txt"


@pytest.mark.shared_data
@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent")
def test_tiny_shakespeare_as_data() -> None:
    docs = load_documents(SHAKESPEARE)
    assert len(docs) == 1 and len(docs[0]) == 1_115_394
    assert build_char_tokenizer(docs).get_vocab_size() == 65 + 2  # its 65 characters and the specials


WIKI = "\n = Title = \n \n the cat sat on the <unk> . \n the dog sat . \n"  # WikiText's line layout


def _write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_split_layouts_are_found_by_name(tmp_path: Path) -> None:
    wiki = _write(tmp_path / "wt", {"wiki.train.tokens": WIKI, "wiki.valid.tokens": WIKI, "README": "x"})
    assert {k: v.name for k, v in find_split_files(wiki).items()} == {
        "train": "wiki.train.tokens",
        "valid": "wiki.valid.tokens",
    }
    ptb = _write(tmp_path / "ptb", {f"ptb.{s}.txt": "a b\n" for s in ("train", "valid", "test")})
    assert sorted(find_split_files(ptb)) == ["test", "train", "valid"]
    plain = _write(tmp_path / "plain", {"train.txt": "a", "dev.txt": "b", "notes.txt": "c"})
    assert {k: v.name for k, v in find_split_files(plain).items()} == {
        "train": "train.txt",
        "valid": "dev.txt",
    }
    _write(plain, {"val.txt": "d"})
    with pytest.raises(ValueError, match="several valid files"):
        find_split_files(plain)
    assert find_split_files(_write(tmp_path / "docs", {"a.txt": "x", "b.txt": "y"})) == {}


def test_wikitext_layout_is_tokenized_lines_with_every_split(tmp_path: Path) -> None:
    folder = _write(
        tmp_path, {"wiki.train.tokens": WIKI, "wiki.valid.tokens": WIKI[:15], "wiki.test.tokens": WIKI}
    )
    corpus = load_corpus(folder)
    assert corpus.tokenized
    assert corpus.train == ["", " = Title = ", " ", " the cat sat on the <unk> . ", " the dog sat . "]
    assert corpus.test == corpus.train and corpus.valid == ["", " = Title = ", " "]
    described = corpus.describe()
    assert all(f"wiki.{s}.tokens" in described for s in ("train", "valid", "test"))


def test_a_layout_without_train_asks_for_explicit_files(tmp_path: Path) -> None:
    folder = _write(tmp_path, {"valid.txt": WIKI, "test.txt": WIKI})  # ../shared/data/wikitext-2's layout
    with pytest.raises(ValueError, match=r"no train file.*--train-file .*valid.txt --valid-file .*test.txt"):
        load_corpus(folder)
    corpus = load_corpus(train_file=folder / "valid.txt", valid_file=folder / "test.txt")
    assert corpus.tokenized and corpus.sources == {
        "train": str(folder / "valid.txt"),
        "valid": str(folder / "test.txt"),
    }
    with pytest.raises(ValueError, match="either --data or --train-file"):
        load_corpus(folder, train_file=folder / "valid.txt")
    with pytest.raises(ValueError, match="need --train-file"):
        load_corpus(valid_file=folder / "test.txt")


def test_single_text_keeps_the_contiguous_last_tenth(tmp_path: Path) -> None:
    text = "".join(f"line {i}\n" for i in range(1000))
    path = _write(tmp_path, {"input.txt": text}) / "input.txt"
    corpus = load_corpus(path)
    cut = int(len(text) * 0.9)  # nanoGPT's and char-rnn's cut, to the character
    assert not corpus.tokenized and corpus.train == [text[:cut]] and corpus.valid == [text[cut:]]
    assert "last 10%" in corpus.sources["valid"]
    tokenized = load_corpus(path, corpus_format="tokenized")  # the cut moves back to a line start
    assert "\n".join(tokenized.train + tokenized.valid) + "\n" == text
    assert tokenized.valid[0].startswith("line ") and 95 <= len(tokenized.valid) <= 105


def test_many_documents_hold_out_whole_documents_by_seed(tmp_path: Path) -> None:
    folder = _write(tmp_path, {f"doc{i:02}.txt": f"document {i} " * (i + 1) for i in range(30)})
    a, b = load_corpus(folder, split_seed=1), load_corpus(folder, split_seed=1)
    assert (a.train, a.valid) == (b.train, b.valid)  # reproducible
    assert load_corpus(folder, split_seed=2).valid != a.valid
    docs = load_documents(folder)
    assert sorted(a.train + a.valid) == sorted(docs) and a.valid == [d for d in docs if d in a.valid]
    assert 0.1 <= sum(map(len, a.valid)) / sum(map(len, docs)) < 0.3


def test_few_documents_split_at_the_tail(tmp_path: Path) -> None:
    folder = _write(tmp_path, {"a.txt": "x" * 900, "b.txt": "y" * 100})
    corpus = load_corpus(folder)
    assert corpus.train == ["x" * 900] and corpus.valid == ["y" * 100]


def test_vocabulary_is_learnt_from_the_training_split_only(tmp_path: Path) -> None:
    folder = _write(tmp_path, {"train.txt": "the cat sat . " * 50, "valid.txt": "the zebra sat . " * 5})
    config = TrainConfig(data=str(folder), tokenizer="word", min_count=1)
    data = prepare_lm_data(config)
    assert data.tokenizer.token_to_id("zebra") is None and data.tokenizer.token_to_id("cat") is not None
    assert data.valid.count(0) == 5  # every "zebra" is <unk>
    assert data.test is None and "train.txt" in data.describe() and "<unk>" in data.describe()
    for kind in ("char", "bpe"):
        tok = prepare_lm_data(TrainConfig(data=str(folder), tokenizer=kind, min_count=1)).tokenizer
        assert tok.token_to_id("z") is None or kind == "bpe"  # "z" only in valid: not a char token
        assert tok.token_to_id("zebra") is None and tok.token_to_id("Ġzebra") is None


def test_wikitext_unk_is_our_unk_in_the_stream(tmp_path: Path) -> None:
    folder = _write(tmp_path, {"wiki.train.tokens": WIKI * 3, "wiki.valid.tokens": WIKI})
    data = prepare_lm_data(TrainConfig(data=str(folder), tokenizer="word", min_count=1))
    tok = data.tokenizer
    assert tok.token_to_id("=") is not None and tok.token_to_id("unk") is None
    eos = tok.token_to_id("<eos>")
    assert data.valid.count(eos) == 5  # one per line, blank lines too (as the published counts do)
    assert data.valid.count(0) == 1  # the corpus's own <unk>


def test_cli_flags_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))
    flags = "--out r --train-file v.txt --valid-file t.txt --test-file x.txt --tokenizer bpe --max-vocab 4000"
    flags += " --corpus-format tokenized --split-seed 3 --val-fraction 0.2"
    args = parser.parse_args(["train", "lm", *flags.split()])
    config = cli.config_from_args(args)
    assert (config.train_file, config.valid_file, config.test_file) == ("v.txt", "t.txt", "x.txt")
    assert (config.tokenizer, config.max_vocab, config.corpus_format) == ("bpe", 4000, "tokenized")
    assert (config.split_seed, config.val_fraction) == (3, 0.2)


@pytest.mark.shared_data
@pytest.mark.skipif(
    not (SHARED / "wikitext-2" / "test.txt").is_file(), reason="../shared/data/wikitext-2 is absent"
)
def test_wikitext2_valid_and_test_as_train_and_valid() -> None:
    config = TrainConfig(
        train_file=str(SHARED / "wikitext-2" / "valid.txt"),
        valid_file=str(SHARED / "wikitext-2" / "test.txt"),
        tokenizer="word",
        min_count=1,
        max_vocab=None,
    )
    data = prepare_lm_data(config)
    assert data.corpus.tokenized
    assert (len(data.train), len(data.valid)) == (217_646, 245_569)  # WikiText-2's published token counts


def test_encode_documents_ends_every_document_with_eos_in_any_chunking() -> None:
    tok = build_char_tokenizer("abc")
    docs = ["ab", "", "c", "abc"]
    expected = [2, 3, 1, 1, 4, 1, 2, 3, 4, 1]  # a=2 b=3 c=4 (counts tie: by character), <eos>=1
    assert tok.token_to_id("a") == 2 and tok.token_to_id("c") == 4
    assert encode_documents(tok, docs) == encode_documents(tok, docs, chunk=1) == expected
