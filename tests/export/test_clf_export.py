"""Classifier export: streaming graphs (uni) and whole-text graphs (bi) for every cell match PyTorch, are
chunk-split invariant / exact under padding, mismatches are caught by name, and the bundle's manifest is
what the server needs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rnnserve.cells import CELLS, cell_spec
from rnnserve.export import cli
from rnnserve.export.classifier_export import export_classifier_to_onnx, validate_classifier_export
from rnnserve.export.manifest import read_manifest
from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.export.validate import ExportValidationError
from rnnserve.training.classifier_model import POOLINGS, ClassifierArgs, RNNClassifier
from rnnserve.training.classifier_train import (
    ClassifierTrainConfig,
    classification_report,
    flat_metrics,
    load_classifier_checkpoint,
    predict_proba,
    save_classifier_checkpoint,
)
from rnnserve.training.tokenizer import build_classifier_tokenizer

TEXTS = ["a great and moving film", "dull , tedious and clumsy", "the plot was fun", "awful acting"]


def _model(cell: str, bidirectional: bool, pooling: str = "max", vocab: int = 19, **kw: Any) -> RNNClassifier:
    torch.manual_seed(11)
    args = ClassifierArgs(cell=cell, vocab_size=vocab, embedding_size=6, hidden_size=8, num_layers=2,
                          num_classes=3, bidirectional=bidirectional, pooling=pooling, dropout=0.2,
                          **kw)  # fmt: skip
    return RNNClassifier(args).eval()


@pytest.mark.parametrize("bidirectional", [False, True], ids=["streaming", "whole"])
@pytest.mark.parametrize("cell", CELLS)
def test_export_matches_pytorch(cell: str, bidirectional: bool, tmp_path: Path) -> None:
    model = _model(cell, bidirectional)
    path = export_classifier_to_onnx(model, tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    native = cell_spec(cell).onnx_op
    assert native in {n.op_type for n in graph.node}  # the native op, not an unrolled loop
    state = [*cell_spec(cell).state_names, "pool_max"]
    if bidirectional:
        assert [i.name for i in graph.input] == ["tokens", "lengths"]
        assert [o.name for o in graph.output] == ["probs"]
    else:
        assert [i.name for i in graph.input] == ["tokens", *(f"state_in.{n}" for n in state)]
        assert [o.name for o in graph.output] == ["probs", *(f"state_out.{n}" for n in state)]
    diffs = validate_classifier_export(model, path)
    if bidirectional:
        assert set(diffs) == {"probs", "padded_vs_alone.probs"}
    else:
        outs = ["probs", *(f"state_out.{n}" for n in state)]
        assert set(diffs) == {*outs, *(f"chunked_vs_whole.{o}" for o in outs), "stream_vs_forward.probs"}
    assert max(diffs.values()) <= 1e-4


@pytest.mark.parametrize("bidirectional", [False, True], ids=["streaming", "whole"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_export_other_poolings(pooling: str, bidirectional: bool, tmp_path: Path) -> None:
    model = _model("lstm", bidirectional, pooling)
    path = export_classifier_to_onnx(model, tmp_path / "model.onnx")
    assert max(validate_classifier_export(model, path).values()) <= 1e-4


@pytest.mark.parametrize("bidirectional", [False, True], ids=["streaming", "whole"])
def test_validation_names_the_mismatching_output(bidirectional: bool, tmp_path: Path) -> None:
    model = _model("gru", bidirectional)
    path = export_classifier_to_onnx(model, tmp_path / "model.onnx")
    with torch.no_grad():
        model.classifier.bias[0].add_(0.5)  # the graph keeps the old weights; the state is unaffected
    with pytest.raises(ExportValidationError, match=r"within atol 0.0001 for probs[:,]") as info:
        validate_classifier_export(model, path)
    assert "probs: max abs diff" in str(info.value) and "<-- over tolerance" in str(info.value)
    if not bidirectional:
        with torch.no_grad():
            model.rnn.weight_hh_l1.mul_(1.5)
        with pytest.raises(ExportValidationError, match=r"state_out\.h: max abs diff .* <-- over tolerance"):
            validate_classifier_export(model, path, batch_sizes=(2,), seq_lens=(3,))


def _checkpoint(tmp_path: Path, cell: str, bidirectional: bool, pooling: str = "max") -> Path:
    """An untrained classifier checkpoint with tokenizer.json beside it (as `train classifier` writes)."""
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    tok = build_classifier_tokenizer("word", TEXTS)
    tok.save(str(run / "tokenizer.json"))
    model = _model(cell, bidirectional, pooling, vocab=tok.get_vocab_size(), pad_id=0)
    model.classifier = torch.nn.Linear(model.classifier.in_features, 2)
    model.args.num_classes = 2
    report = classification_report([0, 1, 1, 0], [0, 1, 0, 0], ["negative", "positive"])
    metrics = {"epoch": 2.0, "train_loss": 0.4, "dev_loss": 0.5, **flat_metrics(report), "report": report}
    config = ClassifierTrainConfig(train="t.tsv", cell=cell, bidirectional=bidirectional, pooling=pooling)
    save_classifier_checkpoint(run / "checkpoint.pt", model, config, tok, ["negative", "positive"],
                               ["0", "1"], metrics)  # fmt: skip
    return run / "checkpoint.pt"


def test_streaming_bundle_is_what_the_server_needs(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, "lstm", bidirectional=False, pooling="mean")
    bundle = export_checkpoint(ckpt, tmp_path / "repo", "live")
    m = read_manifest(bundle)
    assert (m.task, m.classifier_mode, m.pooling, m.num_directions) == ("classifier", "streaming", "mean", 1)
    assert m.streams and m.labels == ["negative", "positive"] and m.special_tokens == {"pad": 0, "unk": 1}
    assert [(s.name, s.shape, s.batch_axis, s.initial) for s in m.state] == [
        ("h", [2, -1, 8], 1, "zeros"),
        ("c", [2, -1, 8], 1, "zeros"),
        ("pool_sum", [-1, 8], 0, "zeros"),
        ("pool_count", [-1, 1], 0, "zeros"),
    ]
    assert [o.name for o in m.outputs] == ["probs", *(s.output_name for s in m.state)]
    assert m.outputs[0].shape == ["batch", 2]
    assert all(isinstance(v, float) for v in m.metrics.values()) and m.metrics["dev_accuracy"] == 0.75
    assert m.evaluation["dev"]["confusion_matrix"] == [[2, 0], [1, 1]]
    assert max(m.export["validation"]["max_abs_diff"].values()) <= 1e-4
    # the server's view: state from the manifest's `initial`, a text in chunks, versus predict_proba
    model, tok, _ = load_classifier_checkpoint(ckpt)
    sess = ort.InferenceSession(str(bundle / m.model_file), providers=["CPUExecutionProvider"])
    ids = tok.encode(TEXTS[0], add_special_tokens=False).ids
    state = {s.input_name: np.full(s.shape_for_batch(1), s.initial_value, np.float32) for s in m.state}
    for chunk in (ids[:1], ids[1:3], ids[3:]):
        probs, *new = sess.run(None, {"tokens": np.array([chunk], np.int64), **state})
        state = {s.input_name: v for s, v in zip(m.state, new, strict=True)}
    np.testing.assert_allclose(probs, predict_proba(model, tok, TEXTS[:1]), atol=1e-5)


def test_whole_bundle_is_exact_under_padding(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, "gru", bidirectional=True)
    bundle = export_checkpoint(ckpt, tmp_path / "repo", "bi")
    m = read_manifest(bundle)
    assert (m.classifier_mode, m.num_directions, m.state, m.streams) == ("whole", 2, [], False)
    assert [i.name for i in m.inputs] == ["tokens", "lengths"] and m.special_tokens["pad"] == 0
    model, tok, _ = load_classifier_checkpoint(ckpt)
    ids = [tok.encode(t, add_special_tokens=False).ids for t in TEXTS]
    width = max(map(len, ids)) + 2
    tokens = np.array([s + [m.special_tokens["pad"]] * (width - len(s)) for s in ids], np.int64)
    lengths = np.array([len(s) for s in ids], np.int64)
    sess = ort.InferenceSession(str(bundle / m.model_file), providers=["CPUExecutionProvider"])
    (probs,) = sess.run(["probs"], {"tokens": tokens, "lengths": lengths})
    np.testing.assert_allclose(probs, predict_proba(model, tok, TEXTS), atol=1e-5)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_export_cli_for_a_classifier(
    pooling: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="rnnserve")
    cli.register(parser.add_subparsers(dest="command", required=True))
    ckpt = _checkpoint(tmp_path, "rnn_relu", bidirectional=False, pooling=pooling)
    args = parser.parse_args(["export", str(ckpt), "--repo", str(tmp_path / "repo"), "--name", "c"])
    assert args.func(args) == 0
    assert "chunked_vs_whole.probs: max abs diff" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "repo" / "c" / "1" / "manifest.json").read_text())
    assert manifest["task"] == "classifier" and manifest["pooling"] == pooling
