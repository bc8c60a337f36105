"""The generation graphs of a language-model bundle: built, validated, optimised, converted, recorded.

`finish_lm_graphs` (export/variants.py) calls `build_and_validate` on the freshly exported fp32
`model.onnx` (before it is optimised) and `finish` once the bundle's other graphs are final:
1. each K in GENERATE_STEPS: `model_gen_k<K>.onnx` built from the fp32 step graph (generate_graph.py)
   and checked against PyTorch's model + the reference sampler (generate_check.py);
2. rebuilt from the bundle's final step graph (optimised at BASIC, at the bundle's precision; the
   sampler is optimised at BASIC on its own), so it is that step graph K times plus the sampler;
3. checked again, against that step graph + the reference sampler: the bundle's generation graph must
   sample exactly from the logits its precision computes.
   For int8/fp16 the first-id agreement rate with the fp32 generation graph is recorded too (not
   bounded: quantisation moves logits, so near-boundary draws legitimately change; how much that costs
   is the step graph's relative error, already bounded by variants.check_graphs);
4. the manifest gets `generate`, `graphs["generate"]` (DEFAULT_STEPS), the files' sha256 and figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort

from rnnserve.export.generate_check import agreement_rate, check_generate_graph, ort_step, torch_step
from rnnserve.export.generate_graph import (
    TOP_K_MAX,
    build_generate_graph,
    generate_file,
    generate_graph_record,
)
from rnnserve.export.manifest import Manifest, sha256_file
from rnnserve.export.quantize import session_options
from rnnserve.training.model import RNNLanguageModel

# The K exported, and the default (graphs["generate"]): why, in the GenerateGraph docstring (manifest.py).
GENERATE_STEPS: tuple[int, ...] = (1, 8)
DEFAULT_STEPS = 8
VARIANT_ATOL = {"fp32": 1e-4, "int8": 1e-4, "fp16": 1e-3}  # generation graph vs its own step graph


def _session(path: Path, precision: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(precision), providers=["CPUExecutionProvider"])


def build_and_validate(
    model: RNNLanguageModel, step_path: Path, work: Path, steps: tuple[int, ...] = GENERATE_STEPS
) -> dict[str, Any]:
    """Build the fp32 generation graphs of `step_path` into `work`; check each against PyTorch.

    Returns {file: figures}. Raises ExportValidationError on a mismatch.
    """
    a = model.args
    figures = {}
    for k in steps:
        path = build_generate_graph(step_path, work / generate_file(k), k, a.vocab_size, TOP_K_MAX)
        figures[path.name] = {
            "steps": k,
            **check_generate_graph(
                _session(path, "fp32"),
                torch_step(model),
                a.state_names,
                a.vocab_size,
                (a.num_layers, a.hidden_size),
                min(TOP_K_MAX, a.vocab_size),
            ),
        }
    return figures


def finish(
    bundle: Path, manifest: Manifest, precision: str, work: Path, against_torch: dict[str, Any]
) -> None:
    """Copy the validated fp32 generation graphs from `work` into `bundle` at `precision`, check them
    against the bundle's step graph and fill the manifest (see the module docstring)."""
    names = [s.name for s in manifest.state]
    hidden = (manifest.num_layers, manifest.hidden_size)
    kmax = min(TOP_K_MAX, manifest.vocab_size)
    step = ort_step(bundle / manifest.model_file, names, session_options(precision))
    records, figures = [], {}
    for file in against_torch:
        steps = int(against_torch[file]["steps"])
        dst = build_generate_graph(bundle / manifest.model_file, bundle / file, steps, manifest.vocab_size)
        gen = _session(dst, precision)
        fig: dict[str, Any] = {"against_pytorch": against_torch[file]}
        fig["against_step_graph"] = check_generate_graph(
            gen, step, names, manifest.vocab_size, hidden, kmax, atol=VARIANT_ATOL[precision]
        )
        if precision != "fp32":
            ref = _session(work / file, "fp32")
            fig["first_id_agreement_with_fp32"] = agreement_rate(
                gen, ref, names, manifest.vocab_size, hidden, kmax
            )
        figures[file] = fig
        records.append(generate_graph_record(file, steps, manifest.inputs, manifest.vocab_size, TOP_K_MAX))
    records.sort(key=lambda g: g.steps)
    manifest.generate = records
    default = next((g for g in records if g.steps == DEFAULT_STEPS), records[-1])
    manifest.graphs["generate"] = default.file
    variants = manifest.export.setdefault("variants", {})
    variants.setdefault("graphs_sha256", {}).update({f: sha256_file(bundle / f) for f in figures})
    manifest.export["generate"] = {
        "reference": "PyTorch reference sampler (float64, whole vocabulary), teacher-forced, CPU",
        "validation": figures,
    }
