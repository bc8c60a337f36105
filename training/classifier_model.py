"""A recurrent text classifier: embedding -> K stacked (bi)RNN/LSTM/GRU layers -> pooling over time -> linear.

Two ways to run the same weights:

- `forward(tokens, lengths)`: a right-padded batch (batch, seq) with each text's length; the stack runs on
  a packed sequence (`pack_padded_sequence`, which the ONNX export turns into `sequence_lens`), and the
  pooling is masked by length, so padding never reaches either direction or the pooling: a padded batch
  gives exactly what each text gives alone. Uni- or bidirectional.
- `stream(tokens, state)` (unidirectional only): a chunk (batch, seq) of every text plus the carried state
  -> the class probabilities of each text *so far* and the new state. The state is h (and c for LSTM),
  each (layers, batch, hidden), followed by the pooling accumulator (`pool_state_names`): the running max
  (batch, hidden) for max pooling, the running sum (batch, hidden) and token count (batch, 1) for mean
  pooling, nothing for last pooling (the top layer's h is the last output). Any split of a text into
  chunks gives the same probabilities as the whole text.

Pooling over the per-position outputs Y_t (both directions concatenated when bidirectional):
max = elementwise max over t; mean = sum / length; last = Y at the last token for one direction, and the
final state of each direction (forward after the last token, backward after the first) for two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnserve.cells import cell_spec
from rnnserve.training.model import recurrent_stack

POOLINGS: tuple[str, ...] = ("max", "mean", "last")
State = tuple[Tensor, ...]  # h, [c], then the pooling accumulator tensors


@dataclass
class ClassifierArgs:
    """Architecture of an RNNClassifier (stored in checkpoints and manifests)."""

    cell: str = "lstm"  # rnn_tanh | rnn_relu | lstm | gru
    vocab_size: int = 100
    embedding_size: int = 128
    hidden_size: int = 128  # per direction
    num_layers: int = 1
    num_classes: int = 2
    bidirectional: bool = False
    pooling: str = "max"  # max | mean | last
    dropout: float = 0.0  # between recurrent layers and on the pooled vector
    emb_dropout: float = 0.0  # on the embeddings
    pad_id: int = 0  # the <pad> token (its embedding row stays zero and gets no gradient)

    def __post_init__(self) -> None:
        cell_spec(self.cell)  # a ValueError naming the known cells
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is not one of {POOLINGS}")
        if min(self.vocab_size, self.embedding_size, self.hidden_size, self.num_layers) < 1:
            raise ValueError("vocab_size, embedding_size, hidden_size and num_layers must be positive")
        if self.num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {self.num_classes}")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.emb_dropout < 1.0):
            raise ValueError("dropout and emb_dropout must be in [0, 1)")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id {self.pad_id} is outside the vocabulary")

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def recurrent_state_names(self) -> tuple[str, ...]:
        return cell_spec(self.cell).state_names

    @property
    def pool_state_names(self) -> tuple[str, ...]:
        """The pooling accumulator carried between chunks when streaming."""
        return {"max": ("pool_max",), "mean": ("pool_sum", "pool_count"), "last": ()}[self.pooling]

    @property
    def state_names(self) -> tuple[str, ...]:
        """Every streaming state tensor, in graph order: h, [c], then the pooling accumulator."""
        return self.recurrent_state_names + self.pool_state_names


# The value every element of a fresh streaming state takes (as the manifest spells it).
STATE_INITIAL: dict[str, str] = {"h": "zeros", "c": "zeros", "pool_max": "-inf", "pool_sum": "zeros",
                                 "pool_count": "zeros"}  # fmt: skip


class RNNClassifier(nn.Module):
    """Pooled recurrent classifier; `forward` for padded batches, `stream` for chunk-by-chunk texts."""

    def __init__(self, args: ClassifierArgs) -> None:
        super().__init__()
        self.args = args
        self.embedding = nn.Embedding(args.vocab_size, args.embedding_size, padding_idx=args.pad_id)
        self.emb_drop = nn.Dropout(args.emb_dropout)
        self.rnn = recurrent_stack(
            args.cell,
            args.embedding_size,
            args.hidden_size,
            args.num_layers,
            args.dropout,
            args.bidirectional,
        )
        self.drop = nn.Dropout(args.dropout)
        self.classifier = nn.Linear(args.hidden_size * args.num_directions, args.num_classes)

    # -- whole texts ---------------------------------------------------------------------------------

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """tokens (batch, seq) int64 right-padded, lengths (batch,) int64 >= 1 -> logits (batch, classes)."""
        x = self.emb_drop(self.embedding(tokens))  # (batch, seq, emb)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        y_packed, final = self.rnn(packed)
        # (batch, seq, dirs * hidden); positions at or past a text's length are zeros
        y, _ = pad_packed_sequence(y_packed, batch_first=True, total_length=tokens.shape[1])
        h_n = final[0] if isinstance(final, tuple) else final  # (layers * dirs, batch, hidden)
        pooled = self._pool(y, lengths.to(y.device), h_n)
        return self.classifier(self.drop(pooled))

    def _pool(self, y: Tensor, lengths: Tensor, h_n: Tensor) -> Tensor:
        """Masked pooling of y (batch, seq, dirs * hidden) over time -> (batch, dirs * hidden)."""
        pooling = self.args.pooling
        if pooling == "max":
            valid = torch.arange(y.shape[1], device=y.device)[None, :] < lengths[:, None]  # (batch, seq)
            return y.masked_fill(~valid[:, :, None], float("-inf")).amax(dim=1)
        if pooling == "mean":
            return y.sum(dim=1) / lengths[:, None].to(y.dtype)  # padded positions are zeros
        # last: the top layer's final state of each direction = Y at the last token (forward) and at the
        # first token (backward)
        dirs = self.args.num_directions
        return torch.cat([h_n[-dirs + d] for d in range(dirs)], dim=-1)

    # -- streaming (unidirectional) ------------------------------------------------------------------

    def init_stream_state(self, batch: int, device: torch.device | str | None = None) -> State:
        """A fresh streaming state: h (and c) zeros, running max -inf, running sum and count zeros."""
        if self.args.bidirectional:
            raise ValueError("a bidirectional classifier cannot stream: it needs the whole text")
        dev = device if device is not None else self.classifier.weight.device
        a = self.args
        shapes = stream_state_shapes(a, batch)
        return tuple(
            torch.full(shapes[n], float(STATE_INITIAL[n].replace("zeros", "0")), device=dev)
            for n in a.state_names
        )

    def stream(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """tokens (batch, seq >= 1) + state -> (probs (batch, classes) after this chunk, new state)."""
        a = self.args
        if a.bidirectional:
            raise ValueError("a bidirectional classifier cannot stream: it needs the whole text")
        n_rec = len(a.recurrent_state_names)
        rec, acc = state[:n_rec], state[n_rec:]
        x = self.emb_drop(self.embedding(tokens))  # (batch, seq, emb)
        y, new = self.rnn(x, cell_spec(a.cell).torch_state(rec))  # y (batch, seq, hidden)
        new_rec = tuple(new) if isinstance(new, tuple) else (new,)
        if a.pooling == "max":
            running = torch.maximum(acc[0], y.amax(dim=1))  # (batch, hidden)
            new_acc: State = (running,)
            pooled = running
        elif a.pooling == "mean":
            total = acc[0] + y.sum(dim=1)  # (batch, hidden)
            count = acc[1] + torch.ones_like(y[:, :, :1]).sum(dim=1)  # (batch, 1); traced, not a constant
            new_acc = (total, count)
            pooled = total / count
        else:
            new_acc = ()
            pooled = new_rec[0][-1]  # the top layer's h = Y at the last token, (batch, hidden)
        probs = F.softmax(self.classifier(self.drop(pooled)), dim=-1)
        return probs, new_rec + new_acc


def stream_state_shapes(args: ClassifierArgs, batch: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of each streaming state tensor for `batch` texts."""
    rec = (args.num_layers, batch, args.hidden_size)  # batch axis 1
    return {"h": rec, "c": rec, "pool_max": (batch, args.hidden_size), "pool_sum": (batch, args.hidden_size),
            "pool_count": (batch, 1)}  # fmt: skip
