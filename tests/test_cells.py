"""The cell registry (rnnserve/cells.py): one place that knows each recurrent cell."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from rnnserve.cells import CELLS, cell_of_module, cell_spec


def test_the_registry_knows_the_four_cells_and_says_which_when_asked_for_another() -> None:
    assert CELLS == ("rnn_tanh", "rnn_relu", "lstm", "gru")
    with pytest.raises(ValueError, match=r"cell 'transformer' is not one of \('rnn_tanh', .*'gru'\)"):
        cell_spec("transformer")


@pytest.mark.parametrize("cell", CELLS)
def test_each_cell_builds_its_module_and_maps_back_to_itself(cell: str) -> None:
    spec = cell_spec(cell)
    rnn = spec.build(input_size=3, hidden_size=5, num_layers=2, dropout=0.1, bidirectional=True)
    assert type(rnn) is getattr(nn, spec.torch_class) and rnn.batch_first and rnn.bidirectional
    assert cell_of_module(rnn) is spec
    # Its weights hold one block of `hidden` rows per gate.
    assert rnn.weight_ih_l0.shape == (spec.gates * 5, 3)
    # The gate orders are each other's inverse.
    assert [spec.onnx_gate_order[i] for i in spec.torch_gate_order] == list(range(spec.gates))
    h = torch.zeros(4, 2, 5)  # (layers * dirs, batch, hidden)
    state = spec.torch_state(tuple(h for _ in spec.state_names))
    _, new = rnn(torch.zeros(2, 6, 3), state)
    assert len(new if isinstance(new, tuple) else (new,)) == len(spec.state_names)


def test_only_the_lstm_carries_a_cell_state() -> None:
    assert {c: cell_spec(c).state_names for c in CELLS} == {
        "rnn_tanh": ("h",), "rnn_relu": ("h",), "lstm": ("h", "c"), "gru": ("h",)
    }  # fmt: skip
    assert {c: cell_spec(c).onnx_op for c in CELLS} == {
        "rnn_tanh": "RNN", "rnn_relu": "RNN", "lstm": "LSTM", "gru": "GRU"
    }  # fmt: skip


def test_the_registry_does_not_import_torch() -> None:
    code = "import sys, rnnserve.cells; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
