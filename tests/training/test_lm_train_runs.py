"""Resume, optimisers and schedules, early stopping, metrics.jsonl + plot, --config, and `rnnserve sample`."""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from rnnserve.training import cli
from rnnserve.training.train import (
    CHECKPOINT_FILE,
    LAST_FILE,
    METRICS_FILE,
    PLOT_FILE,
    TrainConfig,
    TrainingStopped,
    lr_factor,
    make_scheduler,
    train_language_model,
)

TINY_TEXT = "the quick brown fox jumps over the lazy dog.\n" * 60


def _config(tmp_path: Path, run: str, **overrides: Any) -> TrainConfig:
    data = tmp_path / "corpus.txt"
    data.write_text(TINY_TEXT)
    cfg = TrainConfig(
        data=str(data), min_count=1, cell="lstm", layers=2, hidden=16, emb=8, dropout=0.3,
        epochs=2, batch_size=4, bptt=8, lr=1e-2, max_steps_per_epoch=6, eval_batch_size=2,
        optimizer="adamw", weight_decay=0.01, schedule="cosine", warmup_steps=3, save_every=4,
        log_every=1, progress=False, plot=False, threads=1, out_dir=str(tmp_path / run),
    )  # fmt: skip
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def _assert_same_weights(a: Path, b: Path) -> None:
    sa = torch.load(a, weights_only=True)["state_dict"]
    sb = torch.load(b, weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _history(checkpoint: Path) -> list[dict[str, Any]]:
    """The per-epoch metrics of a checkpoint without their wall times (the only thing a resume changes)."""
    history = torch.load(checkpoint, weights_only=True)["history"]
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in history]


def _interrupt_at(step: int) -> Any:
    def hook(global_step: int, model: torch.nn.Module) -> None:
        if global_step == step:
            signal.raise_signal(signal.SIGINT)  # the first Ctrl-C: finish this step, save, stop

    return hook


def test_resumed_runs_end_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    full = train_language_model(_config(tmp_path, "a"))
    # B: stopped by max_steps mid-epoch 2; C: Ctrl-C mid-epoch 1 (not on a save_every boundary).
    with pytest.raises(TrainingStopped, match="max_steps") as stop:
        train_language_model(_config(tmp_path, "b", max_steps=9))
    assert stop.value.step == 9 and stop.value.last == tmp_path / "b" / LAST_FILE
    with pytest.raises(TrainingStopped, match="interrupted"):
        train_language_model(_config(tmp_path, "c"), on_step=_interrupt_at(3))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    for run in ("b", "c"):
        resumed = train_language_model(_config(tmp_path, run, resume=True))
        _assert_same_weights(full, resumed)
        _assert_same_weights(tmp_path / "a" / LAST_FILE, tmp_path / run / LAST_FILE)
        assert _history(resumed) == _history(full)
        steps = [(r["step"], r.get("loss"), r["lr"]) for r in _rows(tmp_path / run) if "lr" in r]
        assert steps == [(r["step"], r.get("loss"), r["lr"]) for r in _rows(tmp_path / "a") if "lr" in r]


def test_resume_without_last_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train_language_model(_config(tmp_path, "none", resume=True))


def test_cosine_schedule_with_warmup_and_metrics_file_and_plot(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "cos", plot=True, log_every=2)
    train_language_model(cfg)
    rows = _rows(tmp_path / "cos")
    step_rows = [r for r in rows if "loss" in r]
    epoch_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in step_rows] == [2, 4, 6, 8, 10, 12]
    assert {"epoch", "loss", "ppl", "lr", "tokens_per_s"} <= set(step_rows[0])
    assert [(r["epoch"], r["step"]) for r in epoch_rows] == [(1, 6), (2, 12)]
    expected = [cfg.lr * lr_factor(s - 1, 3, 12, cosine=True) for s in (2, 4, 6, 8, 10, 12)]
    assert [r["lr"] for r in step_rows] == pytest.approx(expected)
    assert step_rows[0]["lr"] == pytest.approx(cfg.lr * 2 / 3)  # warm-up: step 2 of 3
    assert (tmp_path / "cos" / PLOT_FILE).stat().st_size > 1000


def test_lr_factor_warms_up_then_decays_to_zero() -> None:
    assert [lr_factor(s, 4, 20, cosine=False) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(4, 4, 20, cosine=True) == 1.0
    assert lr_factor(12, 4, 20, cosine=True) == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, cosine=True) == pytest.approx(0.0)


def test_plateau_schedule_halves_the_lr_when_val_loss_stalls(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = make_scheduler(opt, TrainConfig(schedule="plateau"), total_steps=10)
    for loss in (1.0, 0.9, 0.9):
        sched.step(loss)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="warmup"):
        make_scheduler(opt, TrainConfig(schedule="plateau", warmup_steps=2), total_steps=10)
    # In a run: epoch 1 sets the best val loss; SGD with a negligible lr cannot beat it by the threshold.
    train_language_model(_config(tmp_path, "pl", optimizer="sgd", lr=1e-6, schedule="plateau", warmup_steps=0,
                                 epochs=3, max_steps_per_epoch=2))  # fmt: skip
    lrs = [r["lr"] for r in _rows(tmp_path / "pl") if "lr" in r]
    assert lrs == pytest.approx([1e-6] * 4 + [5e-7] * 2)


