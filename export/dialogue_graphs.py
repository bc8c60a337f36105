"""The ONNX graphs of a dialogue model (docs/dialogue.md) and their validation against PyTorch.

Seven graphs, all written by the TorchScript exporter (opset 17) with dynamic batch and seq axes, each
recurrent stack as the native ONNX RNN/LSTM/GRU op:
- "step" (`model.onnx`): tokens [batch, seq] + state_in.<name> -> logits [batch, seq, vocab] +
  state_out.<name> for rows without `<eos>` (`DialogueModel.stream_within_turn`: the encoder and the
  decoder only; ctx and z pass through);
- "last" (`model_last.onnx`): the same with `logits_last` [batch, vocab] only;
- "turn" (`model_turn.onnx`) and "turn_last" (`model_turn_last.onnx`): the same inputs and outputs for
  rows whose last token is `<eos>` (`DialogueModel.stream_chunk`: the fused step, which also runs the turn
  step: context, decoder re-init, the `<eos>` re-read; `<eos>` never before a row's last token);
- "encoder": tokens + lengths [batch] + state_in.enc.* -> turn_vector + state_out.enc.*;
- "context": turn_vector + state_in.ctx.* -> state_out.ctx.* (+ VHRED's prior z_mean, z_logvar);
- "decoder": tokens + cond + state_in.dec.* -> logits + state_out.dec.* + dec_init.h (the re-init).
Validation runs ONNX Runtime (CPU) against PyTorch at several batch sizes and sequence lengths, on random
states: the step graphs on rows without `<eos>`, the turn graphs on rows ending in `<eos>` mixed with rows
that don't; the four are checked against the token-by-token reference `DialogueModel.stream`, and "step"
and "turn" fed one token at a time against themselves.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from rnnserve.export.manifest import StateSpec, TensorSpec
from rnnserve.export.onnx_export import onnx_export_quietly
from rnnserve.export.validate import STEP_PREFIX, max_abs_diff, merge_case, ort_session, raise_if_over
from rnnserve.export.variants import LAST_OUTPUT
from rnnserve.training.dialogue_model import STACKS, DialogueArgs, DialogueModel, recurrent_state_names

Arrays = dict[str, np.ndarray]
PART_FILES: dict[str, str] = {"encoder": "encoder.onnx", "context": "context.onnx", "decoder": "decoder.onnx"}
TURN_FILES: dict[str, str] = {"turn": "model_turn.onnx", "turn_last": "model_turn_last.onnx"}
STREAM_ROLES: tuple[str, ...] = ("step", "last", "turn", "turn_last")  # the LM step interface, all four
LAST_ROLES: tuple[str, ...] = ("last", "turn_last")  # `logits_last` only
ENDS_TURN_ROLES: tuple[str, ...] = ("turn", "turn_last")  # rows whose last token is <eos>
Specs = tuple[list[TensorSpec], list[TensorSpec]]


def _state_shape(a: DialogueArgs, name: str, batch: int | str) -> list[int | str]:
    """A state tensor's shape: [layers (* dirs for enc), batch, hidden] or z's [batch, latent]."""
    if name == "z":
        return [batch, a.latent_dim]
    stack = name.split(".")[0]
    dirs = a.encoder_directions if stack == "enc" else 1
    return [a.num_layers * dirs, batch, a.stack_hidden(stack)]


def dialogue_state_specs(a: DialogueArgs) -> list[StateSpec]:
    """The manifest's `state`, in the contract's order (enc.*, ctx.*, dec.*, z)."""
    specs = []
    for name in a.state_names:
        shape = [int(d) for d in _state_shape(a, name, -1)]
        specs.append(StateSpec(name, f"state_in.{name}", f"state_out.{name}", shape, shape.index(-1)))
    return specs


def _states(a: DialogueArgs, names: Sequence[str], prefix: str) -> list[TensorSpec]:
    return [TensorSpec(f"{prefix}.{n}", _state_shape(a, n, "batch"), "float32") for n in names]


def _stack_names(a: DialogueArgs, stack: str) -> list[str]:
    return [f"{stack}.{n}" for n in recurrent_state_names(a.cell)]


def step_specs(a: DialogueArgs, last: bool = False) -> Specs:
    """The step graph's (or with `last`, the last-position graph's) inputs and outputs."""
    logits = (TensorSpec(LAST_OUTPUT, ["batch", a.vocab_size], "float32") if last
              else TensorSpec("logits", ["batch", "seq", a.vocab_size], "float32"))  # fmt: skip
    ins = [TensorSpec("tokens", ["batch", "seq"], "int64"), *_states(a, a.state_names, "state_in")]
    return ins, [logits, *_states(a, a.state_names, "state_out")]


def part_specs(a: DialogueArgs) -> dict[str, Specs]:
    """Role -> (inputs, outputs) of the encoder, context and decoder graphs."""
    enc, ctx, dec = (_stack_names(a, s) for s in STACKS)
    tokens = TensorSpec("tokens", ["batch", "seq"], "int64")
    vector = TensorSpec("turn_vector", ["batch", a.turn_vector_size], "float32")
    prior = [TensorSpec(n, ["batch", a.latent_dim], "float32") for n in ("z_mean", "z_logvar")]
    return {
        "encoder": (
            [tokens, TensorSpec("lengths", ["batch"], "int64"), *_states(a, enc, "state_in")],
            [vector, *_states(a, enc, "state_out")],
        ),
        "context": (
            [vector, *_states(a, ctx, "state_in")],
            [*_states(a, ctx, "state_out"), *(prior if a.variational else [])],
        ),
        "decoder": (
            [tokens, TensorSpec("cond", ["batch", a.cond_size], "float32"), *_states(a, dec, "state_in")],
            [
                TensorSpec("logits", ["batch", "seq", a.vocab_size], "float32"),
                *_states(a, dec, "state_out"),
                TensorSpec("dec_init.h", _state_shape(a, "dec.h", "batch"), "float32"),
            ],
        ),
    }


# ---- PyTorch functions of each graph (exported through one wrapper, and the validation's reference) ----

Fn = Callable[..., tuple[Tensor, ...]]


def _stream_fn(step: Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, tuple[Tensor, ...]]]) -> Fn:
    def run(tokens: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        logits, new = step(tokens, tuple(state))
        return (logits, *new)

    return run


def _encoder_fn(m: DialogueModel) -> Fn:
    def run(tokens: Tensor, lengths: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        vector, new = m.encode(tokens, lengths, tuple(state))
        return (vector, *new)

    return run


def _context_fn(m: DialogueModel) -> Fn:
    def run(turn_vector: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        new = m.context_step(turn_vector, tuple(state))
        return (*new, *(m.prior_params(new[0][-1]) if m.args.variational else ()))

    return run


def _decoder_fn(m: DialogueModel) -> Fn:
    def run(tokens: Tensor, cond: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        logits, new = m.decode(tokens, cond, tuple(state))
        return (logits, *new, m.decoder_start(cond)[0])

    return run


GRAPH_FUNCTIONS: dict[str, Callable[[DialogueModel], Fn]] = {
    "step": lambda m: _stream_fn(m.stream_within_turn),
    "last": lambda m: _stream_fn(m.stream_within_turn_last),
    "turn": lambda m: _stream_fn(m.stream_chunk),
    "turn_last": lambda m: _stream_fn(m.stream_chunk_last),
    "encoder": _encoder_fn, "context": _context_fn, "decoder": _decoder_fn,
}  # fmt: skip


class _Graph(nn.Module):
    """One graph's function as a module for the exporter (the model is a submodule: its weights export)."""

    def __init__(self, model: DialogueModel, role: str) -> None:
        super().__init__()
        self.model = model
        self.fn = GRAPH_FUNCTIONS[role](model)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        return self.fn(*inputs)


