"""What the server and its models look like in V2: the server's name, version and extensions, each model's
input and output tensors (by kind of model) and its Triton ModelConfig (what tritonclient reads).
"""

from __future__ import annotations

from dataclasses import dataclass

from rnnserve.export.manifest import LOGITS_TASKS
from rnnserve.inference import model_config_pb2 as mc
from rnnserve.server.repository import LoadedModel

SERVER_NAME = "rnnserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["classification", "sequence", "model_configuration", "binary_tensor_data"]
PLATFORM = "onnxruntime_onnx"
CONFIG_TYPES = {"INT64": mc.TYPE_INT64, "INT32": mc.TYPE_INT32, "FP32": mc.TYPE_FP32, "BYTES": mc.TYPE_STRING}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]


def is_lm(model: LoadedModel) -> bool:
    """A language model (a dialogue model too: it is served as an LM over its conversation's stream)."""
    return model.manifest.task in LOGITS_TASKS


def tensor_specs(model: LoadedModel) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A model's inputs and outputs as V2 tensors (-1: any size)."""
    m = model.manifest
    if is_lm(model):
        return (
            [
                TensorSpec("INPUT_IDS", "INT64", [1, -1]),
                TensorSpec("TEXT", "BYTES", [1]),
                TensorSpec("MAX_TOKENS", "INT64", [1]),
            ],
            [
                TensorSpec("LOGPROBS", "FP32", [1, m.vocab_size]),
                TensorSpec("TOKEN_IDS", "INT64", [1, -1]),
                TensorSpec("POSITION", "INT64", [1]),
                TensorSpec("TEXT", "BYTES", [1]),
                TensorSpec("TOKEN_LOGPROBS", "FP32", [1, -1]),
            ],
        )
    return (
        [TensorSpec("TEXT", "BYTES", [-1]), TensorSpec("INPUT_IDS", "INT64", [-1, -1])],
        [TensorSpec("PROBS", "FP32", [-1, len(m.labels)]), TensorSpec("LABEL", "BYTES", [-1])],
    )


def model_config_pb(model: LoadedModel) -> mc.ModelConfig:
    """Triton's ModelConfig for a model: enough for tritonclient (and people) to see what it takes."""
    m = model.manifest
    inputs, outputs = tensor_specs(model)
    config = mc.ModelConfig(
        name=m.name,
        platform=PLATFORM,
        backend="rnnserve",
        max_batch_size=0,
        input=[
            mc.ModelInput(name=s.name, data_type=CONFIG_TYPES[s.datatype], dims=s.shape, optional=True)
            for s in inputs
        ],
        output=[
            mc.ModelOutput(name=s.name, data_type=CONFIG_TYPES[s.datatype], dims=s.shape) for s in outputs
        ],
    )
    if m.streams:
        config.sequence_batching.SetInParent()  # sequences map onto sessions
    if is_lm(model):
        config.model_transaction_policy.decoupled = True  # generation: several responses per request
    if m.labels:
        config.parameters["labels"].string_value = ",".join(m.labels)
    config.parameters["task"].string_value = m.task
    return config
