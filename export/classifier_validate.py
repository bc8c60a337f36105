"""Numeric validation of exported classifiers: ONNX Runtime (CPU) against PyTorch (eval mode).

Whole-text graphs (`tokens`, `lengths` -> `probs`): for every (batch, seq) pair, random tokens with random
lengths in [1, seq] whose padding positions hold random *non-pad* tokens (so any leak shows) against
PyTorch; then each text of a padded batch alone (`padded_vs_alone.probs`).

Streaming graphs (`tokens`, `state_in.*` -> `probs`, `state_out.*`): for every (batch, seq) pair, random
tokens and random states against PyTorch's `stream`; and, from the initial state (running max -inf), the
text fed in uneven chunks against the text fed at once (`chunked_vs_whole.<output>`), and the text fed at
once against PyTorch's packed whole-text `forward` (`stream_vs_forward.probs`, what `predict_proba` gives).

Any max abs difference over `atol` raises ExportValidationError naming each output and its difference.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from rnnserve.export.validate import (
    Arrays,
    ExportValidationError,
    max_abs_diff,
    merge_case,
    ort_session,
    raise_if_over,
)
from rnnserve.training.classifier_model import STATE_INITIAL, RNNClassifier, stream_state_shapes

__all__ = [
    "ExportValidationError",
    "stream_case_diffs",
    "stream_input_names",
    "stream_output_names",
    "validate_stream_export",
    "validate_whole_export",
    "whole_case_diffs",
]


def stream_input_names(model: RNNClassifier) -> list[str]:
    """tokens, then state_in.<name> for h, [c], and the pooling accumulator."""
    return ["tokens", *(f"state_in.{n}" for n in model.args.state_names)]


def stream_output_names(model: RNNClassifier) -> list[str]:
    """probs, then state_out.<name> in the same order as the state inputs."""
    return ["probs", *(f"state_out.{n}" for n in model.args.state_names)]


def _random_tokens(model: RNNClassifier, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random ids, never the pad id (so padding filled with them would show if it leaked)."""
    a = model.args
    ids = rng.integers(0, a.vocab_size - 1, size=shape, dtype=np.int64)
    return np.where(ids >= a.pad_id, ids + 1, ids) if a.vocab_size > 1 else ids


# -- whole-text graphs -----------------------------------------------------------------------------------


