"""HRED/VHRED (training/dialogue_model.py): the turn-batched training computation, the reference stream
and the exportable chunk steps (within a turn, and the turn step) compute the same thing
(docs/dialogue.md), for every cell."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rnnserve.training.dialogue_checkpoint import load_dialogue_checkpoint, save_dialogue_checkpoint
from rnnserve.training.dialogue_data import dialogue_batch, flat_stream, response_targets
from rnnserve.training.dialogue_model import DialogueArgs, DialogueModel
from rnnserve.training.model import CELLS
from rnnserve.training.tokenizer import build_tokenizer

EOS = 1
VOCAB = 20
# Encoded dialogues: each turn's ids then <eos>; an empty turn (just <eos>) and a one-turn dialogue too.
DIALOGUES = [
    [[3, 4, 5, EOS], [6, 7, EOS], [8, 9, 10, 11, EOS]],
    [[5, EOS], [EOS], [12, 13, EOS], [19, 2, EOS]],
    [[2, 3, 4, 5, 6, EOS]],
]


def _model(
    cell: str, latent_dim: int = 0, bidirectional: bool = False, seed: int = 0, dropout: float = 0.2
) -> DialogueModel:
    torch.manual_seed(seed)
    args = DialogueArgs(cell=cell, vocab_size=VOCAB, embedding_size=8, encoder_hidden=10, context_hidden=12,
                        decoder_hidden=14, num_layers=2, encoder_bidirectional=bidirectional,
                        latent_dim=latent_dim, dropout=dropout, eos_id=EOS)  # fmt: skip
    return DialogueModel(args).eval()


def _training_logits(model: DialogueModel, d: int) -> torch.Tensor:
    """Dialogue d's counted training logits in stream order: (stream length - 1, vocab)."""
    out = model(*vars(dialogue_batch(DIALOGUES)).values())
    rows = out.dialogue_index == d
    return out.logits[rows][out.mask[rows]]


