"""The recurrent classifier: padding never leaks (every cell, uni and bi), chunked streams equal whole
texts (uni), and max/mean/last pooling compute what they say."""

from __future__ import annotations

import pytest
import torch

from rnnserve.cells import CELLS
from rnnserve.training.classifier_model import POOLINGS, ClassifierArgs, RNNClassifier

VOCAB = 23


def _model(cell: str, bidirectional: bool, pooling: str = "max", layers: int = 2) -> RNNClassifier:
    torch.manual_seed(3)
    args = ClassifierArgs(cell=cell, vocab_size=VOCAB, embedding_size=6, hidden_size=8, num_layers=layers,
                          num_classes=3, bidirectional=bidirectional, pooling=pooling, dropout=0.3,
                          emb_dropout=0.2)  # fmt: skip
    return RNNClassifier(args).eval()


def _texts(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", CELLS)
def test_padded_batch_equals_each_text_alone(cell: str, bidirectional: bool, pooling: str) -> None:
    model = _model(cell, bidirectional, pooling)
    texts = _texts([7, 1, 4, 7, 2])
    width = 9  # wider than the longest text: padding on every row
    tokens = torch.randint(1, VOCAB, (len(texts), width))  # padding = random real tokens: must not leak
    for i, t in enumerate(texts):
        tokens[i, : len(t)] = t
    lengths = torch.tensor([len(t) for t in texts])
    with torch.no_grad():
        batch = model(tokens, lengths)
        alone = torch.cat([model(t[None], torch.tensor([len(t)])) for t in texts])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("cell", CELLS)
def test_any_chunking_equals_the_whole_text(cell: str, pooling: str) -> None:
    model = _model(cell, bidirectional=False, pooling=pooling)
    tokens = torch.randint(1, VOCAB, (3, 10))
    with torch.no_grad():
        whole, whole_state = model.stream(tokens, model.init_stream_state(3))
        forward = torch.softmax(model(tokens, torch.full((3,), 10)), dim=-1)
        for cuts in ([1], [5], [1, 2, 3, 9], list(range(1, 10))):
            state = model.init_stream_state(3)
            for lo, hi in zip([0, *cuts], [*cuts, 10], strict=True):
                probs, state = model.stream(tokens[:, lo:hi], state)
            torch.testing.assert_close(probs, whole, rtol=0, atol=1e-6)
            for a, b in zip(state, whole_state, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole, forward, rtol=0, atol=1e-6)  # streaming == the packed model


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_pooling_is_what_it_says(pooling: str, bidirectional: bool) -> None:
    model = _model("lstm", bidirectional, pooling, layers=1)
    tokens = torch.randint(1, VOCAB, (1, 6))
    with torch.no_grad():
        y, _ = model.rnn(model.embedding(tokens))  # (1, 6, dirs * hidden), no padding
        if pooling == "max":
            pooled = y.amax(dim=1)
        elif pooling == "mean":
            pooled = y.mean(dim=1)
        elif bidirectional:  # last: forward after the last token, backward after the first
            pooled = torch.cat([y[:, -1, :8], y[:, 0, 8:]], dim=-1)
        else:
            pooled = y[:, -1]
        torch.testing.assert_close(model(tokens, torch.tensor([6])), model.classifier(pooled))


def test_stream_state_layout() -> None:
    model = _model("lstm", False, "mean")
    assert model.args.state_names == ("h", "c", "pool_sum", "pool_count")
    h, c, total, count = model.init_stream_state(4)
    assert h.shape == c.shape == (2, 4, 8) and total.shape == (4, 8) and count.shape == (4, 1)
    assert not (h.any() or c.any() or total.any() or count.any())
    (running_max,) = _model("gru", False, "max").init_stream_state(2)[1:]
    assert running_max.shape == (2, 8) and torch.isinf(running_max).all() and (running_max < 0).all()
    assert _model("rnn_relu", False, "last").args.state_names == ("h",)
    _, (_, _, _, count) = model.stream(torch.ones(4, 3, dtype=torch.long), model.init_stream_state(4))
    assert count.flatten().tolist() == [3.0] * 4


def test_bidirectional_cannot_stream_and_bad_args_are_rejected() -> None:
    model = _model("gru", True)
    with pytest.raises(ValueError, match="cannot stream"):
        model.init_stream_state(1)
    with pytest.raises(ValueError, match="pooling"):
        ClassifierArgs(pooling="attention")
    with pytest.raises(ValueError, match="cell"):
        ClassifierArgs(cell="transformer")
    with pytest.raises(ValueError, match="2 classes"):
        ClassifierArgs(num_classes=1)
