"""Numeric validation of an exported language model: ONNX Runtime (CPU) against PyTorch (eval mode).

Checks every (batch, seq) pair on random tokens and random non-zero states, and that feeding the T tokens
one at a time through ONNX Runtime, carrying the state, equals feeding the T-token chunk at once.
Any max abs difference over `atol` raises ExportValidationError naming each output and its difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from rnnserve.training.model import RNNLanguageModel

Arrays = dict[str, np.ndarray]
STEP_PREFIX = "step_vs_chunk."


class ExportValidationError(RuntimeError):
    """The exported graph's outputs differ from PyTorch's (or from themselves chunked) beyond tolerance."""


def output_names(model: RNNLanguageModel) -> list[str]:
    """Graph outputs in order: logits, then state_out.h (and state_out.c for LSTM)."""
    return ["logits", *(f"state_out.{n}" for n in model.args.state_names)]


def input_names(model: RNNLanguageModel) -> list[str]:
    """Graph inputs in order: tokens, then state_in.h (and state_in.c for LSTM)."""
    return ["tokens", *(f"state_in.{n}" for n in model.args.state_names)]


def _random_inputs(model: RNNLanguageModel, batch: int, seq: int, rng: np.random.Generator) -> Arrays:
    a = model.args
    feeds: Arrays = {"tokens": rng.integers(0, a.vocab_size, size=(batch, seq), dtype=np.int64)}
    for name in input_names(model)[1:]:
        # (layers, batch, hidden), non-zero so the graph's use of the incoming state is exercised
        feeds[name] = rng.uniform(-1.0, 1.0, size=(a.num_layers, batch, a.hidden_size)).astype(np.float32)
    return feeds


@torch.no_grad()
def _run_torch(model: RNNLanguageModel, feeds: Arrays) -> Arrays:
    names = input_names(model)
    state = tuple(torch.from_numpy(feeds[n]) for n in names[1:])
    logits, new = model(torch.from_numpy(feeds["tokens"]), state)
    return dict(zip(output_names(model), [logits.numpy(), *(s.numpy() for s in new)], strict=True))


def _run_ort(sess: ort.InferenceSession, names: list[str], feeds: Arrays) -> Arrays:
    return dict(zip(names, sess.run(names, feeds), strict=True))


def max_abs_diff(a: np.ndarray, b: np.ndarray, what: str) -> float:
    """Max |a - b| (0 for empty arrays); raises ExportValidationError when the shapes differ."""
    if a.shape != b.shape:
        raise ExportValidationError(f"{what}: shape {a.shape} differs from the expected {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))


def _step_vs_chunk(sess: ort.InferenceSession, model: RNNLanguageModel, feeds: Arrays) -> Arrays:
    """Feed the tokens one at a time with carried state; returns outputs shaped like one chunk call."""
    outs = output_names(model)
    state_in = input_names(model)[1:]
    carried = {n: feeds[n] for n in state_in}
    logits: list[np.ndarray] = []
    result: Arrays = {}
    for t in range(feeds["tokens"].shape[1]):
        result = _run_ort(sess, outs, {"tokens": feeds["tokens"][:, t : t + 1], **carried})
        logits.append(result["logits"])  # (batch, 1, vocab)
        carried = {i: result[o] for i, o in zip(state_in, outs[1:], strict=True)}
    return {"logits": np.concatenate(logits, axis=1), **{o: result[o] for o in outs[1:]}}


def lm_case_diffs(
    model: RNNLanguageModel, sess: ort.InferenceSession, batch: int, seq: int, rng: np.random.Generator
) -> dict[str, float]:
    """One (batch, seq) case on random tokens and random states: max abs diff of each output, ONNX
    Runtime against PyTorch, and `step_vs_chunk.<output>`: the chunk fed one token at a time (carrying
    the state) against the chunk at once."""
    feeds = _random_inputs(model, batch, seq, rng)
    got, want = _run_ort(sess, output_names(model), feeds), _run_torch(model, feeds)
    stepped = _step_vs_chunk(sess, model, feeds)
    diffs = {}
    for name in output_names(model):
        diffs[name] = max_abs_diff(got[name], want[name], f"{name} at batch {batch}, seq {seq}")
        diffs[STEP_PREFIX + name] = max_abs_diff(stepped[name], got[name], STEP_PREFIX + name)
    return diffs


def ort_session(onnx_path: Path) -> ort.InferenceSession:
    """A CPU ONNX Runtime session, as validation runs it."""
    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


def merge_case(diffs: dict[str, float], where: dict[str, str], case: dict[str, float], at: str) -> None:
    """Keep, per key, the largest difference seen so far (a NaN always wins) and where it was."""
    for key, d in case.items():
        if key not in diffs or d >= diffs[key] or np.isnan(d):
            diffs[key], where[key] = d, at


def validate_lm_export(
    model: RNNLanguageModel,
    onnx_path: Path,
    batch_sizes: Sequence[int] = (1, 3, 8),
    seq_lens: Sequence[int] = (1, 5, 17),
    atol: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Max abs differences per output (and `step_vs_chunk.<output>`) over every (batch, seq) case;
    raises ExportValidationError when any is over `atol`."""
    model.eval()
    sess = ort_session(onnx_path)
    rng = np.random.default_rng(seed)
    diffs: dict[str, float] = {}
    where: dict[str, str] = {}
    for batch in batch_sizes:
        for seq in seq_lens:
            merge_case(diffs, where, lm_case_diffs(model, sess, batch, seq, rng), f"batch {batch}, seq {seq}")
    raise_if_over(diffs, where, atol)
    return diffs


def raise_if_over(diffs: dict[str, float], where: dict[str, str], atol: float) -> None:
    """Raise ExportValidationError listing every figure (and where) when any is over `atol` or NaN."""
    bad = [k for k, d in diffs.items() if not d <= atol]  # `not <=` also catches NaN
    if bad:
        lines = [
            f"  {k}: max abs diff {d:.3e} ({where[k]}){'  <-- over tolerance' if k in bad else ''}"
            for k, d in diffs.items()
        ]
        raise ExportValidationError(
            f"ONNX export does not match PyTorch within atol {atol:g} for {', '.join(bad)}:\n"
            + "\n".join(lines)
        )
