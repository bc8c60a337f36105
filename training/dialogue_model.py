"""Hierarchical dialogue models: HRED (`latent_dim == 0`) and VHRED (`latent_dim > 0`), docs/dialogue.md.

Three recurrent stacks of one cell type: the utterance encoder reads one turn, the context RNN advances
once per turn on the encoder's turn vector, the decoder is a language model over the next turn
conditioned on the context (`cond` = the context's top-layer h, plus the latent `z` for VHRED).

A conversation is one token stream, every turn ending with `<eos>` (`DialogueArgs.eos_id`); at every
position the logits predict the next token of the stream, exactly like a flat language model. Two ways to
compute it, equal to float tolerance (tests/training/test_dialogue_model.py):
- training, turn-batched: `forward(turns, turn_lengths)` / `loss(batch, kl_weight)` over a
  `TurnBatch` (every turn of many dialogues at once);
- serving, streamed: `stream(tokens, state)` (the reference fused stream step, `<eos>` anywhere), and
  the two exportable chunk steps the server chooses between per row: `stream_within_turn(tokens, state)`
  (no `<eos>` in the chunk: the encoder and the decoder only, the "step" graph) and
  `stream_chunk(tokens, state)` (`<eos>` only as the last token of a row: the fused step with the turn
  step, the "turn" graph).

The stream state is a flat tuple in the manifest's order (`DialogueArgs.state_names`): `enc.h`, [`enc.c`],
`ctx.h`, [`ctx.c`], `dec.h`, [`dec.c`] (each (layers, batch, hidden of that stack)), [`z` (batch, latent)].
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from rnnserve.cells import CELLS, cell_spec
from rnnserve.training.model import recurrent_stack

State = tuple[Tensor, ...]  # a stack's (h,) or (h, c), or the whole stream state (see the module doc)
STACKS: tuple[str, ...] = ("enc", "ctx", "dec")  # state name prefixes, in the manifest's order


def recurrent_state_names(cell: str) -> tuple[str, ...]:
    """The tensors one recurrent stack carries: ("h", "c") for an LSTM, ("h",) otherwise."""
    return cell_spec(cell).state_names


def dialogue_state_names(cell: str, latent_dim: int) -> tuple[str, ...]:
    """The stream state's names in the manifest's order: enc.*, ctx.*, dec.*, then z for VHRED."""
    names = tuple(f"{stack}.{n}" for stack in STACKS for n in recurrent_state_names(cell))
    return (*names, "z") if latent_dim > 0 else names


@dataclass
class DialogueArgs:
    """Architecture of a DialogueModel (stored in checkpoints and in the manifest's `model_args`)."""

    cell: str = "lstm"  # rnn_tanh | rnn_relu | lstm | gru, the same for the three stacks
    vocab_size: int = 100
    embedding_size: int = 64  # one embedding shared by the encoder and the decoder
    encoder_hidden: int = 128
    context_hidden: int = 128
    decoder_hidden: int = 128
    num_layers: int = 1  # of each stack
    encoder_bidirectional: bool = False  # trains and exports its parts, but cannot be served (streamed)
    latent_dim: int = 0  # 0: HRED; > 0: VHRED with a latent z of this size per turn
    dropout: float = 0.1
    eos_id: int = 1  # the end-of-turn token: the LM tokenizer's <eos>

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell {self.cell!r} is not one of {CELLS}")
        sizes = {
            "vocab_size": self.vocab_size,
            "embedding_size": self.embedding_size,
            "encoder_hidden": self.encoder_hidden,
            "context_hidden": self.context_hidden,
            "decoder_hidden": self.decoder_hidden,
            "num_layers": self.num_layers,
        }
        bad = [f"{k}={v}" for k, v in sizes.items() if v < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be positive")
        if self.latent_dim < 0:
            raise ValueError(f"latent_dim must be >= 0 (0 = HRED), got {self.latent_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"eos_id {self.eos_id} is outside the vocabulary (size {self.vocab_size})")

    @property
    def variational(self) -> bool:
        """VHRED (a latent per turn) rather than HRED."""
        return self.latent_dim > 0

    @property
    def encoder_directions(self) -> int:
        return 2 if self.encoder_bidirectional else 1

    @property
    def turn_vector_size(self) -> int:
        """Size of e_k, the context's input: the encoder's top-layer output (both directions)."""
        return self.encoder_hidden * self.encoder_directions

    @property
    def cond_size(self) -> int:
        """Size of the decoder's conditioning vector: c_top (+ z for VHRED)."""
        return self.context_hidden + self.latent_dim

    @property
    def state_names(self) -> tuple[str, ...]:
        return dialogue_state_names(self.cell, self.latent_dim)

    def stack_hidden(self, stack: str) -> int:
        """Hidden size of the stack named by its state prefix ("enc", "ctx" or "dec")."""
        return {"enc": self.encoder_hidden, "ctx": self.context_hidden, "dec": self.decoder_hidden}[stack]


class DialogueOutput(NamedTuple):
    """The turn-batched forward pass over the R present turns of a batch (row order: dialogue, then turn).

    Position j of row r: `logits[r, j]` predicts `targets[r, j]`, counted where `mask[r, j]`. A turn k >= 2
    predicts its w_1..w_n, <eos>; the first turn of a dialogue its w_2..w_n, <eos> (nothing predicts w_1).
    """

    logits: Tensor  # (R, max_len, vocab)
    targets: Tensor  # (R, max_len) int64
    mask: Tensor  # (R, max_len) bool
    dialogue_index: Tensor  # (R,) int64: which dialogue of the batch
    turn_index: Tensor  # (R,) int64: 0 for the first turn of its dialogue
    kl: Tensor  # (R,) KL(q(z|c_{k-1}, e_k) || p(z|c_{k-1})) per turn; zeros for HRED and first turns


class TurnBatch(Protocol):
    """Dialogues as padded turns (`rnnserve.training.dialogue_data.DialogueBatch` builds them):
    `turns` (batch, n_turns, max_len) int64, each present turn its ids followed by `<eos>`, right-padded
    (any id); `lengths` (batch, n_turns) int64 counting the `<eos>`, 0 = no turn (a dialogue's absent turns
    come after its present ones)."""

    turns: Tensor
    lengths: Tensor


@dataclass(frozen=True)
class DialogueLoss:
    """Sums over the counted positions. Unpacks as `nll_sum, kl_sum, tokens = model.loss(batch, w)`;
    `objective` is the per-token training loss with the KL weighted by `kl_weight` (the annealing)."""

    nll_sum: Tensor  # scalar: summed next-token negative log-likelihood (nats)
    kl_sum: Tensor  # scalar: summed per-turn KL(q || p) (0 for HRED)
    tokens: int  # positions counted in nll_sum
    kl_weight: float = 1.0

    def __iter__(self) -> Iterator[Any]:
        return iter((self.nll_sum, self.kl_sum, self.tokens))

    @property
    def objective(self) -> Tensor:
        """(nll_sum + kl_weight * kl_sum) / tokens: what training minimises."""
        return (self.nll_sum + self.kl_weight * self.kl_sum) / max(self.tokens, 1)


def _gaussian_head(input_size: int, hidden: int, latent_dim: int) -> nn.Sequential:
    """An MLP giving (mean, log-variance) of a diagonal Gaussian, concatenated: (..., 2 * latent_dim)."""
    return nn.Sequential(nn.Linear(input_size, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent_dim))


def gaussian_kl(mean_q: Tensor, logvar_q: Tensor, mean_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mean_q, var_q) || N(mean_p, var_p)) of diagonal Gaussians, summed over the last axis."""
    ratio = (logvar_q.exp() + (mean_q - mean_p) ** 2) / logvar_p.exp()
    return 0.5 * (logvar_p - logvar_q + ratio - 1.0).sum(-1)


class _Advanced(NamedTuple):
    """The encoder and the decoder after a chunk, before any turn step (DialogueModel._advance)."""

    y_enc: Tensor  # (batch, seq, hidden_enc)
    enc_next: tuple[Tensor, ...]  # the encoder's state after the chunk
    y_dec: Tensor  # (batch, seq, hidden_dec)
    dec_next: tuple[Tensor, ...]  # the decoder's state after the chunk
    ctx: tuple[Tensor, ...]  # the context's state (unchanged by the chunk)
    z: Tensor | None  # VHRED's latent (unchanged)


class DialogueModel(nn.Module):
    """HRED/VHRED with explicit state (see the module docstring)."""

    def __init__(self, args: DialogueArgs) -> None:
        super().__init__()
        self.args = a = args
        self.embedding = nn.Embedding(a.vocab_size, a.embedding_size)
        self.encoder = recurrent_stack(
            a.cell, a.embedding_size, a.encoder_hidden, a.num_layers, a.dropout, a.encoder_bidirectional
        )
        self.context = recurrent_stack(a.cell, a.turn_vector_size, a.context_hidden, a.num_layers, a.dropout)
        self.decoder = recurrent_stack(
            a.cell, a.embedding_size + a.cond_size, a.decoder_hidden, a.num_layers, a.dropout
        )
        # No bias: cond = 0 (a fresh session) gives the zero state, so turn 1 decodes like a plain LM.
        self.decoder_init = nn.Linear(a.cond_size, a.num_layers * a.decoder_hidden, bias=False)
        self.drop = nn.Dropout(a.dropout)
        self.out = nn.Linear(a.decoder_hidden, a.vocab_size)
        self.prior: nn.Module | None = None
        self.posterior: nn.Module | None = None
        if a.variational:
            self.prior = _gaussian_head(a.context_hidden, a.context_hidden, a.latent_dim)
            self.posterior = _gaussian_head(
                a.context_hidden + a.turn_vector_size, a.context_hidden, a.latent_dim
            )

    # ---- the three parts (what encoder.onnx, context.onnx and decoder.onnx export) ----

    def _run(self, stack: nn.RNNBase, x: Tensor, state: State) -> tuple[Tensor, State]:
        """Run `stack` on x (batch, seq, in) from `state`; (outputs (batch, seq, hidden), new state)."""
        hx = (state[0], state[1]) if self.args.cell == "lstm" else state[0]
        y, new = stack(x, hx)
        return y, (tuple(new) if isinstance(new, tuple) else (new,))

    def stack_state(self, stack: str, batch: int, device: torch.device | str | None = None) -> State:
        """Zero state of one stack ("enc", "ctx", "dec"): (h,) or (h, c), each (layers*dirs, batch, H)."""
        dirs = self.args.encoder_directions if stack == "enc" else 1
        shape = (self.args.num_layers * dirs, batch, self.args.stack_hidden(stack))
        dev = device if device is not None else self.out.weight.device
        return tuple(torch.zeros(shape, device=dev) for _ in recurrent_state_names(self.args.cell))

    def encode(self, tokens: Tensor, lengths: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Encoder over right-padded turns: tokens (batch, seq), lengths (batch,) in [1, seq] ->
        (turn_vector (batch, turn_vector_size): the top layer's final output, both directions; the state
        after each row's `lengths` tokens). Packed, for that exact state (the encoder graph's); training
        takes `turn_vectors`, which needs no state."""
        if state is None:
            state = self.stack_state("enc", tokens.shape[0], tokens.device)
        x = self.drop(self.embedding(tokens))  # (batch, seq, emb)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        hx = (state[0], state[1]) if self.args.cell == "lstm" else state[0]
        _, final = self.encoder(packed, hx)
        new = tuple(final) if isinstance(final, tuple) else (final,)
        h = new[0]  # (layers * dirs, batch, hidden_enc)
        vector = torch.cat([h[-2], h[-1]], dim=-1) if self.args.encoder_bidirectional else h[-1]
        return vector, new

    def turn_vectors(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """The turn vectors of `encode` from a zero state, without the state: tokens (batch, seq), lengths
        (batch,) in [1, seq] -> (batch, turn_vector_size). What training needs, computed fast: a
        unidirectional encoder runs over the padded turns and each row's vector is its top-layer output at
        position `lengths - 1` (exact: a forward RNN's earlier outputs cannot depend on the later padding),
        because the packed LSTM's CPU backward is super-linear in the longest turn (one full-size zero
        gradient per time step: 52 s vs 3.4 s for 64 turns of 480 tokens). A bidirectional encoder packs:
        its backward direction must not read the padding."""
        if self.args.encoder_bidirectional:
            return self.encode(tokens, lengths)[0]
        state = self.stack_state("enc", tokens.shape[0], tokens.device)
        y, _ = self._run(self.encoder, self.drop(self.embedding(tokens)), state)  # (batch, seq, hidden_enc)
        return y[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]  # (batch, hidden_enc)

    def context_step(self, turn_vector: Tensor, state: State) -> State:
        """c_k = ctx(e_k, c_{k-1}): turn_vector (batch, turn_vector_size) -> the context's new state."""
        _, new = self._run(self.context, turn_vector[:, None, :], state)
        return new

    def prior_params(self, c_top: Tensor) -> tuple[Tensor, Tensor]:
        """VHRED's prior p(z | c): c_top (batch, context_hidden) -> (mean, logvar), each (batch, latent)."""
        if self.prior is None:
            raise ValueError("an HRED model (latent_dim 0) has no latent prior")
        mean, logvar = self.prior(c_top).chunk(2, dim=-1)
        return mean, logvar

    def posterior_params(self, c_top: Tensor, turn_vector: Tensor) -> tuple[Tensor, Tensor]:
        """VHRED's posterior q(z | c_{k-1}, e_k) -> (mean, logvar), each (batch, latent)."""
        if self.posterior is None:
            raise ValueError("an HRED model (latent_dim 0) has no latent posterior")
        mean, logvar = self.posterior(torch.cat([c_top, turn_vector], dim=-1)).chunk(2, dim=-1)
        return mean, logvar

    def decoder_start(self, cond: Tensor) -> State:
        """The decoder's (re-)initial state: h = tanh(W_init cond), one slice of W_init per layer; c = 0."""
        a = self.args
        h = torch.tanh(self.decoder_init(cond)).view(-1, a.num_layers, a.decoder_hidden)  # (batch, L, H)
        h = h.transpose(0, 1).contiguous()  # (layers, batch, hidden_dec)
        return (h, torch.zeros_like(h)) if a.cell == "lstm" else (h,)

    def decode(self, tokens: Tensor, cond: Tensor, state: State) -> tuple[Tensor, State]:
        """Decoder: tokens (batch, seq), cond (batch, cond_size) -> (logits (batch, seq, vocab), state)."""
        y, new = self._decode_hidden(tokens, cond, state)
        return self.out(self.drop(y)), new

    def _decode_hidden(self, tokens: Tensor, cond: Tensor, state: State) -> tuple[Tensor, State]:
        x = self.drop(self.embedding(tokens))  # (batch, seq, emb)
        per_step = cond[:, None, :].expand(-1, tokens.shape[1], -1)  # (batch, seq, cond)
        return self._run(self.decoder, torch.cat([x, per_step], dim=-1), state)

    # ---- the stream (serving) ----

    def init_state(self, batch: int, device: torch.device | str | None = None) -> State:
        """A fresh session's state (all zeros), in `args.state_names` order."""
        self._check_streamable()
        state = [t for stack in STACKS for t in self.stack_state(stack, batch, device)]
        if self.args.variational:
            state.append(torch.zeros(batch, self.args.latent_dim, device=state[0].device))
        return tuple(state)

    def split_state(self, state: State) -> tuple[State, State, State, Tensor | None]:
        """(enc, ctx, dec, z or None) from the flat stream state."""
        n = len(recurrent_state_names(self.args.cell))
        if len(state) != len(self.args.state_names):
            raise ValueError(f"the state has {len(state)} tensors, expected {self.args.state_names}")
        z = state[3 * n] if self.args.variational else None
        return state[:n], state[n : 2 * n], state[2 * n : 3 * n], z

    def _cond(self, ctx: State, z: Tensor | None) -> Tensor:
        c_top = ctx[0][-1]  # (batch, hidden_ctx)
        return c_top if z is None else torch.cat([c_top, z], dim=-1)

    def stream(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """The reference fused stream step, token by token: tokens (batch, seq) with `<eos>` anywhere ->
        (logits (batch, seq, vocab): each predicts the next token of the stream, the new state)."""
        state = state if state is not None else self.init_state(tokens.shape[0], tokens.device)
        logits = []
        for t in range(tokens.shape[1]):  # one token is a chunk whose <eos> can only be last
            step, state = self.stream_chunk(tokens[:, t : t + 1], state)
            logits.append(step)
        return torch.cat(logits, dim=1), state

    def stream_within_turn(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """The stream step over a chunk without `<eos>` (the "step" graph): the encoder and the decoder
        advance, the context (and z) pass through unchanged. tokens (batch, seq >= 1) -> (logits (batch,
        seq, vocab), new state)."""
        return self._within_turn(tokens, state, every_position=True)

    def stream_within_turn_last(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """`stream_within_turn` with the last position's logits only, (batch, vocab) (the "last" graph)."""
        return self._within_turn(tokens, state, every_position=False)

    def stream_chunk(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """The fused stream step over a chunk whose `<eos>` may only be each row's last token (the "turn"
        graph, for rows that end a turn; exact for rows that don't too): tokens (batch, seq >= 1) ->
        (logits (batch, seq, vocab), new state)."""
        return self._chunk(tokens, state, every_position=True)

    def stream_chunk_last(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """`stream_chunk` with the last position's logits only, (batch, vocab) (the "turn_last" graph)."""
        return self._chunk(tokens, state, every_position=False)

    def _advance(self, tokens: Tensor, state: State | None, eos_last: bool) -> _Advanced:
        """The encoder and the decoder over a chunk (both graphs start with this)."""
        if state is None:
            state = self.init_state(tokens.shape[0], tokens.device)
        if not torch.jit.is_tracing():
            self._check_chunk(tokens, eos_last=eos_last)
        enc, ctx, dec, z = self.split_state(state)
        y_enc, enc_next = self._run(self.encoder, self.drop(self.embedding(tokens)), enc)  # (batch, seq, H)
        y_dec, dec_next = self._decode_hidden(tokens, self._cond(ctx, z), dec)  # (batch, seq, hidden_dec)
        return _Advanced(y_enc, enc_next, y_dec, dec_next, ctx, z)

    def _within_turn(self, tokens: Tensor, state: State | None, every_position: bool) -> tuple[Tensor, State]:
        _, enc_next, y_dec, dec_next, ctx, z = self._advance(tokens, state, eos_last=False)
        new = (*enc_next, *ctx, *dec_next, *(() if z is None else (z,)))
        y = y_dec if every_position else y_dec[:, -1]  # (batch, seq, hidden_dec) or (batch, hidden_dec)
        return self.out(self.drop(y)), new

    def _chunk(self, tokens: Tensor, state: State | None, every_position: bool) -> tuple[Tensor, State]:
        y_enc, enc_next, y_dec, dec_next, ctx, z = self._advance(tokens, state, eos_last=True)
        # The turn step, selected below for the rows whose last token is <eos>: the context advances on
        # the encoder's output there, z takes the prior's mean, the decoder restarts and re-reads <eos>.
        ctx_turn = self.context_step(y_enc[:, -1], ctx)
        z_turn = self.prior_params(ctx_turn[0][-1])[0] if z is not None else None
        cond_turn = self._cond(ctx_turn, z_turn)
        y_eos, dec_turn = self._decode_hidden(tokens[:, -1:], cond_turn, self.decoder_start(cond_turn))
        ends = tokens[:, -1] == self.args.eos_id  # (batch,)
        rows = ends[None, :, None]  # (1, batch, 1) against (layers, batch, hidden)
        new = [torch.where(rows, torch.zeros_like(e), e) for e in enc_next]
        new += [torch.where(rows, t, c) for t, c in zip(ctx_turn, ctx, strict=True)]
        new += [torch.where(rows, t, d) for t, d in zip(dec_turn, dec_next, strict=True)]
        if z is not None and z_turn is not None:
            new.append(torch.where(ends[:, None], z_turn, z))
        last = torch.where(ends[:, None], y_eos[:, 0], y_dec[:, -1])  # (batch, hidden_dec)
        if not every_position:
            return self.out(self.drop(last)), tuple(new)
        y = torch.cat([y_dec[:, :-1], last[:, None]], dim=1)  # (batch, seq, hidden_dec)
        return self.out(self.drop(y)), tuple(new)

    def _check_streamable(self) -> None:
        if self.args.encoder_bidirectional:
            raise ValueError(
                "a bidirectional utterance encoder needs whole turns, so this model cannot stream tokens "
                "one by one (train with a unidirectional encoder to serve it)"
            )

    def _check_chunk(self, tokens: Tensor, eos_last: bool) -> None:
        """A (batch, seq >= 1) chunk with no `<eos>` (`eos_last`: but as a row's last token)."""
        if tokens.dim() != 2 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must be (batch, seq >= 1), got shape {tuple(tokens.shape)}")
        inside = tokens[:, :-1] if eos_last else tokens
        if bool((inside == self.args.eos_id).any()):
            raise ValueError(
                "stream_chunk: <eos> may only be the last token of a row (cut the input after each <eos>, "
                "or use stream())"
                if eos_last
                else "stream_within_turn: the chunk holds <eos> (a row that ends a turn needs "
                "stream_chunk, the turn step)"
            )

    # ---- training: all turns of many dialogues at once ----

    def forward(self, turns: Tensor, turn_lengths: Tensor, sample: bool | None = None) -> DialogueOutput:
        """The turn-batched computation over `TurnBatch`'s layout: turns (batch, n_turns, max_len),
        turn_lengths (batch, n_turns). `sample`: draw each z from the posterior (default: in training mode)
        rather than take the prior's mean (what serving does; eval mode)."""
        a = self.args
        _check_turns(turns, turn_lengths, a.eos_id)
        batch, n_turns, max_len = turns.shape
        rows = turn_lengths.reshape(-1).nonzero().squeeze(1)  # (R,) the present turns
        flat = turns.reshape(-1, max_len)[rows]  # (R, max_len)
        lengths = turn_lengths.reshape(-1)[rows]  # (R,)
        vectors = self.turn_vectors(flat, lengths)  # (R, turn_vector_size), each turn from a zero state
        every = vectors.new_zeros(batch * n_turns, a.turn_vector_size).index_copy(0, rows, vectors)
        c, _ = self._run(self.context, every.view(batch, n_turns, -1), self.stack_state("ctx", batch))
        c_prev = torch.cat([torch.zeros_like(c[:, :1]), c[:, :-1]], dim=1)  # (batch, n_turns, H): c_{k-1}
        c_prev = c_prev.reshape(batch * n_turns, -1)[rows]  # (R, hidden_ctx), zeros for a first turn
        first = rows % n_turns == 0  # (R,)
        sample = self.training if sample is None else sample
        cond, kl = self._turn_conditions(c_prev, vectors, first, sample)  # (R, cond_size), (R,)
        # Turn k >= 2 reads <eos> (the previous turn's), w_1..w_n and predicts w_1..w_n, <eos>; the first
        # turn reads w_1..w_n from the zero state and predicts w_2..w_n, <eos>.
        eos = torch.full_like(flat[:, :1], a.eos_id)
        inputs = torch.where(first[:, None], flat, torch.cat([eos, flat[:, :-1]], dim=1))  # (R, max_len)
        targets = torch.where(first[:, None], torch.cat([flat[:, 1:], eos], dim=1), flat)
        counted = lengths - first.long()  # (R,) predictions per turn
        mask = torch.arange(max_len, device=flat.device)[None, :] < counted[:, None]  # (R, max_len)
        logits, _ = self.decode(inputs, cond, self.decoder_start(cond))  # (R, max_len, vocab)
        return DialogueOutput(logits, targets, mask, rows // n_turns, rows % n_turns, kl)

    def _turn_conditions(
        self, c_prev: Tensor, vectors: Tensor, first: Tensor, sample: bool
    ) -> tuple[Tensor, Tensor]:
        """Each turn's decoder condition (R, cond_size) and KL (R,). A first turn has no latent: z = 0,
        as in a fresh session's state."""
        if not self.args.variational:
            return c_prev, c_prev.new_zeros(c_prev.shape[0])
        prior_mean, prior_logvar = self.prior_params(c_prev)  # (R, latent) each
        post_mean, post_logvar = self.posterior_params(c_prev, vectors)
        # Training draws from q(z | c_{k-1}, e_k), reparameterised; otherwise the prior's mean, as served.
        z = post_mean + torch.exp(0.5 * post_logvar) * torch.randn_like(post_mean) if sample else prior_mean
        z = z.masked_fill(first[:, None], 0.0)
        kl = gaussian_kl(post_mean, post_logvar, prior_mean, prior_logvar).masked_fill(first, 0.0)
        return torch.cat([c_prev, z], dim=-1), kl

    def loss(
        self, batch: TurnBatch, kl_weight: float = 1.0, *, from_turn: int = 0, sample: bool | None = None
    ) -> DialogueLoss:
        """`nll_sum, kl_sum, tokens` over the turns with index >= `from_turn`, with `.objective` =
        (nll_sum + kl_weight * kl_sum) / tokens to minimise (the trainer anneals `kl_weight` from 0 to 1).

        `from_turn=0` counts every prediction, as the stream does; `from_turn=1` the responses only (the
        2nd turn onward): the held-out response perplexity is exp(sum of nll_sum / sum of tokens) in
        eval mode (z = the prior's mean, as served). `sample` as in `forward`.
        """
        out = self(batch.turns, batch.lengths, sample)
        keep = out.turn_index >= from_turn  # (R,)
        mask = out.mask & keep[:, None]  # (R, max_len)
        nll = F.cross_entropy(out.logits[mask], out.targets[mask], reduction="sum")
        return DialogueLoss(nll, out.kl[keep].sum(), int(mask.sum()), kl_weight)


def _check_turns(turns: Tensor, lengths: Tensor, eos_id: int) -> None:
    """Clear errors for a batch that is not TurnBatch's layout."""
    if turns.dim() != 3 or lengths.shape != turns.shape[:2]:
        raise ValueError(
            f"turns must be (batch, n_turns, max_len) and lengths (batch, n_turns); got "
            f"{tuple(turns.shape)} and {tuple(lengths.shape)}"
        )
    if bool((lengths < 0).any()) or bool((lengths > turns.shape[2]).any()):
        raise ValueError(f"turn lengths must be in [0, max_len={turns.shape[2]}]")
    present = lengths > 0  # (batch, n_turns)
    if not bool(present[:, 0].all()) or bool((present[:, 1:] & ~present[:, :-1]).any()):
        raise ValueError("every dialogue needs a first turn, and its absent turns (length 0) must come last")
    positions = torch.arange(turns.shape[2], device=turns.device)  # (max_len,)
    last = positions == (lengths[..., None] - 1)  # (batch, n_turns, max_len)
    inside = positions < (lengths[..., None] - 1)
    is_eos = turns == eos_id
    if bool((last & ~is_eos).any()) or bool((inside & is_eos).any()):
        raise ValueError(f"every present turn must end with <eos> (id {eos_id}) and hold no other <eos>")
