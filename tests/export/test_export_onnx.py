"""ONNX export parity with PyTorch for every cell and depth, and validation that catches mismatches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rnnserve.cells import CELLS, cell_spec
from rnnserve.export.onnx_export import export_lm_to_onnx
from rnnserve.export.validate import ExportValidationError, validate_lm_export
from rnnserve.training.model import ModelArgs, RNNLanguageModel


def _model(cell: str, layers: int, **kw: Any) -> RNNLanguageModel:
    torch.manual_seed(7)
    fields: dict[str, Any] = {"vocab_size": 17, "embedding_size": 6, "hidden_size": 8, **kw}
    return RNNLanguageModel(ModelArgs(cell=cell, num_layers=layers, **fields)).eval()


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_export_matches_pytorch_and_steps_equal_chunks(cell: str, layers: int, tmp_path: Path) -> None:
    model = _model(cell, layers, dropout=0.3)
    path = export_lm_to_onnx(model, tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    names = cell_spec(cell).state_names
    assert [i.name for i in graph.input] == ["tokens", *(f"state_in.{n}" for n in names)]
    assert [o.name for o in graph.output] == ["logits", *(f"state_out.{n}" for n in names)]
    native = cell_spec(cell).onnx_op
    assert native in {n.op_type for n in graph.node}  # the native op, not an unrolled loop
    diffs = validate_lm_export(model, path)
    assert set(diffs) == {*(o.name for o in graph.output), *(f"step_vs_chunk.{o.name}" for o in graph.output)}
    assert max(diffs.values()) <= 1e-4


def test_dynamic_axes_accept_unseen_sizes(tmp_path: Path) -> None:
    model = _model("lstm", 2, tie_weights=True, embedding_size=8)
    path = export_lm_to_onnx(model, tmp_path / "model.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    zeros = np.zeros((2, 11, 8), np.float32)  # (layers, batch, hidden)
    logits, h, c = sess.run(
        None, {"tokens": np.ones((11, 23), np.int64), "state_in.h": zeros, "state_in.c": zeros}
    )
    assert logits.shape == (11, 23, 17) and h.shape == c.shape == (2, 11, 8)


def test_validation_reports_the_mismatching_output(tmp_path: Path) -> None:
    model = _model("gru", 2)
    path = export_lm_to_onnx(model, tmp_path / "model.onnx")
    with torch.no_grad():
        model.decoder.bias.add_(0.05)  # the graph keeps the old weights
    with pytest.raises(ExportValidationError, match=r"logits: max abs diff 5\.000e-02") as info:
        validate_lm_export(model, path)
    assert "within atol 0.0001 for logits:" in str(info.value)  # state_out.h still agrees
    with torch.no_grad():
        model.rnn.weight_hh_l1.mul_(1.5)
    with pytest.raises(ExportValidationError, match=r"state_out\.h: max abs diff .* <-- over tolerance"):
        validate_lm_export(model, path, batch_sizes=(2,), seq_lens=(3,))
