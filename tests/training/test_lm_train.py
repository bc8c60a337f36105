"""Truncated-BPTT training on a tiny corpus, checkpoints, and the `train lm` CLI."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnnserve.training import cli
from rnnserve.training.model import ModelArgs, RNNLanguageModel
from rnnserve.training.sample import sample_text
from rnnserve.training.train import (
    CHECKPOINT_FILE,
    TrainConfig,
    load_checkpoint,
    save_checkpoint,
    train_language_model,
)

TINY_TEXT = "the quick brown fox jumps over the lazy dog.\n" * 120


def _tiny_config(tmp_path: Path, **overrides: object) -> TrainConfig:
    data = tmp_path / "corpus.txt"
    data.write_text(TINY_TEXT)
    cfg = TrainConfig(
        data=str(data), min_count=1, cell="gru", layers=1, hidden=32, emb=16, dropout=0.0,
        epochs=3, batch_size=4, bptt=16, lr=1e-2, max_steps_per_epoch=25, eval_batch_size=2,
        progress=False, out_dir=str(tmp_path / "run"),
    )  # fmt: skip
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_tiny_training_lowers_loss_and_checkpoints(tmp_path: Path) -> None:
    path = train_language_model(_tiny_config(tmp_path))
    assert path.name == CHECKPOINT_FILE and (path.parent / "tokenizer.json").is_file()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == 1 and ckpt["tokenizer_kind"] == "char"
    assert set(ckpt["metrics"]) == {"val_loss", "val_ppl", "train_loss", "epoch", "elapsed_s"}
    assert ckpt["metrics"]["elapsed_s"] > 0  # a wall time: no bound on how long a machine may take
    history = ckpt["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    vocab = ckpt["model_args"]["vocab_size"]
    assert ckpt["metrics"]["val_loss"] < math.log(vocab) - 1.0  # far better than uniform
    model, tok, _ = load_checkpoint(path)
    fresh = RNNLanguageModel(ModelArgs(**ckpt["model_args"]))
    fresh.load_state_dict(ckpt["state_dict"])
    tokens = torch.tensor([tok.encode("the lazy dog").ids])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0], fresh.eval()(tokens)[0], rtol=0, atol=0)
    assert isinstance(sample_text(model, tok, "the ", max_tokens=20), str)


def test_save_and_load_checkpoint_round_trip(tmp_path: Path) -> None:
    cfg = _tiny_config(tmp_path, cell="lstm", tie_weights=True, emb=32)
    from rnnserve.training.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(TINY_TEXT)
    tok.save(str(tmp_path / "tokenizer.json"))
    model = RNNLanguageModel(ModelArgs(cell="lstm", vocab_size=tok.get_vocab_size(), embedding_size=32,
                                       hidden_size=32, num_layers=2, tie_weights=True)).eval()  # fmt: skip
    save_checkpoint(tmp_path / "ck.pt", model, cfg, {"val_loss": 1.0, "val_ppl": math.e, "epoch": 1})
    loaded, _, ckpt = load_checkpoint(tmp_path / "ck.pt")
    assert ckpt["config"]["tie_weights"] is True and loaded.decoder.weight is loaded.embedding.weight
    tokens = torch.randint(0, tok.get_vocab_size(), (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0], rtol=0, atol=0)


def test_word_level_training_runs(tmp_path: Path) -> None:
    path = train_language_model(_tiny_config(tmp_path, tokenizer="word", epochs=1, max_steps_per_epoch=3))
    _, tok, ckpt = load_checkpoint(path)
    assert ckpt["tokenizer_kind"] == "word" and tok.token_to_id("fox") is not None


def test_tie_weights_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tie_weights"):
        train_language_model(_tiny_config(tmp_path, tie_weights=True))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnserve")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_train_lm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text(TINY_TEXT)
    args = _parser().parse_args(
        ["train", "lm", "--data", str(data), "--cell", "rnn_relu", "--layers", "2", "--hidden", "16",
         "--emb", "16", "--tie-weights", "--epochs", "1", "--batch-size", "2", "--bptt", "8",
         "--max-steps-per-epoch", "3", "--min-count", "1", "--no-progress", "--sample", "10",
         "--out", str(tmp_path / "out")]
    )  # fmt: skip
    assert args.func(args) == 0
    assert "checkpoint:" in capsys.readouterr().out
    _, _, ckpt = load_checkpoint(tmp_path / "out" / CHECKPOINT_FILE)
    assert ckpt["model_args"]["cell"] == "rnn_relu" and ckpt["model_args"]["tie_weights"] is True


def test_cli_defaults_match_train_config() -> None:
    args = _parser().parse_args(["train", "lm", "--out", "x"])
    assert cli.config_from_args(args) == TrainConfig(out_dir="x")


def test_cli_modules_do_not_import_torch() -> None:
    code = (
        "import sys, argparse; import rnnserve.training.cli as t, rnnserve.export.cli as e;"
        "p = argparse.ArgumentParser(); s = p.add_subparsers(); t.register(s); e.register(s);"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_default_config_learns_python(tmp_path: Path) -> None:
    """The default stdlib char-LSTM, bounded to 150 steps (~20 s on 2 cores), already beats ppl 8."""
    path = train_language_model(TrainConfig(out_dir=str(tmp_path), max_steps_per_epoch=150, progress=False))
    model, tok, ckpt = load_checkpoint(path)
    assert 60 <= tok.get_vocab_size() <= 120
    assert ckpt["metrics"]["val_ppl"] < 8.0
    assert sample_text(model, tok, "def ", max_tokens=50)