@torch.no_grad()
def _torch_probs(model: RNNClassifier, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    logits = model(torch.from_numpy(tokens), torch.from_numpy(lengths))
    return torch.softmax(logits, dim=-1).numpy()


def whole_case_diffs(
    model: RNNClassifier, sess: ort.InferenceSession, batch: int, seq: int, rng: np.random.Generator
) -> dict[str, float]:
    """One (batch, seq) case of a whole-text graph: random tokens, random lengths in [1, seq], padding
    filled with random non-pad tokens. `probs` against PyTorch, and `padded_vs_alone.probs`: the padded
    batch against each text run alone (padding must never leak into a result)."""
    tokens = _random_tokens(model, (batch, seq), rng)  # padding is random tokens: must not leak
    lengths = rng.integers(1, seq + 1, size=batch, dtype=np.int64)
    (got,) = sess.run(["probs"], {"tokens": tokens, "lengths": lengths})
    alone = np.concatenate(
        [
            sess.run(["probs"], {"tokens": tokens[b : b + 1, : lengths[b]], "lengths": lengths[b : b + 1]})[0]
            for b in range(batch)
        ]
    )
    at = f"batch {batch}, seq {seq}, lengths {lengths.tolist()}"
    return {
        "probs": max_abs_diff(got, _torch_probs(model, tokens, lengths), f"probs at {at}"),
        "padded_vs_alone.probs": max_abs_diff(got, alone, f"padded_vs_alone.probs at {at}"),
    }


def validate_whole_export(
    model: RNNClassifier,
    onnx_path: Path,
    batch_sizes: Sequence[int] = (1, 3, 8),
    seq_lens: Sequence[int] = (1, 5, 17),
    atol: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Max abs differences of `probs` and `padded_vs_alone.probs`; raises ExportValidationError."""
    model.eval()
    sess = ort_session(onnx_path)
    rng = np.random.default_rng(seed)
    diffs: dict[str, float] = {}
    where: dict[str, str] = {}
    for batch in batch_sizes:
        for seq in seq_lens:
            merge_case(
                diffs, where, whole_case_diffs(model, sess, batch, seq, rng), f"batch {batch}, seq {seq}"
            )
    raise_if_over(diffs, where, atol)
    return diffs


# -- streaming graphs ------------------------------------------------------------------------------------


def _random_state(model: RNNClassifier, batch: int, rng: np.random.Generator) -> Arrays:
    shapes = stream_state_shapes(model.args, batch)
    feeds: Arrays = {}
    for name in model.args.state_names:
        if name == "pool_count":  # tokens already seen: a positive integer
            value = rng.integers(1, 30, size=shapes[name]).astype(np.float32)
        else:  # non-zero so the graph's use of the incoming state is exercised
            value = rng.uniform(-1.0, 1.0, size=shapes[name]).astype(np.float32)
        feeds[f"state_in.{name}"] = value
    return feeds


def initial_state(model: RNNClassifier, batch: int) -> Arrays:
    """A fresh session's state, built from the manifest's `initial` strings as the server does."""
    shapes = stream_state_shapes(model.args, batch)
    return {
        f"state_in.{n}": np.full(shapes[n], 0.0 if STATE_INITIAL[n] == "zeros" else float(STATE_INITIAL[n]),
                                 dtype=np.float32)
        for n in model.args.state_names
    }  # fmt: skip


@torch.no_grad()
def _torch_stream(model: RNNClassifier, feeds: Arrays) -> Arrays:
    names = stream_input_names(model)
    probs, new = model.stream(
        torch.from_numpy(feeds["tokens"]), tuple(torch.from_numpy(feeds[n]) for n in names[1:])
    )
    return dict(zip(stream_output_names(model), [probs.numpy(), *(s.numpy() for s in new)], strict=True))


def _run(sess: ort.InferenceSession, names: list[str], feeds: Arrays) -> Arrays:
    return dict(zip(names, sess.run(names, feeds), strict=True))


def _chunked(sess: ort.InferenceSession, model: RNNClassifier, tokens: np.ndarray, cuts: list[int]) -> Arrays:
    """Feed tokens split at `cuts` from the initial state, carrying the state; the last call's outputs."""
    outs, ins = stream_output_names(model), stream_input_names(model)
    state = initial_state(model, tokens.shape[0])
    result: Arrays = {}
    bounds = [0, *cuts, tokens.shape[1]]
    for lo, hi in itertools.pairwise(bounds):
        result = _run(sess, outs, {"tokens": tokens[:, lo:hi], **state})
        state = {i: result[o] for i, o in zip(ins[1:], outs[1:], strict=True)}
    return result


def stream_case_diffs(
    model: RNNClassifier, sess: ort.InferenceSession, batch: int, seq: int, rng: np.random.Generator
) -> dict[str, float]:
    """One (batch, seq) case of a streaming graph: each output against PyTorch's `stream` from random
    states; from the initial state, the text fed in several uneven splits (incl. one token at a time)
    against fed at once (`chunked_vs_whole.<output>`), and fed at once against PyTorch's packed
    whole-text `forward` (`stream_vs_forward.probs`)."""
    outs = stream_output_names(model)
    feeds = {"tokens": _random_tokens(model, (batch, seq), rng), **_random_state(model, batch, rng)}
    got, want = _run(sess, outs, feeds), _torch_stream(model, feeds)
    diffs = {n: max_abs_diff(got[n], want[n], f"{n} at batch {batch}, seq {seq}") for n in outs}
    tokens = _random_tokens(model, (batch, seq), rng)
    whole = _chunked(sess, model, tokens, [])
    for cuts in ([1], [seq // 2], [1, 2, seq - 1], list(range(1, seq))):
        cuts = sorted({c for c in cuts if 0 < c < seq})
        chunked = _chunked(sess, model, tokens, cuts)
        for name in outs:
            key = f"chunked_vs_whole.{name}"
            diffs[key] = max(
                diffs.get(key, 0.0), max_abs_diff(chunked[name], whole[name], f"{key} cuts {cuts}")
            )
    lengths = np.full(batch, seq, dtype=np.int64)
    key = "stream_vs_forward.probs"
    diffs[key] = max_abs_diff(whole["probs"], _torch_probs(model, tokens, lengths), key)
    return diffs


def validate_stream_export(
    model: RNNClassifier,
    onnx_path: Path,
    batch_sizes: Sequence[int] = (1, 3, 8),
    seq_lens: Sequence[int] = (1, 5, 17),
    atol: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Max abs differences per output, `chunked_vs_whole.<output>` and `stream_vs_forward.probs` over
    every (batch, seq) case; raises ExportValidationError when any is over `atol`."""
    model.eval()
    sess = ort_session(onnx_path)
    rng = np.random.default_rng(seed)
    diffs: dict[str, float] = {}
    where: dict[str, str] = {}
    for batch in batch_sizes:
        for seq in seq_lens:
            merge_case(
                diffs, where, stream_case_diffs(model, sess, batch, seq, rng), f"batch {batch}, seq {seq}"
            )
    raise_if_over(diffs, where, atol)
    return diffs
