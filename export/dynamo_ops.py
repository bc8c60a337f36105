"""The recurrent stack as custom ops, so the dynamo exporter (`torch.onnx.export(dynamo=True)`) is exact.

Left alone, the dynamo exporter fixes batch and sequence length to the example's sizes for nn.LSTM/GRU/RNN
(and unrolls nn.RNN), silently: the graph then answers wrongly for any other size. Here each layer of the
stack is one `torch.library.custom_op` (opaque to torch.export, so no size is specialised), and the
exporter's `custom_translation_table` turns each into the native ONNX LSTM/GRU/RNN op, as the TorchScript
exporter does. Usage:

    with recurrent_stack_for_dynamo(model):  # swaps model.rnn for a DynamoRecurrentStack
        torch.onnx.export(wrapper, args, path, dynamo=True, custom_translation_table=TRANSLATIONS, ...)

The weights are stored in ONNX's layout (gates reordered, biases concatenated), so the graph's LSTM/GRU/RNN
nodes read them straight from initializers (what ONNX Runtime's quantiser expects). The ops also run in
PyTorch (they convert back and call nn.LSTM/GRU/RNN), so the swapped model still computes the same thing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from onnxscript import opset18 as op
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnserve.cells import CellSpec, cell_of_module, cell_spec


def _reorder(t: Tensor, order: tuple[int, ...]) -> Tensor:
    """Permute the gate blocks of t (gates * hidden, ...) along dim 0."""
    blocks = t.chunk(len(order), dim=0)
    return torch.cat([blocks[i] for i in order], dim=0)


# -- eager implementations (PyTorch semantics, ONNX layout in) ----------------------------------------


def _torch_layer(
    cell: CellSpec, x: Tensor, hx: tuple[Tensor, ...], w: Tensor, r: Tensor, b: Tensor,
    seq_lens: Tensor | None, hidden_size: int, bidirectional: bool,
) -> tuple[Tensor, ...]:  # fmt: skip
    """One layer in PyTorch from ONNX-layout weights: x (seq, batch, in) -> y (seq, dirs, batch, hidden),
    final h (dirs, batch, hidden) [and c]. With seq_lens, each text stops at its length (packed)."""
    dirs = 2 if bidirectional else 1
    kw: dict[str, Any] = {"bidirectional": bidirectional}
    if cell.nonlinearity:
        kw["nonlinearity"] = cell.nonlinearity
    with torch.device("meta"):  # shapes only: functional_call supplies the real weights
        module: nn.RNNBase = getattr(nn, cell.torch_class)(x.shape[-1], hidden_size, **kw)
    order, gh = cell.torch_gate_order, cell.gates * hidden_size
    params = {}
    for d, suffix in enumerate(["", "_reverse"][:dirs]):
        params[f"weight_ih_l0{suffix}"] = _reorder(w[d], order)
        params[f"weight_hh_l0{suffix}"] = _reorder(r[d], order)
        params[f"bias_ih_l0{suffix}"] = _reorder(b[d, :gh], order)
        params[f"bias_hh_l0{suffix}"] = _reorder(b[d, gh:], order)
    state = cell.torch_state(hx)
    if seq_lens is None:
        y, new = functional_call(module, params, (x, state))
    else:
        packed = pack_padded_sequence(x, seq_lens.cpu().long(), enforce_sorted=False)
        y_packed, new = functional_call(module, params, (packed, state))
        y, _ = pad_packed_sequence(y_packed, total_length=x.shape[0])  # zeros past each length
    y = y.reshape(x.shape[0], x.shape[1], dirs, hidden_size).transpose(1, 2).contiguous()
    return (y, *(new if isinstance(new, tuple) else (new,)))


@torch.library.custom_op("rnnserve::lstm_layer", mutates_args=())
def lstm_layer(
    x: Tensor, h0: Tensor, c0: Tensor, w: Tensor, r: Tensor, b: Tensor, seq_lens: Tensor | None,
    hidden_size: int, bidirectional: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """One LSTM layer with ONNX semantics and layout (see ONNX LSTM); y (seq, dirs, batch, hidden)."""
    y, h, c = _torch_layer(cell_spec("lstm"), x, (h0, c0), w, r, b, seq_lens, hidden_size, bidirectional)
    return y, h, c


@torch.library.custom_op("rnnserve::gru_layer", mutates_args=())
def gru_layer(
    x: Tensor, h0: Tensor, w: Tensor, r: Tensor, b: Tensor, seq_lens: Tensor | None,
    hidden_size: int, bidirectional: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One GRU layer (linear_before_reset, as PyTorch computes it); y (seq, dirs, batch, hidden)."""
    y, h = _torch_layer(cell_spec("gru"), x, (h0,), w, r, b, seq_lens, hidden_size, bidirectional)
    return y, h