def graph_specs(a: DialogueArgs, role: str) -> Specs:
    """(inputs, outputs) of the graph playing `role`."""
    if role in STREAM_ROLES:
        return step_specs(a, last=role in LAST_ROLES)
    return part_specs(a)[role]


def example_feeds(
    a: DialogueArgs, role: str, batch: int, seq: int, rng: np.random.Generator, case: int = 0
) -> Arrays:
    """Random inputs of the graph playing `role`: tokens without `<eos>` (the step graphs' contract);
    for the turn graphs, `<eos>` as the last token of half the rows (rows 0, 2, 4, ... when `case` is even,
    1, 3, ... when odd: a single row ends a turn in every other case); lengths in [1, seq] (the first row
    full); random states."""
    ins, _ = graph_specs(a, role)
    feeds: Arrays = {}
    for spec in ins:
        if spec.name == "tokens":
            tokens = rng.integers(0, a.vocab_size - 1, size=(batch, seq), dtype=np.int64)
            tokens[tokens >= a.eos_id] += 1  # every id but <eos>
            if role in ENDS_TURN_ROLES:
                tokens[case % 2 :: 2, -1] = a.eos_id
            feeds["tokens"] = tokens
        elif spec.name == "lengths":
            lengths = rng.integers(1, seq + 1, size=batch, dtype=np.int64)
            lengths[0] = seq
            feeds["lengths"] = lengths
        else:  # states, turn_vector, cond: non-zero so the graph's use of them is exercised
            shape = [batch if isinstance(d, str) else d for d in spec.shape]
            feeds[spec.name] = rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
    return feeds


