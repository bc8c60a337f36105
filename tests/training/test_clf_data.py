"""Labelled-text loaders (TSV with header, CSV, directory per label), clear errors, bucketing, and
classifier tokenizers built from the training split only."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from rnnserve.training.classifier_data import (
    DataError,
    display_names,
    find_splits,
    length_buckets,
    load_labelled,
    resolve_splits,
    split_holdout,
    subsample,
)
from rnnserve.training.tokenizer import (
    CLASSIFIER_SPECIAL_TOKENS,
    build_classifier_tokenizer,
    special_token_ids,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_tsv_with_header_keeps_raw_quotes(tmp_path: Path) -> None:
    # SST-2's layout: tab-separated, no quoting, the text column named `sentence` (train) / `content` (dev)
    path = tmp_path / "train.tsv"
    path.write_text('sentence\tlabel\nit \'s a " gem\t1\nbad , "bad\t0\n\nmeh\t0\n')
    texts, labels, names = load_labelled(path)
    assert texts == ["it 's a \" gem", 'bad , "bad', "meh"] and labels == [1, 0, 0] and names == ["0", "1"]
    dev = tmp_path / "dev.tsv"
    dev.write_text("label\tcontent\n0\tdull\n1\tfine\n")
    assert load_labelled(dev, label_names=names) == (["dull", "fine"], [0, 1], ["0", "1"])


def test_csv_with_quoting_and_named_columns(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text('id,review,sentiment\n1,"good, really good",pos\n2,"awful ""movie""",neg\n3,ok,pos\n')
    texts, labels, names = load_labelled(path)
    assert texts == ["good, really good", 'awful "movie"', "ok"] and names == ["neg", "pos"]
    assert labels == [1, 0, 1]
    texts, labels, names = load_labelled(path, text_column="review", label_column="id")
    assert names == ["1", "2", "3"] and labels == [0, 1, 2]  # integer labels order numerically


def test_missing_column_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "x.tsv"
    path.write_text("words\tlabel\nhi\t1\n")
    with pytest.raises(DataError, match=r"cannot find the text column; the header has \['words', 'label'\].*"
                       r"--text-column"):  # fmt: skip
        load_labelled(path)
    with pytest.raises(DataError, match="no label column 'stars'"):
        load_labelled(path, text_column="words", label_column="stars")
    with pytest.raises(DataError, match="does not exist"):
        load_labelled(tmp_path / "missing.tsv")
    (tmp_path / "one.tsv").write_text("text\tlabel\na\t1\nb\t1\n")
    with pytest.raises(DataError, match="single label"):
        load_labelled(tmp_path / "one.tsv")
    (tmp_path / "dev.tsv").write_text("text\tlabel\na\t2\n")
    with pytest.raises(DataError, match=r"labels \['2'\] that are not among the known classes"):
        load_labelled(tmp_path / "dev.tsv", label_names=["0", "1"])


def test_directory_per_label(tmp_path: Path) -> None:
    for label, docs in {"pos": ["great", "fun"], "neg": ["dull"], "unsup": ["???"]}.items():
        (tmp_path / label).mkdir()
        for i, doc in enumerate(docs):
            (tmp_path / label / f"{i}_7.txt").write_text(doc)
    (tmp_path / "pos" / ".hidden").write_text("skip me")
    (tmp_path / "urls.txt").write_text("not a label")
    texts, labels, names = load_labelled(tmp_path)
    assert names == ["neg", "pos"]  # `unsup` (IMDB's unlabelled reviews) is skipped
    assert sorted(zip(texts, labels, strict=True)) == [("dull", 0), ("fun", 1), ("great", 1)]
    with pytest.raises(DataError, match=r"no label directories \['mixed'\]"):
        load_labelled(tmp_path, label_names=["neg", "mixed"])


def test_display_names_subsample_and_holdout() -> None:
    assert display_names(["0", "1"]) == ["negative", "positive"]
    assert display_names(["neg", "pos"]) == ["neg", "pos"]
    assert display_names(["0", "1"], ["bad", "good"]) == ["bad", "good"]
    with pytest.raises(DataError, match="2 label names"):
        display_names(["0", "1", "2"], ["a", "b"])
    texts, labels = [str(i) for i in range(100)], [i % 2 for i in range(100)]
    sub_t, sub_l = subsample(texts, labels, 10, seed=1)
    assert len(sub_t) == 10 and sub_t == sorted(sub_t, key=int) and sub_l == [int(t) % 2 for t in sub_t]
    assert subsample(texts, labels, None, 1)[0] is texts
    (tr_t, _), (dev_t, _) = split_holdout(texts, labels, 0.2, seed=1)
    assert len(dev_t) == 20 and len(tr_t) == 80 and not set(tr_t) & set(dev_t)