@torch.library.custom_op("rnnserve::rnn_layer", mutates_args=())
def rnn_layer(
    x: Tensor, h0: Tensor, w: Tensor, r: Tensor, b: Tensor, seq_lens: Tensor | None,
    hidden_size: int, bidirectional: bool, nonlinearity: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One Elman RNN layer (nonlinearity "tanh" or "relu"); y (seq, dirs, batch, hidden)."""
    cell = cell_spec(f"rnn_{nonlinearity}")
    y, h = _torch_layer(cell, x, (h0,), w, r, b, seq_lens, hidden_size, bidirectional)
    return y, h


def _fake_y(x: Tensor, hidden_size: int, bidirectional: bool) -> Tensor:
    return x.new_empty(x.shape[0], 2 if bidirectional else 1, x.shape[1], hidden_size)


@lstm_layer.register_fake
def _(x, h0, c0, w, r, b, seq_lens, hidden_size, bidirectional):  # type: ignore[no-untyped-def]
    return _fake_y(x, hidden_size, bidirectional), torch.empty_like(h0), torch.empty_like(c0)


@gru_layer.register_fake
def _(x, h0, w, r, b, seq_lens, hidden_size, bidirectional):  # type: ignore[no-untyped-def]
    return _fake_y(x, hidden_size, bidirectional), torch.empty_like(h0)


@rnn_layer.register_fake
def _(x, h0, w, r, b, seq_lens, hidden_size, bidirectional, nonlinearity):  # type: ignore[no-untyped-def]
    return _fake_y(x, hidden_size, bidirectional), torch.empty_like(h0)


# -- ONNX translations (onnxscript, traced by the exporter) ------------------------------------------


def _direction(bidirectional: bool) -> str:
    return "bidirectional" if bidirectional else "forward"


def _lstm_onnx(x, h0, c0, w, r, b, seq_lens, hidden_size: int, bidirectional: bool):  # type: ignore[no-untyped-def]
    return op.LSTM(x, w, r, b, seq_lens, h0, c0, hidden_size=hidden_size,
                   direction=_direction(bidirectional))  # fmt: skip


def _gru_onnx(x, h0, w, r, b, seq_lens, hidden_size: int, bidirectional: bool):  # type: ignore[no-untyped-def]
    return op.GRU(x, w, r, b, seq_lens, h0, hidden_size=hidden_size, linear_before_reset=1,
                  direction=_direction(bidirectional))  # fmt: skip


def _rnn_onnx(x, h0, w, r, b, seq_lens, hidden_size: int, bidirectional: bool, nonlinearity: str):  # type: ignore[no-untyped-def]
    act = {"tanh": "Tanh", "relu": "Relu"}[nonlinearity]
    return op.RNN(x, w, r, b, seq_lens, h0, hidden_size=hidden_size, direction=_direction(bidirectional),
                  activations=[act] * (2 if bidirectional else 1))  # fmt: skip


# custom op -> its ONNX translation: the exporter's `custom_translation_table`
TRANSLATIONS: dict[Any, Any] = {
    torch.ops.rnnserve.lstm_layer.default: _lstm_onnx,
    torch.ops.rnnserve.gru_layer.default: _gru_onnx,
    torch.ops.rnnserve.rnn_layer.default: _rnn_onnx,
}
# The ONNX opset of the translations above (the dynamo exporter's own ATen translations need >= 18).
OPSET = 18


# -- the stack ----------------------------------------------------------------------------------------


class DynamoRecurrentStack(nn.Module):
    """A drop-in for a batch-first nn.RNN/LSTM/GRU (padded input, not packed), one custom op per layer.

    `forward(x, hx=None, lengths=None)`: x (batch, seq, input), hx like nn.RNNBase's (h or (h, c), each
    (layers * dirs, batch, hidden); zeros when None), lengths (batch,) int64 for texts of different
    lengths (ONNX `sequence_lens`; positions past a length give zeros and are never read) -> y (batch,
    seq, dirs * hidden), final state like nn.RNNBase's.
    """

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        if not rnn.batch_first:
            raise ValueError("DynamoRecurrentStack mirrors batch-first stacks only")
        if not rnn.bias or rnn.proj_size:
            raise ValueError("DynamoRecurrentStack needs biases and no LSTM projection")
        self.cell = cell_of_module(rnn)
        self.hidden_size, self.num_layers = rnn.hidden_size, rnn.num_layers
        self.bidirectional = rnn.bidirectional
        self.dirs = 2 if rnn.bidirectional else 1
        order = self.cell.onnx_gate_order
        for k in range(self.num_layers):
            # ONNX layout, directions stacked (forward, then reverse): W (dirs, gates * hidden, input),
            # R (dirs, gates * hidden, hidden), B (dirs, 2 * gates * hidden) = [input, recurrent biases]
            w, r, b = [], [], []
            for suffix in ["", "_reverse"][: self.dirs]:
                names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                param = {n: getattr(rnn, f"{n}_l{k}{suffix}").detach() for n in names}
                w.append(_reorder(param["weight_ih"], order))
                r.append(_reorder(param["weight_hh"], order))
                b.append(torch.cat([_reorder(param["bias_ih"], order), _reorder(param["bias_hh"], order)]))
            self.register_buffer(f"w{k}", torch.stack(w))
            self.register_buffer(f"r{k}", torch.stack(r))
            self.register_buffer(f"b{k}", torch.stack(b))

    def forward(
        self, x: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
        lstm = len(self.cell.state_names) == 2  # (h, c): the custom op takes and returns c too
        if hx is None:
            zeros = x.new_zeros(self.num_layers * self.dirs, x.shape[0], self.hidden_size)
            hx = (zeros, zeros) if lstm else zeros
        h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
        seq_lens = None if lengths is None else lengths.to(torch.int32)  # ONNX wants int32
        layer_in = x.transpose(0, 1)  # (seq, batch, input): ONNX Runtime's RNN ops take layout 0 only
        hs, cs = [], []
        for k in range(self.num_layers):
            d = slice(k * self.dirs, (k + 1) * self.dirs)
            w, r, b = (getattr(self, f"{n}{k}") for n in "wrb")
            common = (seq_lens, self.hidden_size, self.bidirectional)
            if lstm:
                assert c0 is not None
                y, h, c = torch.ops.rnnserve.lstm_layer(layer_in, h0[d], c0[d], w, r, b, *common)
                cs.append(c)
            elif self.cell.onnx_op == "GRU":
                y, h = torch.ops.rnnserve.gru_layer(layer_in, h0[d], w, r, b, *common)
            else:
                y, h = torch.ops.rnnserve.rnn_layer(
                    layer_in, h0[d], w, r, b, *common, str(self.cell.nonlinearity)
                )
            hs.append(h)
            layer_in = y.transpose(1, 2).flatten(2)  # (seq, dirs, batch, hidden) -> (seq, batch, dirs*hidden)
        out = layer_in.transpose(0, 1)  # (batch, seq, dirs * hidden)
        if lengths is not None:  # zeros past each length, as pad_packed_sequence gives
            valid = torch.arange(out.shape[1], device=out.device)[None, :] < lengths[:, None]  # (batch, seq)
            out = out * valid[:, :, None].to(out.dtype)
        h_n = torch.cat(hs, dim=0)  # (layers * dirs, batch, hidden)
        return out, ((h_n, torch.cat(cs, dim=0)) if lstm else h_n)


@contextmanager
def recurrent_stack_for_dynamo(model: nn.Module, attr: str = "rnn") -> Iterator[DynamoRecurrentStack]:
    """Temporarily replace `model.<attr>` (an nn.RNNBase) by its DynamoRecurrentStack."""
    original = getattr(model, attr)
    stack = DynamoRecurrentStack(original).train(original.training)
    setattr(model, attr, stack)
    try:
        yield stack
    finally:
        setattr(model, attr, original)