@pytest.mark.parametrize("latent_dim", [0, 3], ids=["hred", "vhred"])
@pytest.mark.parametrize("cell", CELLS)
@torch.no_grad()
def test_turn_batched_forward_equals_the_stream(cell: str, latent_dim: int) -> None:
    model = _model(cell, latent_dim)
    for d, dialogue in enumerate(DIALOGUES):
        want = _training_logits(model, d)  # every position but the last predicts the next stream token
        stream = torch.tensor([flat_stream(dialogue)])  # (1, seq)
        whole, _ = model.stream(stream)
        pieces, state = [], model.init_state(1)
        for turn in dialogue:  # turn by turn, carrying the state
            logits, state = model.stream(torch.tensor([turn]), state)
            pieces.append(logits)
        by_turn = torch.cat(pieces, dim=1)
        assert want.shape == (stream.shape[1] - 1, VOCAB)
        torch.testing.assert_close(whole[0, :-1], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(by_turn, whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
@torch.no_grad()
def test_stream_chunk_cut_after_each_eos_equals_stream(cell: str) -> None:
    model = _model(cell, latent_dim=2)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(2, VOCAB, (3, 23), generator=gen)  # (batch, seq)
    tokens[torch.rand(3, 23, generator=gen) < 0.2] = EOS  # turns end anywhere, differently per row
    tokens[1, 7] = tokens[1, 8] = EOS  # an empty turn
    want, want_state = model.stream(tokens)
    ends = sorted({int(t) for t in (tokens == EOS).nonzero()[:, 1]} | {4, 13})  # every <eos>, more cuts
    bounds = [0, *(t + 1 for t in ends if t + 1 < tokens.shape[1]), tokens.shape[1]]
    logits, state = [], model.init_state(3)
    for start, stop in itertools.pairwise(bounds):
        chunk, state = model.stream_chunk(tokens[:, start:stop], state)
        logits.append(chunk)
    torch.testing.assert_close(torch.cat(logits, dim=1), want, atol=1e-5, rtol=1e-5)
    for got, expected in zip(state, want_state, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    last, last_state = model.stream_chunk_last(tokens[:, bounds[-2] :], model.init_state(3))
    full, full_state = model.stream_chunk(tokens[:, bounds[-2] :], model.init_state(3))
    torch.testing.assert_close(last, full[:, -1])
    for got, expected in zip(last_state, full_state, strict=True):
        torch.testing.assert_close(got, expected)


@torch.no_grad()
def test_the_turn_step_follows_the_contract() -> None:
    """<eos> advances the context and resets the encoder; a row without <eos> leaves ctx untouched."""
    model = _model("lstm", latent_dim=2)
    state = tuple(torch.rand_like(s) for s in model.init_state(2))
    tokens = torch.tensor([[4, 5, EOS], [4, 5, 6]])
    _, new = model.stream_chunk(tokens, state)
    enc_h, _, ctx_h, _, _, _, z = new
    assert torch.equal(enc_h[:, 0], torch.zeros_like(enc_h[:, 0]))
    assert torch.equal(ctx_h[:, 1], state[2][:, 1]) and torch.equal(z[1], state[6][1])
    assert not torch.equal(ctx_h[:, 0], state[2][:, 0])
    torch.testing.assert_close(z[0], model.prior_params(ctx_h[-1, :1])[0][0])  # the prior's mean


def test_stream_chunk_refuses_eos_before_the_last_token() -> None:
    model = _model("gru")
    with pytest.raises(ValueError, match="<eos> may only be the last token"):
        model.stream_chunk(torch.tensor([[3, EOS, 4]]))
    with pytest.raises(ValueError, match=r"stream_within_turn: the chunk holds <eos>.*needs stream_chunk"):
        model.stream_within_turn(torch.tensor([[3, 4, EOS]]))
    model.stream(torch.tensor([[3, EOS, 4]]))  # the reference takes it anywhere


@pytest.mark.parametrize("latent_dim", [0, 2], ids=["hred", "vhred"])
@pytest.mark.parametrize("cell", CELLS)
@torch.no_grad()
def test_the_served_path_within_turn_then_turn_step_equals_stream(cell: str, latent_dim: int) -> None:
    """Each row as the server runs it: cut after every <eos> and at most 3 tokens a chunk; a chunk
    without <eos> through `stream_within_turn` (context and z untouched), one ending in <eos> through
    `stream_chunk`: the same logits and state as the reference `stream`."""
    model = _model(cell, latent_dim)
    gen = torch.Generator().manual_seed(7)
    for row in range(3):
        tokens = torch.randint(2, VOCAB, (1, 17), generator=gen)  # (1, seq)
        tokens[torch.rand(1, 17, generator=gen) < 0.25] = EOS
        tokens[0, 5] = tokens[0, 6] = EOS  # an empty turn
        state = tuple(torch.rand_like(s) - 0.5 for s in model.init_state(1))
        want, want_state = model.stream(tokens, state)
        cuts = sorted({i + 1 for i in range(17) if tokens[0, i] == EOS} | set(range(0, 18, 3)) | {17})
        logits = []
        for start, stop in itertools.pairwise(cuts):
            chunk = tokens[:, start:stop]
            if chunk[0, -1] == EOS:
                out, state = model.stream_chunk(chunk, state)
            else:
                out, new = model.stream_within_turn(chunk, state)
                _, ctx, _, z = model.split_state(state)
                _, new_ctx, _, new_z = model.split_state(new)
                assert all(torch.equal(a, b) for a, b in zip(ctx, new_ctx, strict=True)) and new_z is z
                last, last_state = model.stream_within_turn_last(chunk, state)
                torch.testing.assert_close(last, out[:, -1])
                assert all(torch.equal(a, b) for a, b in zip(last_state, new, strict=True))
                state = new
            logits.append(out)
        torch.testing.assert_close(torch.cat(logits, dim=1), want, atol=1e-5, rtol=1e-5, msg=f"row {row}")
        for got, expected in zip(state, want_state, strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("latent_dim", [0, 3], ids=["hred", "vhred"])
@torch.no_grad()
def test_response_only_nll_counts_turns_two_onward(latent_dim: int) -> None:
    model = _model("lstm", latent_dim)
    batch = dialogue_batch(DIALOGUES)
    nll, kl, tokens = model.loss(batch, from_turn=1)
    want_nll, want_tokens = torch.zeros(()), 0
    for dialogue in DIALOGUES:
        stream = torch.tensor(flat_stream(dialogue))
        logits, _ = model.stream(stream[None, :-1])
        picked = torch.tensor(response_targets(dialogue), dtype=torch.bool)  # responses: turn 2+, with <eos>
        want_nll += F.cross_entropy(logits[0][picked], stream[1:][picked], reduction="sum")
        want_tokens += int(picked.sum())
    assert tokens == want_tokens == sum(len(t) for d in DIALOGUES for t in d[1:])
    torch.testing.assert_close(nll, want_nll, atol=1e-4, rtol=1e-5)
    everything = model.loss(batch)
    assert everything.tokens == sum(len(flat_stream(d)) - 1 for d in DIALOGUES)
    assert (float(kl) > 0) == (latent_dim > 0)


def test_vhred_trains_on_posterior_samples_with_kl() -> None:
    model = _model("gru", latent_dim=3, dropout=0.0).train()  # no dropout: only z varies
    batch = dialogue_batch(DIALOGUES)
    out = model(batch.turns, batch.lengths)
    assert bool((out.kl[out.turn_index == 0] == 0).all()) and bool((out.kl[out.turn_index > 0] > 0).all())
    loss = model.loss(batch, kl_weight=0.25)
    nll_sum, kl_sum, tokens = loss
    torch.testing.assert_close(loss.objective, (nll_sum + 0.25 * kl_sum) / tokens)
    loss.objective.backward()
    assert model.posterior is not None and model.prior is not None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.posterior.parameters())
    first = model(batch.turns, batch.lengths).logits
    second = model(batch.turns, batch.lengths).logits
    assert not torch.equal(first, second)  # training mode samples z from the posterior
    torch.testing.assert_close(model(*vars(batch).values(), sample=False).logits,
                               model(*vars(batch).values(), sample=False).logits)  # fmt: skip
    model.eval()  # the prior's mean, as served
    served = model(batch.turns, batch.lengths).logits
    torch.testing.assert_close(served, model(batch.turns, batch.lengths).logits)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
@pytest.mark.parametrize("cell", CELLS)
def test_training_turn_vectors_equal_the_packed_encoder(cell: str, bidirectional: bool) -> None:
    """`turn_vectors` (training's encoder: padded run + gather at the last real token when
    unidirectional) gives `encode`'s packed turn vectors and the same gradients, padding whatever it is."""
    model = _model(cell, bidirectional=bidirectional)
    lengths = torch.tensor([6, 1, 3, 6, 2])
    tokens = torch.randint(2, VOCAB, (5, 6), generator=torch.Generator().manual_seed(0))  # (batch, seq)
    tokens[torch.arange(5), lengths - 1] = EOS
    weights = torch.randn(5, model.args.turn_vector_size)
    grads = []
    for vectors in (model.turn_vectors(tokens, lengths), model.encode(tokens, lengths)[0]):
        model.zero_grad()
        (vectors * weights).sum().backward()
        grads.append([p.grad.clone() for p in model.encoder.parameters() if p.grad is not None])
    torch.testing.assert_close(model.turn_vectors(tokens, lengths), model.encode(tokens, lengths)[0])
    assert len(grads[0]) == len(grads[1]) > 0
    for fast, packed in zip(*grads, strict=True):
        torch.testing.assert_close(fast, packed)
    repadded = torch.where(torch.arange(6)[None, :] < lengths[:, None], tokens, EOS)  # (batch, seq)
    torch.testing.assert_close(model.turn_vectors(repadded, lengths), model.turn_vectors(tokens, lengths))


def test_bidirectional_encoder_trains_but_does_not_stream() -> None:
    model = _model("lstm", bidirectional=True)
    nll, _, tokens = model.loss(dialogue_batch(DIALOGUES))
    assert tokens > 0 and torch.isfinite(nll)
    with pytest.raises(ValueError, match="bidirectional utterance encoder needs whole turns"):
        model.stream(torch.tensor([[3, 4, EOS]]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cell": "transformer"}, "cell 'transformer' is not one of"),
        ({"vocab_size": 4, "eos_id": 4}, "eos_id 4 is outside the vocabulary"),
        ({"latent_dim": -1}, "latent_dim must be >= 0"),
        ({"decoder_hidden": 0}, "decoder_hidden=0: must be positive"),
        ({"dropout": 1.0}, "dropout must be in"),
    ],
)
def test_args_are_validated(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DialogueArgs(**kwargs)  # type: ignore[arg-type]


def test_bad_turn_layouts_are_refused() -> None:
    model = _model("rnn_tanh")
    batch = dialogue_batch(DIALOGUES)
    no_eos = batch.turns.clone()
    no_eos[0, 0, 3] = 7  # the first turn no longer ends with <eos>
    with pytest.raises(ValueError, match="must end with <eos>"):
        model(no_eos, batch.lengths)
    gap = batch.lengths.clone()
    gap[0, 1] = 0  # an absent turn before a present one
    with pytest.raises(ValueError, match="absent turns"):
        model(batch.turns, gap)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    tok = build_tokenizer("char", "hello there, how are you?")
    args = DialogueArgs(cell="gru", vocab_size=tok.get_vocab_size(), embedding_size=4, encoder_hidden=6,
                        context_hidden=6, decoder_hidden=8, latent_dim=2)  # fmt: skip
    model = DialogueModel(args)
    save_dialogue_checkpoint(tmp_path / "checkpoint.pt", model, tok, {"valid_response_ppl": 12.5})
    loaded, loaded_tok, ckpt = load_dialogue_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["kind"] == "dialogue" and ckpt["special_tokens"]["eos"] == loaded.args.eos_id == 1
    assert loaded.args == model.args and loaded_tok.get_vocab_size() == tok.get_vocab_size()
    tokens = torch.tensor([[3, 4, 1, 5]])
    torch.testing.assert_close(loaded.stream(tokens)[0], model.eval().stream(tokens)[0])
    small = build_tokenizer("char", "hi")
    with pytest.raises(ValueError, match="does not match"):
        save_dialogue_checkpoint(tmp_path / "other.pt", model, small, {})
