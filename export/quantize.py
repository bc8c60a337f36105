"""Precision variants of an exported graph: int8 dynamic quantisation (CPU) and fp16 weights (GPU).

Both keep the graph's inputs and outputs float32 (tokens int64), so the server feeds every variant the
same tensors and reads the same outputs.

- **int8** (`onnxruntime.quantization.quantize_dynamic`): the weights of LSTM (-> com.microsoft
  `DynamicQuantizeLSTM`) and MatMul (the vocabulary/class projection -> `MatMulInteger`) become int8;
  activations are quantised on the fly per run. ORT has no integer GRU/RNN kernel, so a GRU or vanilla
  RNN keeps fp32 recurrent weights and only its projection is int8. For CPUs: the weights a step reads
  shrink 4x, and ORT's int8 kernels use VNNI where the CPU has it.
- **fp16** (`onnxruntime.transformers.float16.convert_float_to_float16`, `keep_io_types=True`): every
  float initializer and op in fp16, with Casts at the float32 inputs and outputs. For GPUs. On the CPU
  provider ORT runs most of these ops through inserted casts (slow), and creating a CPU session for such
  a graph at ORT_ENABLE_ALL crashed the process (segfault, onnxruntime 1.31.1); at ORT_ENABLE_EXTENDED
  it loads and runs. `session_options` (here) and the server use EXTENDED for fp16 graphs.

Torch-free (onnx and onnxruntime only).
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from rnnserve.export.manifest import PRECISIONS

INT8_OP_TYPES: tuple[str, ...] = ("LSTM", "MatMul")  # recurrent weights (LSTM only in ORT) + projection


def session_options(precision: str) -> ort.SessionOptions:
    """Session options safe for a graph of `precision` on any provider (EXTENDED for fp16, else ALL)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        if precision == "fp16"
        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    so.log_severity_level = 3
    return so


def op_counts(path: Path) -> dict[str, int]:
    """How many nodes of each op type (domain-qualified when not standard) the graph at `path` has."""
    graph = onnx.load(str(path), load_external_data=False).graph
    counts = collections.Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in graph.node)
    return dict(sorted(counts.items()))


def quantize_int8(src: Path, dst: Path, per_channel: bool = False) -> Path:
    """int8 dynamic quantisation of the LSTM and MatMul weights of `src` into `dst` (may equal `src`).

    Signed int8 weights (QInt8): measured faster here than QUInt8 at batch 32 (VNNI) and as accurate.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    tmp = Path(dst).with_name(Path(dst).name + ".int8.tmp")
    # ORT's recommended pre-processing: shape inference, so the quantiser knows every tensor's shape (the
    # graph optimisation it would also run is `optimize_offline`'s, already done on our graphs)
    quant_pre_process(Path(src), tmp, skip_optimization=True)
    quantize_dynamic(
        tmp,
        tmp,
        op_types_to_quantize=list(INT8_OP_TYPES),
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
    )
    tmp.replace(dst)
    return Path(dst)


def convert_fp16(src: Path, dst: Path) -> Path:
    """fp16 weights and compute for `src` into `dst` (may equal `src`), float32 inputs/outputs kept."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    OnnxModel.graph_topological_sort(model.graph, True)  # the converter appends the input Casts last
    onnx.checker.check_model(model)
    tmp = Path(dst).with_name(Path(dst).name + ".fp16.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(dst)
    return Path(dst)


def convert_precision(src: Path, dst: Path, precision: str) -> dict[str, Any]:
    """Write `src` (an fp32 graph) at `precision` into `dst`; returns what changed, for the manifest."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision == "int8":
        quantize_int8(src, dst)
    elif precision == "fp16":
        convert_fp16(src, dst)
    elif Path(src) != Path(dst):
        Path(dst).write_bytes(Path(src).read_bytes())
    counts = op_counts(Path(dst))
    return {
        "precision": precision,
        "quantized_ops": {k: v for k, v in counts.items() if "Quantize" in k or "Integer" in k},
    }
