"""`rnnserve train dialogue`: a tiny HRED/VHRED run on the training skeleton lowers the held-out response
loss and leaves a checkpoint the dialogue exporter reads; the CLI's flags map onto the config."""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import pytest

from rnnserve.training import dialogue_cli
from rnnserve.training.dialogue_cli import DialogueTrainConfig, config_from_args
from rnnserve.training.dialogue_train import kl_weight, train_dialogue

WORDS = ["red", "blue", "green", "gold", "grey", "pink"]


def echo_dialogues(path: Path, n: int = 120, seed: int = 0) -> Path:
    """JSONL dialogues whose responses repeat a word of the turn before: learnt from the context."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        lines.append(json.dumps({"turns": [f"say {a}", f"{a}!", f"now {b}", f"{b}!"]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_config(tmp_path: Path, **overrides: object) -> DialogueTrainConfig:
    config = DialogueTrainConfig(
        data=str(echo_dialogues(tmp_path / "chats.jsonl")), emb=16, hidden=32, batch_size=16, epochs=4,
        lr=1e-2, eval_every=3, threads=2, progress=False, out_dir=str(tmp_path / "run"),
    )  # fmt: skip
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_kl_weight_rises_linearly_to_one() -> None:
    assert [kl_weight(s, 4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert kl_weight(0, 0) == 1.0


@pytest.mark.slow
def test_hred_run_lowers_the_response_loss_and_exports(tmp_path: Path) -> None:
    from rnnserve.export.dialogue_export import export_dialogue_checkpoint
    from rnnserve.training.dialogue_checkpoint import load_dialogue_checkpoint

    checkpoint = train_dialogue(tiny_config(tmp_path, steps=24))
    model, tokenizer, ckpt = load_dialogue_checkpoint(checkpoint)
    history = ckpt["history"]
    assert history[-1]["step"] == 24  # a --steps run ends evaluated at its last step
    assert history[-1]["val_response_loss"] < history[0]["val_response_loss"] - 0.3
    assert ckpt["metrics"]["val_response_ppl"] == pytest.approx(
        math.exp(min(h["val_response_loss"] for h in history))
    )
    assert model.args.latent_dim == 0 and model.args.vocab_size == tokenizer.get_vocab_size()
    bundle = export_dialogue_checkpoint(checkpoint, tmp_path / "repo", "chat")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["task"] == "dialogue" and manifest["special_tokens"]["eos"] == 1
    assert manifest["metrics"]["val_response_ppl"] == pytest.approx(ckpt["metrics"]["val_response_ppl"])


@pytest.mark.slow
def test_vhred_run_anneals_the_kl_weight(tmp_path: Path) -> None:
    from rnnserve.training.dialogue_checkpoint import load_dialogue_checkpoint

    checkpoint = train_dialogue(tiny_config(tmp_path, latent=4, kl_anneal_steps=6, steps=9, epochs=2))
    _, _, ckpt = load_dialogue_checkpoint(checkpoint)
    # evaluated every 3 steps and at the epoch's end (7 batches); the weight the next step will use
    assert [(h["step"], h["kl_weight"]) for h in ckpt["history"]] == [(3, 0.5), (6, 1.0), (7, 1.0), (9, 1.0)]
    assert ckpt["model_args"]["latent_dim"] == 4
    assert all(h["val_kl_per_turn"] >= 0 for h in ckpt["history"])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnserve")
    train = parser.add_subparsers(dest="command").add_parser("train")
    dialogue_cli.register(train.add_subparsers(dest="train_command"))
    return parser


def test_cli_flags_map_onto_the_config() -> None:
    args = _parser().parse_args(
        ["train", "dialogue", "--data", "chats.jsonl", "--cell", "gru", "--layers", "2", "--hidden", "64",
         "--latent", "8", "--kl-anneal-steps", "50", "--minutes", "1.5", "--out", "runs/x", "--no-progress"]
    )  # fmt: skip
    assert args.func is dialogue_cli.run_train_dialogue
    config = config_from_args(args)
    assert (config.data, config.cell, config.layers, config.hidden) == ("chats.jsonl", "gru", 2, 64)
    assert (config.latent, config.kl_anneal_steps, config.minutes, config.steps) == (8, 50, 1.5, None)
    assert config.out_dir == "runs/x" and config.progress is False
    defaults = config_from_args(_parser().parse_args(["train", "dialogue"]))
    assert defaults == DialogueTrainConfig()


def test_cli_refuses_steps_with_minutes_and_unknown_cells(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "dialogue", "--steps", "5", "--minutes", "1"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "dialogue", "--cell", "transformer"])


def test_cli_reports_bad_data_as_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('["fine", "ok"]\n{"turns": 3}\n')
    args = _parser().parse_args(["train", "dialogue", "--data", str(bad), "--out", str(tmp_path / "r")])
    assert args.func(args) == 2
    assert "bad.jsonl:2: expected a non-empty list of strings" in capsys.readouterr().err
