"""A recurrent language model: embedding -> K stacked RNN/LSTM/GRU layers -> dropout -> linear to vocab.

The recurrent state is explicit: `forward(tokens, state) -> (logits, state)` where `state` is a tuple
`(h,)` or, for LSTM, `(h, c)`, each (layers, batch, hidden). That is what the ONNX export exposes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rnnserve.cells import CELLS, cell_spec

__all__ = ["CELLS", "ModelArgs", "RNNLanguageModel", "State", "detach_state", "recurrent_stack"]
State = tuple[Tensor, ...]  # (h,) or (h, c); each (layers, batch, hidden)


@dataclass
class ModelArgs:
    """Architecture of an RNNLanguageModel (stored in checkpoints and manifests)."""

    cell: str = "lstm"  # rnn_tanh | rnn_relu | lstm | gru
    vocab_size: int = 100
    embedding_size: int = 128
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.1
    tie_weights: bool = False  # decoder.weight is embedding.weight; needs embedding_size == hidden_size

    def __post_init__(self) -> None:
        cell_spec(self.cell)  # a ValueError naming the known cells
        if min(self.vocab_size, self.embedding_size, self.hidden_size, self.num_layers) < 1:
            raise ValueError("vocab_size, embedding_size, hidden_size and num_layers must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.tie_weights and self.embedding_size != self.hidden_size:
            raise ValueError(
                "tie_weights requires embedding_size == hidden_size "
                f"(got embedding_size={self.embedding_size}, hidden_size={self.hidden_size})"
            )

    @property
    def state_names(self) -> tuple[str, ...]:
        return cell_spec(self.cell).state_names


def recurrent_stack(
    cell: str, input_size: int, hidden_size: int, num_layers: int, dropout: float, bidirectional: bool = False
) -> nn.RNNBase:
    """nn.RNN/LSTM/GRU for `cell` (batch first); these export to the native ONNX RNN/LSTM/GRU ops."""
    return cell_spec(cell).build(input_size, hidden_size, num_layers, dropout, bidirectional)


class RNNLanguageModel(nn.Module):
    """Next-token language model over a recurrent stack with explicit state."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embedding = nn.Embedding(args.vocab_size, args.embedding_size)
        self.rnn = recurrent_stack(
            args.cell, args.embedding_size, args.hidden_size, args.num_layers, args.dropout
        )
        self.drop = nn.Dropout(args.dropout)
        self.decoder = nn.Linear(args.hidden_size, args.vocab_size)
        if args.tie_weights:
            self.decoder.weight = self.embedding.weight

    def init_state(self, batch: int, device: torch.device | str | None = None) -> State:
        """Zero state for `batch` streams: (h,) or (h, c), each (layers, batch, hidden)."""
        dev = device if device is not None else self.decoder.weight.device
        shape = (self.args.num_layers, batch, self.args.hidden_size)
        return tuple(torch.zeros(shape, device=dev) for _ in self.args.state_names)

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab), new state."""
        if state is None:
            state = self.init_state(tokens.shape[0], tokens.device)
        x = self.embedding(tokens)  # (batch, seq, emb)
        y, new = self.rnn(x, cell_spec(self.args.cell).torch_state(state))  # y: (batch, seq, hidden)
        logits = self.decoder(self.drop(y))  # (batch, seq, vocab)
        return logits, (tuple(new) if isinstance(new, tuple) else (new,))


def detach_state(state: State) -> State:
    """Cut the graph between truncated-BPTT windows (keeps the values)."""
    return tuple(s.detach() for s in state)