def export_dialogue_graph(model: DialogueModel, role: str, path: Path) -> Path:
    """Write the graph playing `role` (STREAM_ROLES or PART_FILES' roles) at `path`."""
    if role in STREAM_ROLES:
        model._check_streamable()
    model.eval()
    ins, outs = graph_specs(model.args, role)
    feeds = example_feeds(model.args, role, 2, 3, np.random.default_rng(0))  # not 1: no axis specialised
    args = tuple(torch.from_numpy(feeds[s.name]) for s in ins)
    return onnx_export_quietly(_Graph(model, role), args, Path(path), ins, outs, "torchscript")


@torch.no_grad()
def _reference(model: DialogueModel, role: str, feeds: Arrays) -> Arrays:
    """PyTorch's outputs for `feeds`; the step and turn graphs against `stream`, the token-by-token
    reference."""
    ins, outs = graph_specs(model.args, role)
    args = [torch.from_numpy(feeds[s.name]) for s in ins]
    if role in STREAM_ROLES:
        logits, new = model.stream(args[0], tuple(args[1:]))
        values: tuple[Tensor, ...] = (logits[:, -1] if role in LAST_ROLES else logits, *new)
    else:
        values = GRAPH_FUNCTIONS[role](model)(*args)
    return {s.name: v.numpy() for s, v in zip(outs, values, strict=True)}


def _ort_stepped(sess: ort.InferenceSession, a: DialogueArgs, feeds: Arrays) -> Arrays:
    """A step or turn graph fed one token at a time, carrying the state; outputs shaped like one chunk
    call."""
    ins, outs = step_specs(a)
    carried = {s.name: feeds[s.name] for s in ins[1:]}
    logits, result = [], {}
    for t in range(feeds["tokens"].shape[1]):
        values = sess.run([s.name for s in outs], {"tokens": feeds["tokens"][:, t : t + 1], **carried})
        result = {s.name: v for s, v in zip(outs, values, strict=True)}
        logits.append(result["logits"])  # (batch, 1, vocab)
        carried = {i.name: result[o.name] for i, o in zip(ins[1:], outs[1:], strict=True)}
    return {**result, "logits": np.concatenate(logits, axis=1)}


def validate_dialogue_graph(
    model: DialogueModel,
    role: str,
    onnx_path: Path,
    batch_sizes: Sequence[int],
    seq_lens: Sequence[int],
    atol: float,
    seed: int = 0,
) -> dict[str, float]:
    """Max abs difference per output (`<role>.<output>`; the step and turn graphs also
    `<role>_vs_chunk.<output>`: fed token by token against one chunk) over every (batch, seq) case;
    raises ExportValidationError listing them when any is over `atol`."""
    model.eval()
    sess = ort_session(onnx_path)
    _, outs = graph_specs(model.args, role)
    rng = np.random.default_rng(seed)
    diffs: dict[str, float] = {}
    where: dict[str, str] = {}
    for case, (batch, seq) in enumerate(itertools.product(batch_sizes, seq_lens)):
        at = f"batch {batch}, seq {seq}"
        feeds = example_feeds(model.args, role, batch, seq, rng, case)
        got = dict(zip([s.name for s in outs], sess.run([s.name for s in outs], feeds), strict=True))
        want = _reference(model, role, feeds)
        found = {f"{role}.{n}": max_abs_diff(got[n], want[n], f"{role}.{n} at {at}") for n in want}
        if role in ("step", "turn"):
            prefix = STEP_PREFIX if role == "step" else f"{role}_vs_chunk."
            stepped = _ort_stepped(sess, model.args, feeds)
            found.update({prefix + n: max_abs_diff(stepped[n], got[n], prefix + n) for n in got})
        merge_case(diffs, where, found, at)
    raise_if_over(diffs, where, atol)
    return diffs
