"""The graphs a bundle carries beyond the validated fp32 export: last-position logits, optimised, precision.

After the exporter has written `model.onnx` and validated it against PyTorch, `finish_graphs`:
1. keeps a copy of that validated fp32 graph as the reference;
2. for a language model, adds `model_last.onnx`, a graph whose only logits output is `logits_last`
   (batch, vocab), the last position's: prefill of a T-token prompt pays the vocabulary projection once,
   not T times. It is a separate file because ONNX Runtime runs every node of a graph whatever outputs
   are fetched (measured: a graph with both outputs, fetching only `logits_last`, cost as much as the
   full one; see docs/results.md);
3. saves each graph optimised offline at ORT's portable BASIC level (`rnnserve.export.optimize`), then
   converts it to the requested precision (`rnnserve.export.quantize`: fp32, int8 or fp16);
4. checks every graph against the reference on random tokens from random reached states: fp32 graphs
   within the exporter's atol, int8/fp16 within a relative RMS error (the figures go into the manifest);
5. records `precision`, `graphs` and the figures in the manifest.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from rnnserve.cells import cell_spec
from rnnserve.export.manifest import Manifest, TensorSpec, sha256_file
from rnnserve.export.onnx_export import (
    DEFAULT_EXPORTER,
    VALIDATION_ATOL,
    io_specs,
    onnx_export_quietly,
    recurrent_stack_for,
)
from rnnserve.export.optimize import OFFLINE_LEVEL, optimize_offline
from rnnserve.export.quantize import convert_precision, session_options
from rnnserve.export.validate import ExportValidationError, max_abs_diff
from rnnserve.training.model import RNNLanguageModel

LAST_FILE = "model_last.onnx"
LAST_OUTPUT = "logits_last"
CHECK_BATCH_SIZES = (1, 3, 8)
CHECK_SEQ_LENS = (1, 5, 17)
# Largest relative RMS error (rms(variant - fp32) / rms(fp32), per output, worst case) an int8/fp16 graph
# may show. Measured on trained models (docs/results.md): well under these; the bounds catch a broken
# conversion (~1), not the quantisation noise whose accuracy cost the benchmarks report.
RELATIVE_BOUND = {"int8": 0.1, "fp16": 0.02}

Arrays = dict[str, np.ndarray]


class _LastPositionLM(nn.Module):
    """The LM with the vocabulary projection applied to the last position only."""

    def __init__(self, model: RNNLanguageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        x = m.embedding(tokens)  # (batch, seq, emb)
        y, new = m.rnn(x, cell_spec(m.args.cell).torch_state(state))  # y: (batch, seq, hidden)
        logits = m.decoder(m.drop(y[:, -1]))  # (batch, vocab)
        return (logits, *(new if isinstance(new, tuple) else (new,)))


def export_lm_last_to_onnx(model: RNNLanguageModel, path: Path, exporter: str = DEFAULT_EXPORTER) -> Path:
    """Write the last-position graph of `model` at `path`: `logits_last` (batch, vocab) + the new state."""
    model.eval()
    ins, outs = io_specs(model)
    outs = [TensorSpec(LAST_OUTPUT, ["batch", model.args.vocab_size], "float32"), *outs[1:]]
    tokens = torch.zeros(2, 3, dtype=torch.long)  # (batch, seq); not 1 so no axis is specialised
    args = (tokens, *model.init_state(2, "cpu"))
    with recurrent_stack_for(model, exporter):
        return onnx_export_quietly(_LastPositionLM(model), args, Path(path), ins, outs, exporter)


def finish_lm_graphs(model: RNNLanguageModel, bundle: Path, manifest: Manifest, precision: str) -> None:
    """`finish_graphs` for a language model: adds the last-position graph first (same exporter), and the
    K-step generation graphs (built from the validated fp32 step graph: export/generate_bundle.py)."""
    from rnnserve.export import generate_bundle

    export_lm_last_to_onnx(model, bundle / LAST_FILE, str(manifest.export.get("exporter", DEFAULT_EXPORTER)))
    with tempfile.TemporaryDirectory() as work:
        against_torch = generate_bundle.build_and_validate(model, bundle / manifest.model_file, Path(work))
        finish_graphs(bundle, manifest, precision, {"last": LAST_FILE})
        generate_bundle.finish(bundle, manifest, precision, Path(work), against_torch)


def finish_graphs(bundle: Path, manifest: Manifest, precision: str, extra: dict[str, str]) -> None:
    """Optimise and convert every graph in `bundle`, check them against the fp32 model, fill the manifest.

    `bundle` holds the validated fp32 `manifest.model_file` and the fp32 graphs in `extra` (role -> file,
    e.g. {"last": LAST_FILE}). Raises ExportValidationError when a graph is off.
    """
    graphs = {"step": manifest.model_file, **extra}
    converted: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as ref_dir:
        reference = Path(ref_dir) / "reference.onnx"
        shutil.copyfile(bundle / manifest.model_file, reference)
        for file in graphs.values():
            optimize_offline(bundle / file, bundle / file)
            converted = convert_precision(bundle / file, bundle / file, precision)
        diffs, rel = check_graphs(bundle, graphs, reference, manifest, precision)
    manifest.precision = precision
    manifest.graphs = graphs
    manifest.model_sha256 = sha256_file(bundle / manifest.model_file)
    manifest.export["variants"] = {
        "optimization": OFFLINE_LEVEL,
        "quantized_ops": converted["quantized_ops"],  # of the last graph converted; all share the ops
        "graphs_sha256": {f: sha256_file(bundle / f) for f in sorted(set(graphs.values()))},
        "validation": {
            "reference": "the fp32 graph validated against PyTorch, ONNX Runtime CPU",
            "batch_sizes": list(CHECK_BATCH_SIZES),
            "seq_lens": list(CHECK_SEQ_LENS),
            "bound": _bound_text(precision),
            "max_abs_diff": diffs,
            "relative_rms_error": rel,
        },
    }


def _bound_text(precision: str) -> str:
    if precision == "fp32":
        return f"max abs diff <= {VALIDATION_ATOL:g}"
    return (
        f"relative RMS error <= {RELATIVE_BOUND[precision]:g} (rms(variant - fp32) / rms(fp32), per output)"
    )


def random_feeds(manifest: Manifest, reference: ort.InferenceSession, batch: int, seq: int,
                 rng: np.random.Generator) -> Arrays:  # fmt: skip
    """Random tokens (and lengths) for the graph's inputs, from a state reached by a random prefix.

    Running a prefix from the initial state gives realistic states for every kind of state tensor (a
    running max, a count) without knowing what each one means.
    """
    feeds: Arrays = {"tokens": rng.integers(0, manifest.vocab_size, size=(batch, seq), dtype=np.int64)}
    if any(t.name == "lengths" for t in manifest.inputs):
        lengths = rng.integers(1, seq + 1, size=batch, dtype=np.int64)  # (batch,)
        lengths[0] = seq  # the longest fills the padded batch
        feeds["lengths"] = lengths
    if manifest.state:
        initial = {
            s.input_name: np.full(s.shape_for_batch(batch), s.initial_value, np.float32)
            for s in manifest.state
        }
        prefix = rng.integers(0, manifest.vocab_size, size=(batch, 7), dtype=np.int64)
        reached = reference.run([s.output_name for s in manifest.state], {"tokens": prefix, **initial})
        feeds.update({s.input_name: r for s, r in zip(manifest.state, reached, strict=True)})
    return feeds


def _compare(variant: Arrays, ref: Arrays, at: str, diffs: dict[str, float], rel: dict[str, float],
             key: str) -> None:  # fmt: skip
    """Update the max abs difference and the relative RMS error (rms(variant - ref) / rms(ref)) per output."""
    for name, got in variant.items():
        want = ref["logits"][:, -1] if name == LAST_OUTPUT else ref[name]  # (batch, vocab) for the last
        k = f"{key}.{name}"
        diffs[k] = max(diffs.get(k, 0.0), max_abs_diff(got, want, f"{k} at {at}"))
        err = float(np.sqrt(np.mean((got.astype(np.float64) - want) ** 2)))
        norm = float(np.sqrt(np.mean(want.astype(np.float64) ** 2)))
        rel[k] = max(rel.get(k, 0.0), err / norm if norm > 0 else err)


def check_graphs(bundle: Path, graphs: dict[str, str], reference: Path, manifest: Manifest,
                 precision: str, seed: int = 0) -> tuple[dict[str, float], dict[str, float]]:  # fmt: skip
    """(max abs difference, relative RMS error) of every output of every graph (key `<role>.<output>`)
    from the fp32 reference.

    Raises ExportValidationError, listing every figure, when an fp32 graph's max abs difference is over
    the exporter's atol, an int8/fp16 graph's relative RMS error is over `RELATIVE_BOUND`, or on NaN.
    """
    cpu = ["CPUExecutionProvider"]
    ref_sess = ort.InferenceSession(str(reference), session_options("fp32"), providers=cpu)
    ref_names = [o.name for o in ref_sess.get_outputs()]
    sessions = {
        role: ort.InferenceSession(str(bundle / file), session_options(precision), providers=cpu)
        for role, file in graphs.items()
    }
    rng = np.random.default_rng(seed)
    diffs: dict[str, float] = {}
    rel: dict[str, float] = {}
    for batch in CHECK_BATCH_SIZES:
        for seq in CHECK_SEQ_LENS:
            feeds = random_feeds(manifest, ref_sess, batch, seq, rng)
            ref = dict(zip(ref_names, ref_sess.run(ref_names, feeds), strict=True))
            for role, sess in sessions.items():
                names = [o.name for o in sess.get_outputs()]
                got = dict(zip(names, sess.run(names, feeds), strict=True))
                _compare(got, ref, f"batch {batch}, seq {seq}", diffs, rel, role)
    if precision == "fp32":
        measured, bound, what = diffs, VALIDATION_ATOL, "max abs diff"
    else:
        measured, bound, what = rel, RELATIVE_BOUND[precision], "relative RMS error"
    bad = [k for k in diffs if not (measured[k] <= bound and diffs[k] == diffs[k])]  # `d == d`: not NaN
    if bad:
        lines = [f"  {k}: max abs diff {diffs[k]:.3e}, relative RMS error {rel[k]:.3e}" for k in diffs]
        raise ExportValidationError(
            f"the {precision} graphs differ from the validated fp32 graph for {', '.join(bad)} "
            f"({what} over {bound:g}):\n" + "\n".join(lines)
        )
    return diffs, rel
