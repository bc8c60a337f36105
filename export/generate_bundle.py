"""The generation graphs of a language-model bundle: built, validated, optimised, converted, recorded.

`finish_lm_graphs` (export/variants.py) calls `build_and_validate` on the freshly exported fp32
`model.onnx` (before it is optimised) and `finish` once the bundle's other graphs are final:
1. each K in GENERATE_STEPS: `model_gen_k<K>.onnx` built from the fp32 step graph (generate_graph.py),
   and each K in PLAIN_STEPS: the plain variant `model_gen_plain_k<K>.onnx` (rows without a top-k/top-p
   cut only), each checked against PyTorch's model + the reference sampler (generate_check.py);
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
    build_plain_generate_graph,
    generate_file,
    generate_graph_record,
)
from rnnserve.export.manifest import Manifest, sha256_file
from rnnserve.export.quantize import session_options
from rnnserve.training.model import RNNLanguageModel

# The K exported, and the default (graphs["generate"]): why, in GenerateGraph's docstring (manifest_specs.py).
GENERATE_STEPS: tuple[int, ...] = (1, 8)
DEFAULT_STEPS = 8
# The plain graphs' K: the cut graphs' K, so a run of any length finds a plain graph of the K it would
# take. Measured (bench/generate_graph.py, docs/bench/generate_graph.json, 1 intra-op thread, 2-core CPU
# at load ~5): plain K4 and K8 are within ~5% of each other everywhere (K4 a little ahead on the demo
# LM, K16 on the design LM at batch 64), all beating the host path (step graph + numpy sampler) at every
# batch: 1.02-1.14x demo fp32, 1.01-1.09x design fp32, 1.06-1.29x int8 (the cut graphs: 0.6-1.07x).
PLAIN_STEPS: tuple[int, ...] = (1, 8)
VARIANT_ATOL = {"fp32": 1e-4, "int8": 1e-4, "fp16": 1e-3}  # generation graph vs its own step graph


def _session(path: Path, precision: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(precision), providers=["CPUExecutionProvider"])


def _build(step_path: Path, dst: Path, steps: int, vocab_size: int, plain: bool) -> Path:
    if plain:
        return build_plain_generate_graph(step_path, dst, steps, vocab_size)
    return build_generate_graph(step_path, dst, steps, vocab_size, TOP_K_MAX)


def build_and_validate(
    model: RNNLanguageModel,
    step_path: Path,
    work: Path,
    steps: tuple[int, ...] = GENERATE_STEPS,
    plain_steps: tuple[int, ...] = PLAIN_STEPS,
) -> dict[str, Any]:
    """Build the fp32 generation graphs (cut: `steps`, plain: `plain_steps`) of `step_path` into `work`;
    check each against PyTorch.

    Returns {file: figures (with "steps" and "plain")}. Raises ExportValidationError on a mismatch.
    """
    a = model.args
    figures = {}
    for k, plain in [(k, False) for k in steps] + [(k, True) for k in plain_steps]:
        path = _build(step_path, work / generate_file(k, plain=plain), k, a.vocab_size, plain)
        figures[path.name] = {
            "steps": k,
            "plain": plain,
            **check_generate_graph(
                _session(path, "fp32"),
                torch_step(model),
                a.state_names,
                a.vocab_size,
                (a.num_layers, a.hidden_size),
                0 if plain else min(TOP_K_MAX, a.vocab_size),
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
        steps, plain = int(against_torch[file]["steps"]), bool(against_torch[file].get("plain", False))
        k_max = 0 if plain else kmax
        dst = _build(bundle / manifest.model_file, bundle / file, steps, manifest.vocab_size, plain)
        gen = _session(dst, precision)
        fig: dict[str, Any] = {"against_pytorch": against_torch[file]}
        fig["against_step_graph"] = check_generate_graph(
            gen, step, names, manifest.vocab_size, hidden, k_max, atol=VARIANT_ATOL[precision]
        )
        if precision != "fp32":
            ref = _session(work / file, "fp32")
            fig["first_id_agreement_with_fp32"] = agreement_rate(
                gen, ref, names, manifest.vocab_size, hidden, k_max
            )
        figures[file] = fig
        records.append(
            generate_graph_record(
                file, steps, manifest.inputs, manifest.vocab_size, 0 if plain else TOP_K_MAX
            )
        )
    # by K, the plain graph before the cut one: a reader that keys graphs by K alone keeps the cut one
    records.sort(key=lambda g: (g.steps, g.top_k_max))
    manifest.generate = records
    cut = [g for g in records if not g.plain]
    default = next((g for g in cut if g.steps == DEFAULT_STEPS), cut[-1])
    manifest.graphs["generate"] = default.file
    variants = manifest.export.setdefault("variants", {})
    variants.setdefault("graphs_sha256", {}).update({f: sha256_file(bundle / f) for f in figures})
    manifest.export["generate"] = {
        "reference": "PyTorch reference sampler (float64, whole vocabulary), teacher-forced, CPU",
        "validation": figures,
    }
