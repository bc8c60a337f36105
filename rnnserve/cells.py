"""The registry of recurrent cells: everything the roles need to know about each kind of cell, in one place.

A cell is named in configs, checkpoints and manifests ("rnn_tanh", "rnn_relu", "lstm", "gru"). From the
name, `cell_spec(name)` gives its state tensors (an LSTM carries h and c, the others h), the native ONNX op
it exports to, its gate count and gate order on either side of the export, and the PyTorch module that
trains it. This module never imports torch at import time (the server reads it), only inside `build`.

    spec = cell_spec("lstm")
    spec.state_names      # ("h", "c")
    spec.onnx_op          # "LSTM"
    rnn = spec.build(input_size=32, hidden_size=64, num_layers=2, dropout=0.1)  # an nn.LSTM
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class CellSpec:
    """One kind of recurrent cell."""

    name: str  # as configs, checkpoints and manifests spell it
    state_names: tuple[str, ...]  # the state tensors, in order; each (layers * dirs, batch, hidden)
    onnx_op: str  # the native ONNX op: "RNN", "LSTM" or "GRU"
    torch_class: str  # the torch.nn class: "RNN", "LSTM" or "GRU"
    torch_mode: str  # nn.RNNBase.mode of that module: "RNN_TANH", "RNN_RELU", "LSTM", "GRU"
    nonlinearity: str | None  # an Elman RNN's activation ("tanh" or "relu"); None for gated cells
    # ONNX's gate blocks (each `hidden` rows of the weights) as indices into PyTorch's gate blocks:
    #   LSTM: torch (i, f, g, o) -> ONNX (i, o, f, c);  GRU: torch (r, z, n) -> ONNX (z, r, h);  RNN: one.
    onnx_gate_order: tuple[int, ...]

    @property
    def gates(self) -> int:
        """Gate blocks per layer and direction (4 for LSTM, 3 for GRU, 1 for an Elman RNN)."""
        return len(self.onnx_gate_order)

    @property
    def torch_gate_order(self) -> tuple[int, ...]:
        """PyTorch's gate blocks as indices into ONNX's (the inverse of `onnx_gate_order`)."""
        return tuple(self.onnx_gate_order.index(i) for i in range(self.gates))

    def torch_state(self, state: tuple[T, ...]) -> T | tuple[T, T]:
        """A state tuple in `state_names` order as the PyTorch module takes it: h, or (h, c) for an LSTM."""
        if len(self.state_names) == 1:
            return state[0]
        return (state[0], state[1])

    def build(
        self, input_size: int, hidden_size: int, num_layers: int, dropout: float, bidirectional: bool = False
    ) -> nn.RNNBase:
        """The batch-first PyTorch stack of this cell (exports to the native ONNX op). `dropout` applies
        between layers, so it is dropped for a single layer (where torch would warn)."""
        from torch import nn

        module: type[nn.RNNBase] = getattr(nn, self.torch_class)
        extra: dict[str, Any] = {"nonlinearity": self.nonlinearity} if self.nonlinearity else {}
        return module(
            input_size=input_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
            **extra,
        )


_SPECS = (
    CellSpec("rnn_tanh", ("h",), "RNN", "RNN", "RNN_TANH", "tanh", (0,)),
    CellSpec("rnn_relu", ("h",), "RNN", "RNN", "RNN_RELU", "relu", (0,)),
    CellSpec("lstm", ("h", "c"), "LSTM", "LSTM", "LSTM", None, (0, 3, 1, 2)),
    CellSpec("gru", ("h",), "GRU", "GRU", "GRU", None, (1, 0, 2)),
)
CELL_SPECS: dict[str, CellSpec] = {spec.name: spec for spec in _SPECS}
CELLS: tuple[str, ...] = tuple(CELL_SPECS)  # every cell's name, in the order help texts list them


def cell_spec(name: str) -> CellSpec:
    """The cell called `name`; a ValueError naming the known cells otherwise."""
    try:
        return CELL_SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"cell {name!r} is not one of {CELLS}") from None


def cell_of_module(rnn: nn.RNNBase) -> CellSpec:
    """The cell of a PyTorch recurrent module (by its `mode`)."""
    for spec in _SPECS:
        if spec.torch_mode == rnn.mode:
            return spec
    raise ValueError(f"{type(rnn).__name__} (mode {rnn.mode!r}) is not a registered cell ({CELLS})")
