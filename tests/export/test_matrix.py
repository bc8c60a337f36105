"""The export validation matrix, for both exporters: {torchscript, dynamo} x {lm, streaming, whole} x
{rnn_tanh, rnn_relu, lstm, gru} x {1, 2, 3} layers, each graph exported once and checked at batch 1/3/17 x
seq 1/5/33 with random weights and random states: ONNX Runtime equals PyTorch within 1e-4, chunked equals
whole, padding never leaks. A failing case names itself, e.g.
`test_matrix[dynamo-whole-gru-3L-batch17-seq33]`. `python bench/export_parity.py` prints the same matrix as
a table with the worst case per exporter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnserve.cells import CELLS, cell_spec
from rnnserve.export.dynamo_ops import DynamoRecurrentStack
from rnnserve.export.matrix import (
    ATOL,
    BATCH_SIZES,
    MODES,
    SEQ_LENS,
    Exported,
    Variant,
    case_diffs,
    export_variant,
    variants,
)
from rnnserve.export.onnx_export import EXPORTERS, export_lm_to_onnx
from rnnserve.export.validate import validate_lm_export
from rnnserve.training.model import ModelArgs, RNNLanguageModel, recurrent_stack


class _Exports:
    """Each variant exported once, on first use, and kept for every (batch, seq) case."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._done: dict[Variant, Exported] = {}

    def __getitem__(self, variant: Variant) -> Exported:
        if variant not in self._done:
            self._done[variant] = export_variant(variant, self.directory)
        return self._done[variant]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> _Exports:
    return _Exports(tmp_path_factory.mktemp("matrix"))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models: one thread is fastest, and steadier on a small shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("seq", SEQ_LENS, ids=lambda s: f"seq{s}")
@pytest.mark.parametrize("batch", BATCH_SIZES, ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("variant", variants(), ids=lambda v: v.id)
def test_matrix(variant: Variant, batch: int, seq: int, exports: _Exports) -> None:
    diffs = case_diffs(exports[variant], batch, seq)
    over = {k: f"{d:.3e}" for k, d in diffs.items() if not d <= ATOL}  # `not <=` catches NaN too
    assert not over, f"{variant.id} at batch {batch}, seq {seq}: over {ATOL:g}: {over}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_graphs_use_the_native_recurrent_ops(exporter: str, mode: str, exports: _Exports) -> None:
    """Both exporters write one native LSTM/GRU/RNN node per layer (never an unrolled loop) and keep
    batch and sequence length dynamic."""
    for cell in ("lstm", "gru", "rnn_relu"):
        op_type = cell_spec(cell).onnx_op
        graph = onnx.load(str(exports[Variant(exporter, mode, cell, 2)].path)).graph
        assert [n.op_type for n in graph.node].count(op_type) == 2, (exporter, mode, cell)
        assert not {"Loop", "Scan"} & {n.op_type for n in graph.node}
        tokens = graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param for d in tokens] == ["batch", "seq"]


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", CELLS)
def test_dynamo_stack_computes_what_pytorch_does(cell: str, bidirectional: bool) -> None:
    """The custom-op stack (ONNX weight layout) run in PyTorch equals nn.RNN/LSTM/GRU, padded and packed."""
    torch.manual_seed(3)
    rnn = recurrent_stack(cell, 5, 7, 3, 0.0, bidirectional).eval()
    stack = DynamoRecurrentStack(rnn).eval()
    x = torch.randn(4, 6, 5)  # (batch, seq, input)
    h = torch.randn(3 * (2 if bidirectional else 1), 4, 7)  # (layers * dirs, batch, hidden)
    hx = cell_spec(cell).torch_state((h, torch.randn_like(h)))
    lengths = torch.tensor([6, 2, 1, 4])
    with torch.no_grad():
        want_y, want_state = rnn(x, hx)
        got_y, got_state = stack(x, hx)
        packed_y, packed_state = rnn(
            pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False), hx
        )
        want_padded, _ = pad_packed_sequence(packed_y, batch_first=True, total_length=6)
        got_padded, got_padded_state = stack(x, hx, lengths)
    torch.testing.assert_close(got_y, want_y, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_padded, want_padded, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_state, want_state, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_padded_state, packed_state, atol=1e-6, rtol=0)


def test_dynamo_refuses_what_it_cannot_mirror() -> None:
    with pytest.raises(ValueError, match="projection"):
        DynamoRecurrentStack(torch.nn.LSTM(4, 6, batch_first=True, proj_size=3))
    with pytest.raises(ValueError, match="batch-first"):
        DynamoRecurrentStack(torch.nn.GRU(4, 6))


def test_dynamo_export_with_tied_weights(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = RNNLanguageModel(ModelArgs("lstm", 11, 6, 6, 2, dropout=0.1, tie_weights=True)).eval()
    path = export_lm_to_onnx(model, tmp_path / "tied.onnx", "dynamo")
    assert isinstance(model.rnn, torch.nn.LSTM)  # the custom-op stack was only swapped in for the export
    assert max(validate_lm_export(model, path, batch_sizes=(1, 4), seq_lens=(1, 9)).values()) <= ATOL
