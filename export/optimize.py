"""ONNX Runtime's offline graph optimisation, saved into the bundle at a *portable* level.

ORT rewrites a graph at load time at three levels. BASIC (constant folding, redundant-node removal) runs
before the graph is split between execution providers and emits only standard ONNX ops, so its output
runs on every provider. EXTENDED and ALL fuse nodes into provider-specific contrib ops and layouts: ORT
warns that a graph saved at ALL "should only be used in the same environment the model was optimized
in". A bundle is exported once and served on CPU or CUDA, so it carries the BASIC graph; the server
still applies its own level at load for the provider it really gets (that costs ~no time for these small
graphs, see docs/results.md "Export speed and size" for the measured load and step times).

Torch-free (onnx and onnxruntime only).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

# The level saved into bundles (recorded in the manifest's export record as "optimization").
OFFLINE_LEVEL = "basic"
LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def optimize_offline(src: Path, dst: Path, level: str = OFFLINE_LEVEL) -> Path:
    """Write `src` optimised by ONNX Runtime (CPU) at `level` to `dst` (may equal `src`); returns `dst`.

    Levels above "basic" produce provider-specific graphs: use them for experiments, not bundles.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.log_severity_level = 3  # ALL warns that its output is hardware-specific: we know
    tmp = Path(dst).with_name(Path(dst).name + ".opt.tmp")
    so.optimized_model_filepath = str(tmp)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    if level in ("disabled", "basic"):
        onnx.checker.check_model(str(tmp))  # still a standard ONNX graph
    tmp.replace(dst)
    return Path(dst)