def test_length_buckets_cover_everything_once_with_similar_lengths() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(1000)]
    batches = length_buckets(lengths, 16, random.Random(1), pool=10)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(len(b) <= 16 for b in batches)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # versus ~50 for random batches
    assert batches != length_buckets(lengths, 16, random.Random(2), pool=10)  # still shuffled


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_classifier_tokenizer_from_train_only(kind: str, tmp_path: Path) -> None:
    train = ["A Great movie", "a terrible movie", "great fun", "terrible acting"] * 5
    tok = build_classifier_tokenizer(kind, train, vocab_size=60 if kind == "bpe" else None)
    assert special_token_ids(tok, CLASSIFIER_SPECIAL_TOKENS) == {"pad": 0, "unk": 1}
    assert tok.id_to_token(0) == "<pad>" and tok.id_to_token(1) == "<unk>"
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # all the server has
    ids = loaded.encode("GREAT Movie", add_special_tokens=False).ids
    assert ids == tok.encode("great movie", add_special_tokens=False).ids  # lowercasing is in the file
    assert 1 not in ids
    dev_only = loaded.encode("xyzzy", add_special_tokens=False).ids  # a word only a dev set would have
    assert dev_only and (dev_only == [1] if kind == "word" else 1 in dev_only)
    cased = build_classifier_tokenizer(kind, train, lowercase=False, vocab_size=60 if kind == "bpe" else None)
    assert cased.encode("A", add_special_tokens=False).ids != cased.encode("a", add_special_tokens=False).ids


def test_word_vocabulary_limits() -> None:
    tok = build_classifier_tokenizer("word", ["a a a b b c"], min_freq=2)
    assert tok.get_vocab_size() == 4 and tok.encode("c", add_special_tokens=False).ids == [1]
    assert build_classifier_tokenizer("word", ["a a a b b c"], vocab_size=3).get_vocab_size() == 3
    with pytest.raises(ValueError, match="not one of"):
        build_classifier_tokenizer("char", ["x"])


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_data_set_folders_resolve_to_their_splits(tmp_path: Path) -> None:
    sst = _tree(
        tmp_path / "SST-2", {"train.tsv": "sentence\tlabel\na\t1\nb\t0\n", "dev.tsv": "x", "test.tsv": "y"}
    )
    assert resolve_splits(sst) == (sst / "train.tsv", sst / "dev.tsv")
    assert resolve_splits(sst, tmp_path / "mine.tsv") == (
        sst / "train.tsv",
        tmp_path / "mine.tsv",
    )  # given wins
    imdb = _tree(
        tmp_path / "aclImdb",
        {"train/pos/0_9.txt": "great", "train/neg/1_2.txt": "dull", "train/unsup/2_0.txt": "?",
         "test/pos/3_8.txt": "fine", "test/neg/4_1.txt": "bad", "imdb.vocab": "great\n"},
    )  # fmt: skip
    assert resolve_splits(imdb) == (imdb / "train", None)  # no dev split: one is held out; test untouched
    assert load_labelled(resolve_splits(imdb)[0]) == (["dull", "great"], [0, 1], ["neg", "pos"])
    tree = _tree(tmp_path / "labels", {"pos/a.txt": "good", "neg/b.txt": "bad"})
    assert find_splits(tree) == {} and resolve_splits(tree) == (tree, None)  # a plain label tree
    _tree(sst, {"train.csv": "text,label\n"})
    with pytest.raises(DataError, match="several train splits"):
        resolve_splits(sst)


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "sst-2" / "dev.tsv").is_file(), reason="../shared/data/sst-2 is absent")
def test_shared_sst2_folder_resolves_to_train_and_dev() -> None:
    train, dev = resolve_splits(SHARED / "sst-2")
    assert (train.name, dev.name if dev else None) == ("train.tsv", "dev.tsv")
    texts, _, names = load_labelled(dev) if dev else ([], [], [])
    assert len(texts) == 872 and names == ["0", "1"]
