"""The recurrent LM: shapes, state, chunked == whole, weight tying."""

from __future__ import annotations

import pytest
import torch

from rnnserve.cells import CELLS, cell_spec
from rnnserve.training.model import ModelArgs, RNNLanguageModel


def _model(cell: str, layers: int = 2) -> RNNLanguageModel:
    torch.manual_seed(0)
    args = ModelArgs(
        cell=cell, vocab_size=13, embedding_size=6, hidden_size=8, num_layers=layers, dropout=0.2
    )
    return RNNLanguageModel(args).eval()


@pytest.mark.parametrize("cell", CELLS)
def test_shapes_and_init_state(cell: str) -> None:
    model = _model(cell)
    state = model.init_state(3)
    assert len(state) == len(cell_spec(cell).state_names)
    assert all(s.shape == (2, 3, 8) and not s.any() for s in state)
    logits, new = model(torch.randint(0, 13, (3, 5)), state)
    assert logits.shape == (3, 5, 13)
    assert [s.shape for s in new] == [s.shape for s in state]
    logits_default, _ = model(torch.randint(0, 13, (3, 5)))  # state None = zeros
    assert logits_default.shape == (3, 5, 13)


@pytest.mark.parametrize("cell", CELLS)
def test_two_chunks_with_carried_state_equal_the_whole(cell: str) -> None:
    model = _model(cell)
    tokens = torch.randint(0, 13, (2, 9))
    with torch.no_grad():
        whole, s_whole = model(tokens, model.init_state(2))
        a, s = model(tokens[:, :4], model.init_state(2))
        b, s = model(tokens[:, 4:], s)
    torch.testing.assert_close(torch.cat([a, b], dim=1), whole)
    for x, y in zip(s, s_whole, strict=True):
        torch.testing.assert_close(x, y)


def test_tie_weights() -> None:
    model = RNNLanguageModel(ModelArgs(vocab_size=10, embedding_size=8, hidden_size=8, tie_weights=True))
    assert model.decoder.weight is model.embedding.weight
    with pytest.raises(ValueError, match="embedding_size == hidden_size"):
        ModelArgs(vocab_size=10, embedding_size=4, hidden_size=8, tie_weights=True)


def test_unknown_cell_is_rejected() -> None:
    with pytest.raises(ValueError, match="cell"):
        ModelArgs(cell="transformer")