def test_early_stopping_on_val_loss(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "es", optimizer="sgd", lr=0.0, schedule="none", warmup_steps=0, epochs=5,
                  max_steps_per_epoch=2, patience=2)  # fmt: skip
    path = train_language_model(cfg)
    history = torch.load(path, weights_only=True)["history"]
    assert [h["epoch"] for h in history] == [1]  # best checkpoint stays epoch 1
    epochs = [r["epoch"] for r in _rows(tmp_path / "es") if "val_loss" in r]
    assert epochs == [1, 2, 3]  # no better val loss in epochs 2 and 3 -> stop


def test_unknown_optimizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="optimizer"):
        train_language_model(_config(tmp_path, "x", optimizer="lion"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnserve")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_config_file_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('cell = "gru"\nhidden = 48\nlayers = 3\nschedule = "cosine"\nout_dir = "from-toml"\n')
    args = _parser().parse_args(["train", "lm", "--config", str(toml), "--hidden", "64", "--no-progress"])
    cfg = cli.config_from_args(args)
    assert cfg == TrainConfig(
        cell="gru", hidden=64, layers=3, schedule="cosine", out_dir="from-toml", progress=False
    )
    args = _parser().parse_args(["train", "lm", "--config", str(toml), "--out", "flag", "--layers", "1"])
    assert (cli.config_from_args(args).out_dir, cli.config_from_args(args).layers) == ("flag", 1)
    toml.write_text("hiden = 3\n")
    with pytest.raises(ValueError, match="hiden"):
        cli.config_from_args(_parser().parse_args(["train", "lm", "--config", str(toml), "--out", "x"]))
    with pytest.raises(ValueError, match="--out"):
        cli.config_from_args(_parser().parse_args(["train", "lm"]))


def test_cli_max_steps_then_resume_saves_resolved_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text(TINY_TEXT)
    toml = tmp_path / "run.toml"
    toml.write_text(f'data = "{data}"\nmin_count = 1\nhidden = 16\nemb = 8\nlayers = 1\nbptt = 8\n')
    common = ["train", "lm", "--config", str(toml), "--epochs", "1", "--max-steps-per-epoch", "4",
              "--batch-size", "2", "--no-progress", "--no-plot", "--sample", "5"]  # fmt: skip
    out = str(tmp_path / "run")
    args = _parser().parse_args([*common, "--out", out, "--max-steps", "2"])
    assert args.func(args) == 0
    assert f"rnnserve train lm --out {out} --resume" in capsys.readouterr().err
    args = _parser().parse_args(["train", "lm", "--out", out, "--resume", "--no-progress", "--sample", "5"])
    assert args.func(args) == 0
    assert "checkpoint:" in capsys.readouterr().out
    saved = torch.load(Path(out) / CHECKPOINT_FILE, weights_only=True)["config"]
    assert (saved["hidden"], saved["emb"], saved["max_steps_per_epoch"], saved["resume"]) == (16, 8, 4, True)
    assert [r["step"] for r in _rows(Path(out))] == [4]  # one epoch row (step rows every 10 steps)


def test_sample_command_in_a_subprocess(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = train_language_model(_config(tmp_path, "s", epochs=1, max_steps_per_epoch=3))
    main = "import sys; from rnnserve.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", main, "sample", str(path), "--prompt", "the ", "--max-tokens", "12",
           "--temperature", "0.7", "--seed", "3"]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("the ")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.stdout == first.stdout  # same seed, same text
    bad = subprocess.run(
        [*cmd[:4], str(tmp_path / "missing.pt")], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "error:" in bad.stderr


def test_ppl_in_step_rows_is_exp_loss(tmp_path: Path) -> None:
    train_language_model(_config(tmp_path, "p", epochs=1, max_steps_per_epoch=2))
    row = _rows(tmp_path / "p")[0]
    assert row["ppl"] == pytest.approx(math.exp(row["loss"]))


def test_time_budget_ends_the_run_normally_with_an_annealed_schedule(tmp_path: Path) -> None:
    # A budget of 0.12 s with steps slowed to >= 50 ms runs out within the first epoch: the run evaluates,
    # saves and returns (no TrainingStopped), having trained fewer than its 2 epochs x 6 steps.
    config = _config(tmp_path, "budget", time_budget_min=0.002, warmup_steps=0)
    path = train_language_model(config, on_step=lambda step, model: time.sleep(0.05))
    ckpt = torch.load(path, weights_only=True)
    assert len(ckpt["history"]) == 1 and ckpt["metrics"]["elapsed_s"] >= 0.1
    steps = [r["step"] for r in _rows(tmp_path / "budget") if "lr" in r]
    assert 1 <= len(steps) < 6
    assert lr_factor(5, 0, 100, cosine=True, time_fraction=1.0) == 0.0  # the clock, ahead of the steps, wins
    assert lr_factor(5, 0, 100, cosine=True, time_fraction=0.0) > 0.99


def test_tensorboard_mirrors_the_metrics_file(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the optional tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_language_model(_config(tmp_path, "tb", tensorboard=True, epochs=1))
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    rows = _rows(tmp_path / "tb")
    for tag in ("loss", "lr", "val_loss", "train_loss"):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        expected = [(r["step"], r[tag]) for r in rows if tag in r]
        assert [s for s, _ in logged] == [s for s, _ in expected] and expected, tag
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6), tag


def test_test_split_scores_the_best_checkpoint_once(tmp_path: Path) -> None:
    test_file = tmp_path / "test.txt"
    test_file.write_text("the lazy dog jumps over the quick brown fox.\n" * 20)
    config = _config(tmp_path, "test", epochs=1)
    config.train_file, config.data = config.data, None
    config.test_file = str(test_file)
    path = train_language_model(config)
    ckpt = torch.load(path, weights_only=True)
    metrics = ckpt["metrics"]
    assert metrics["test_ppl"] == pytest.approx(math.exp(metrics["test_loss"]))
    assert "test_loss" not in ckpt["history"][-1]  # never used during training
    # The recorded figure is the best checkpoint's own loss on the test text, as its tokenizer encodes it.
    from rnnserve.training.data import encode_documents
    from rnnserve.training.train import batchify, evaluate, load_checkpoint

    model, tok, _ = load_checkpoint(path)
    test_data = batchify(encode_documents(tok, [test_file.read_text()]), config.eval_batch_size)
    assert evaluate(model, test_data, config.bptt) == pytest.approx(metrics["test_loss"], rel=1e-6)
    assert 0 < metrics["test_loss"] < math.log(tok.get_vocab_size())


def test_a_run_stopped_by_max_steps_leaves_an_exportable_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Issue 12 item 9: `--max-steps` inside the first epoch used to leave only last.pt, so the README's
    # next command (`rnnserve export runs/py/checkpoint.pt`) failed.
    data = tmp_path / "corpus.txt"
    data.write_text(TINY_TEXT)
    out = tmp_path / "run"
    argv = ["train", "lm", "--data", str(data), "--min-count", "1", "--hidden", "16", "--emb", "8",
            "--layers", "1", "--bptt", "8", "--batch-size", "2", "--no-progress", "--no-plot",
            "--sample", "5", "--out", str(out)]  # fmt: skip
    args = _parser().parse_args([*argv, "--max-steps", "3"])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert f"rnnserve train lm --out {out} --resume" in captured.err
    assert f"checkpoint: {out / CHECKPOINT_FILE}" in captured.out
    assert "step 3 (epoch 1 unfinished): val loss" in captured.out
    # --no-progress drops the bar, not the summary of the corpus and its splits.
    assert "train:" in captured.out and "valid:" in captured.out
    ckpt = torch.load(out / CHECKPOINT_FILE, weights_only=True)
    assert ckpt["kind"] == "lm" and ckpt["metrics"]["step"] == 3
    from rnnserve.training.train import load_checkpoint

    load_checkpoint(out / CHECKPOINT_FILE)  # what `rnnserve export` and `rnnserve sample` read
    # last.pt is a run's state: loading it as a model says which file to use instead.
    with pytest.raises(ValueError, match=r"training state \(for `--resume`\).*checkpoint\.pt"):
        load_checkpoint(out / LAST_FILE)
    # A new run into the same directory is refused (it used to start over silently)...
    args = _parser().parse_args(argv)
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--resume" in err and "--force" in err
    assert (out / LAST_FILE).is_file()
    # ...unless --force, which says that it starts over.
    args = _parser().parse_args([*argv, "--epochs", "1", "--max-steps-per-epoch", "2", "--force"])
    assert args.func(args) == 0
    assert "--force: starting a new run" in capsys.readouterr().out


def test_a_missing_checkpoint_beside_a_stopped_run_says_what_to_do(tmp_path: Path) -> None:
    from rnnserve.training.train import load_checkpoint

    with pytest.raises(TrainingStopped):
        train_language_model(_config(tmp_path, "x", max_steps=2))
    (tmp_path / "x" / CHECKPOINT_FILE).unlink()  # as an older version left such a run
    with pytest.raises(FileNotFoundError, match=r"does not exist; .* --resume"):
        load_checkpoint(tmp_path / "x" / CHECKPOINT_FILE)


def test_max_steps_per_epoch_has_help_text() -> None:
    lm = _parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    kinds = lm._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for kind in ("lm", "classifier"):
        for action in kinds[kind]._actions:
            if action.option_strings and action.option_strings[0] != "-h":
                assert action.help, f"train {kind} {action.option_strings[0]} has no help text"
