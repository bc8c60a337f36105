"""`export_checkpoint`: bundle layout, manifest, sha256, versions, atomicity, and the export CLI."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rnnserve.export import cli
from rnnserve.export.bundle import latest_version, list_versions, next_version
from rnnserve.export.manifest import read_manifest, sha256_file
from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.training.model import ModelArgs, RNNLanguageModel
from rnnserve.training.tokenizer import build_char_tokenizer
from rnnserve.training.train import TrainConfig, save_checkpoint

TEXT = "for x in range(10):\n    print(x)\n"


def _checkpoint(tmp_path: Path, cell: str = "lstm") -> Path:
    """A small untrained checkpoint with tokenizer.json beside it (what `train lm` writes)."""
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    tok = build_char_tokenizer(TEXT)
    tok.save(str(run / "tokenizer.json"))
    torch.manual_seed(0)
    model = RNNLanguageModel(ModelArgs(cell=cell, vocab_size=tok.get_vocab_size(), embedding_size=8,
                                       hidden_size=12, num_layers=2))  # fmt: skip
    metrics = {"val_loss": 2.0, "val_ppl": math.exp(2.0), "train_loss": 2.5, "epoch": 3}
    save_checkpoint(run / "checkpoint.pt", model, TrainConfig(cell=cell), metrics)
    return run / "checkpoint.pt"


@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh"])
def test_bundle_layout_and_manifest(cell: str, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, cell)
    bundle = export_checkpoint(ckpt, tmp_path / "repo", "tiny")
    assert bundle == tmp_path / "repo" / "tiny" / "1"
    files = [
        "manifest.json",
        "model.onnx",
        "model_gen_k1.onnx",
        "model_gen_k8.onnx",
        "model_gen_plain_k1.onnx",
        "model_gen_plain_k8.onnx",
        "model_last.onnx",
        "tokenizer.json",
    ]  # + last-position and generation graphs
    assert sorted(p.name for p in bundle.iterdir()) == files
    m = read_manifest(bundle)  # validates, and checks the sha256
    assert m.model_sha256 == sha256_file(bundle / "model.onnx")
    kinds = [(g.steps, g.plain, g.file) for g in m.generate]  # by K, plain first
    assert kinds == [(1, True, "model_gen_plain_k1.onnx"), (1, False, "model_gen_k1.onnx"),
                     (8, True, "model_gen_plain_k8.onnx"), (8, False, "model_gen_k8.onnx")]  # fmt: skip
    assert m.generate_graph(8, plain=True).file == "model_gen_plain_k8.onnx"  # type: ignore[union-attr]
    assert m.generate_graph().file == "model_gen_k8.onnx"  # type: ignore[union-attr]
    assert (m.name, m.version, m.task, m.cell, m.num_layers, m.hidden_size) == (
        "tiny",
        "1",
        "lm",
        cell,
        2,
        12,
    )
    assert m.special_tokens == {"unk": 0, "eos": 1} and m.tokenizer_kind == "char"
    assert m.metrics == {"val_loss": 2.0, "val_ppl": math.exp(2.0), "train_loss": 2.5, "epoch": 3.0}
    assert m.export["exporter"] == "torchscript" and m.export["opset"] == 17
    assert max(m.export["validation"]["max_abs_diff"].values()) <= 1e-4
    assert (bundle / "tokenizer.json").read_bytes() == (ckpt.parent / "tokenizer.json").read_bytes()
    names = [s.name for s in m.state]
    assert [t.name for t in m.inputs] == ["tokens", *(f"state_in.{n}" for n in names)]
    # the server's view: zero states from the manifest's specs, one step through the graph
    sess = ort.InferenceSession(str(bundle / m.model_file), providers=["CPUExecutionProvider"])
    feeds = {s.input_name: np.zeros(s.shape_for_batch(4), np.float32) for s in m.state}
    outs = sess.run(None, {"tokens": np.ones((4, 1), np.int64), **feeds})
    assert outs[0].shape == (4, 1, m.vocab_size)


def test_versions_increment_and_never_overwrite(tmp_path: Path) -> None:
    ckpt, repo = _checkpoint(tmp_path), tmp_path / "repo"
    assert next_version(repo, "m") == "1" and latest_version(repo, "m") is None
    assert export_checkpoint(ckpt, repo, "m").name == "1"
    assert export_checkpoint(ckpt, repo, "m").name == "2"
    assert export_checkpoint(ckpt, repo, "m", version="10").name == "10"
    assert export_checkpoint(ckpt, repo, "m", version="candidate").name == "candidate"
    assert export_checkpoint(ckpt, repo, "m").name == "11"
    assert list_versions(repo, "m") == ["1", "2", "10", "11", "candidate"]
    with pytest.raises(FileExistsError):
        export_checkpoint(ckpt, repo, "m", version="2")
    with pytest.raises(ValueError):
        export_checkpoint(ckpt, repo, "m", version="../evil")
    assert not [p for p in (repo / "m").iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_failed_export_leaves_no_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rnnserve.export import onnx_export, validate

    def broken(*args: object, **kwargs: object) -> dict[str, float]:
        raise validate.ExportValidationError("logits: max abs diff 1.0")

    monkeypatch.setattr(onnx_export, "validate_lm_export", broken)
    with pytest.raises(validate.ExportValidationError):
        export_checkpoint(_checkpoint(tmp_path), tmp_path / "repo", "m")
    assert list((tmp_path / "repo" / "m").iterdir()) == []


def test_export_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="rnnserve")
    cli.register(parser.add_subparsers(dest="command", required=True))
    ckpt = _checkpoint(tmp_path, "gru")
    argv = ["export", str(ckpt), "--repo", str(tmp_path / "repo"), "--name", "g", "--version", "3"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "repo" / "g" / "3") in out and "state_out.h: max abs diff" in out
    assert args.func(args) == 2  # version 3 exists now
    assert "already exists" in capsys.readouterr().err
    assert json.loads((tmp_path / "repo" / "g" / "3" / "manifest.json").read_text())["cell"] == "gru"
