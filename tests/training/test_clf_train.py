"""Classifier training on a small synthetic set: it learns, checkpoints are plain dicts, predict_proba is the
reference, and the `train classifier` CLI."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnserve.training import cli
from rnnserve.training.classifier_train import (
    ClassifierTrainConfig,
    format_report,
    load_classifier_checkpoint,
    predict_proba,
    train_classifier,
)
from rnnserve.training.train import LAST_FILE, TrainingStopped, load_checkpoint

GOOD = ["great", "superb", "fun", "moving"]
BAD = ["awful", "dull", "tedious", "clumsy"]
FILL = ["the", "film", "was", "a", "plot", "and", "story", "really", "so", "it"]


def _examples(n: int, seed: int) -> list[tuple[str, str]]:
    """(text, label "0"/"1"); the label is which sentiment word the filler hides."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [*rng.choices(FILL, k=rng.randint(1, 8)), rng.choice(GOOD if label else BAD)]
        rng.shuffle(words)
        out.append((" ".join(words).capitalize(), str(label)))
    return out


def _tsv(path: Path, n: int, seed: int, text_header: str = "sentence") -> str:
    rows = [f"{text_header}\tlabel"] + [f"{t}\t{y}" for t, y in _examples(n, seed)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _config(tmp_path: Path, **overrides: object) -> ClassifierTrainConfig:
    cfg = ClassifierTrainConfig(
        train=_tsv(tmp_path / "train.tsv", 400, seed=1), dev=_tsv(tmp_path / "dev.tsv", 100, 2, "content"),
        cell="gru", hidden=16, emb=16, bidirectional=False, dropout=0.1, emb_dropout=0.1, epochs=3,
        batch_size=16, lr=1e-2, patience=3, threads=2, progress=False, out_dir=str(tmp_path / "run"),
    )  # fmt: skip
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_tiny_training_learns_and_checkpoints(tmp_path: Path) -> None:
    path = train_classifier(_config(tmp_path))
    assert (path.parent / "tokenizer.json").is_file()
    ckpt = torch.load(path, weights_only=True)  # a plain dict
    assert ckpt["kind"] == "classifier" and ckpt["labels"] == ["negative", "positive"]
    assert ckpt["special_tokens"] == {"pad": 0, "unk": 1} and ckpt["tokenizer_kind"] == "word"
    history = ckpt["history"]
    assert len(history) == 6  # 2 evaluations per epoch
    m = ckpt["metrics"]
    assert m["dev_accuracy"] == max(h["dev_accuracy"] for h in history) >= 0.95  # the best one is kept
    assert m["dev_accuracy"] > history[0]["dev_accuracy"]  # it improved while training
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    report = m["report"]
    assert sum(map(sum, report["confusion_matrix"])) == 100
    assert set(report["per_class"]) == {"negative", "positive"}
    assert "confusion matrix" in format_report(report)
    model, tok, _ = load_classifier_checkpoint(path)
    probs = predict_proba(model, tok, ["A SUPERB film", "it was dull", "the plot " * 30 + "awful"])
    assert probs.shape == (3, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert probs[0, 1] > 0.5 > probs[1, 1] and probs[2, 1] < 0.5
    one_by_one = np.concatenate([predict_proba(model, tok, [t]) for t in ["A SUPERB film", "it was dull"]])
    np.testing.assert_allclose(probs[:2], one_by_one, atol=1e-6)
    with pytest.raises(ValueError, match="no tokens"):
        predict_proba(model, tok, ["fine", ""])
    with pytest.raises(ValueError, match="is a classifier checkpoint, not a language model"):
        load_checkpoint(path)


def test_holdout_dev_bpe_and_directory_layout(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for text, label in _examples(120, seed=3):
        d = root / ("pos" if label == "1" else "neg")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{len(list(d.iterdir()))}.txt").write_text(text)
    cfg = _config(tmp_path, train=str(root), dev=None, tokenizer="bpe", vocab_size=80, epochs=1,
                  cell="lstm", bidirectional=True, pooling="mean", max_train_examples=90)  # fmt: skip
    model, tok, ckpt = load_classifier_checkpoint(train_classifier(cfg))
    assert ckpt["labels"] == ["neg", "pos"] and ckpt["tokenizer_kind"] == "bpe"
    assert sum(map(sum, ckpt["metrics"]["report"]["confusion_matrix"])) == 12  # 10% held out
    assert model.args.bidirectional and tok.get_vocab_size() <= 80


def test_train_data_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot find the text column"):
        train_classifier(_config(tmp_path, train=_tsv(tmp_path / "x.tsv", 10, 1, text_header="words")))
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        train_classifier(_config(tmp_path, tokenizer="char"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnserve")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_train_classifier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, dev = _tsv(tmp_path / "t.tsv", 100, 1), _tsv(tmp_path / "d.tsv", 40, 2)
    args = _parser().parse_args(
        ["train", "classifier", "--train", train, "--dev", dev, "--cell", "rnn_tanh", "--layers", "2",
         "--hidden", "8", "--emb", "8", "--unidirectional", "--pooling", "last", "--epochs", "1",
         "--label-names", "bad,good", "--threads", "2", "--no-progress", "--out", str(tmp_path / "out")]
    )  # fmt: skip
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "checkpoint:" in out and "confusion matrix" in out and "good" in out
    _, _, ckpt = load_classifier_checkpoint(tmp_path / "out" / "checkpoint.pt")
    assert ckpt["model_args"]["cell"] == "rnn_tanh" and ckpt["model_args"]["pooling"] == "last"
    assert ckpt["labels"] == ["bad", "good"] and ckpt["raw_labels"] == ["0", "1"]
    bad = _parser().parse_args(["train", "classifier", "--train", str(tmp_path / "nope.tsv"), "--out", "x"])
    assert bad.func(bad) == 2 and "does not exist" in capsys.readouterr().err


def test_cli_defaults_match_config() -> None:
    args = _parser().parse_args(["train", "classifier", "--train", "t.tsv", "--out", "x"])
    assert cli.classifier_config_from_args(args) == ClassifierTrainConfig(train="t.tsv", out_dir="x")


def _same_weights(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=True)["state_dict"], torch.load(b, weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_resumed_classifier_run_ends_with_the_uninterrupted_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 400 examples / 16 = 25 batches per epoch, 2 evaluations per epoch, dropout on (RNG restored too).
    for run in "abc":
        (tmp_path / run).mkdir()
    full = train_classifier(_config(tmp_path / "a", epochs=2, dropout=0.3, save_every=7))
    # Stopped mid-epoch 1 between evaluations, and mid-epoch 2 right after an evaluation, then resumed
    # through the CLI (which reads the run's config from last.pt).
    for run, stop_at in (("b", 9), ("c", 38)):
        with pytest.raises(TrainingStopped, match="max_steps") as stop:
            train_classifier(_config(tmp_path / run, epochs=2, dropout=0.3, save_every=7, max_steps=stop_at))
        assert stop.value.last == tmp_path / run / "run" / LAST_FILE
        args = _parser().parse_args(["train", "classifier", "--out", str(tmp_path / run / "run"), "--resume"])
        assert args.func(args) == 0
        _same_weights(full, tmp_path / run / "run" / "checkpoint.pt")
        _same_weights(full.parent / LAST_FILE, tmp_path / run / "run" / LAST_FILE)
        resumed = torch.load(tmp_path / run / "run" / "checkpoint.pt", weights_only=True)
        history = [{k: v for k, v in r.items() if k != "train_seconds"} for r in resumed["history"]]
        expected = torch.load(full, weights_only=True)["history"]
        assert history == [{k: v for k, v in r.items() if k != "train_seconds"} for r in expected]
    assert "checkpoint:" in capsys.readouterr().out
    missing = _parser().parse_args(["train", "classifier", "--out", str(tmp_path / "none"), "--resume"])
    assert missing.func(missing) == 2 and "cannot resume" in capsys.readouterr().err


def test_a_classifier_run_stopped_before_its_first_evaluation_leaves_an_exportable_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train, dev = _tsv(tmp_path / "t.tsv", 200, 1), _tsv(tmp_path / "d.tsv", 40, 2)
    out = tmp_path / "out"
    argv = ["train", "classifier", "--train", train, "--dev", dev, "--cell", "gru", "--hidden", "8",
            "--emb", "8", "--unidirectional", "--epochs", "1", "--batch-size", "8", "--threads", "2",
            "--no-progress", "--out", str(out)]  # fmt: skip
    # 25 batches an epoch, the first evaluation after 13: stopped at step 3, the run had none yet.
    args = _parser().parse_args([*argv, "--max-steps", "3"])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert f"rnnserve train classifier --out {out} --resume" in captured.err
    assert f"checkpoint: {out / 'checkpoint.pt'}" in captured.out and "confusion matrix" in captured.out
    assert "200 training / 40 dev examples" in captured.out  # --no-progress keeps the data summary
    _, _, ckpt = load_classifier_checkpoint(out / "checkpoint.pt")
    assert ckpt["kind"] == "classifier" and 0 < ckpt["metrics"]["epoch"] < 1
    with pytest.raises(ValueError, match="training state"):
        load_classifier_checkpoint(out / LAST_FILE)
    # Resumed, the first real evaluation replaces that checkpoint as in an uninterrupted run.
    args = _parser().parse_args(["train", "classifier", "--out", str(out), "--resume"])
    assert args.func(args) == 0
    # A new run into the directory is refused without --force.
    args = _parser().parse_args(argv)
    assert args.func(args) == 2
    assert "already holds a training run" in capsys.readouterr().err
    args = _parser().parse_args([*argv, "--force"])
    assert args.func(args) == 0
    assert "--force: starting a new run" in capsys.readouterr().out
