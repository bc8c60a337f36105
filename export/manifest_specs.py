"""The manifest's vocabulary and parts: the values its fields may take, its errors, and the specs it is
built from (a graph tensor, a state tensor, a K-step generation graph), with the builders that make them.

`rnnserve.export.manifest` assembles these into the `Manifest` document (and re-exports every name here);
`rnnserve.export.manifest_rules` checks a manifest against them. Torch-free: the server imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rnnserve.cells import cell_spec

Task = Literal["lm", "classifier", "dialogue"]
TASKS: tuple[str, ...] = ("lm", "classifier", "dialogue")
POOLINGS: tuple[str, ...] = ("max", "mean", "last")
# How a classifier graph is run:
#   "streaming": tokens[batch, seq] + state -> probs[batch, classes] *so far* + new state; the state holds
#                h (and c) and the pooling accumulator, so a text can arrive in any number of chunks.
#   "whole":     tokens[batch, seq] + lengths[batch] -> probs[batch, classes]; needs the whole text
#                (bidirectional models), exact under padding.
CLASSIFIER_MODES: tuple[str, ...] = ("streaming", "whole")
# The weights' precision. Graph inputs and outputs stay float32 whatever it is, so the server feeds the
# same tensors to every variant.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
# Graph roles in `Manifest.graphs`: "step" = logits for every position (the model file); "last" (language
# models) = logits for the last position only, as output `logits_last` [batch, vocab] (it may be the same
# file as "step" when that graph carries the extra output); "generate" (language models) = the default
# K-step generation graph, one of the files in `Manifest.generate`; "encoder", "context", "decoder"
# (dialogue models) = the three parts alone, every state explicit (docs/dialogue.md; not served);
# "turn", "turn_last" (dialogue models, required) = the step and last graphs' inputs and outputs, for the
# rows whose last token is the end-of-turn token "eos" (the step graphs take rows without it).
GRAPH_ROLES: tuple[str, ...] = (
    "step", "last", "generate", "encoder", "context", "decoder", "turn", "turn_last",
)  # fmt: skip
DIALOGUE_PART_ROLES: tuple[str, ...] = ("encoder", "context", "decoder")
TURN_ROLES: tuple[str, ...] = ("turn", "turn_last")
LOGITS_TASKS: tuple[str, ...] = ("lm", "dialogue")  # next-token models: first output "logits", a "last" graph


class ManifestError(ValueError):
    """A manifest is missing, malformed, or does not describe its bundle.

    `problems` lists each thing wrong in plain words (the message joins them).
    """

    def __init__(self, message: str | list[str]) -> None:
        self.problems = [message] if isinstance(message, str) else list(message)
        super().__init__("; ".join(self.problems))


class NewerSchemaError(ManifestError):
    """The manifest was written by a newer rnnserve (schema_version above SCHEMA_VERSION)."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. `shape` uses names for dynamic axes, e.g. ["batch", "seq"]."""

    name: str
    shape: list[int | str]
    dtype: str


@dataclass(frozen=True)
class StateSpec:
    """One state tensor carried between calls: h, c (LSTM), or a classifier's pooling accumulator.

    `shape` is the full shape with -1 on the batch axis, e.g. [layers * directions, -1, hidden].
    `initial` is "zeros" or a number as a string (e.g. "-inf" for a running max), the value every
    element takes in a fresh session.
    """

    name: str
    input_name: str
    output_name: str
    shape: list[int]
    batch_axis: int
    dtype: str = "float32"
    initial: str = "zeros"

    def shape_for_batch(self, batch: int) -> tuple[int, ...]:
        """The concrete shape of this state for `batch` sessions."""
        return tuple(batch if i == self.batch_axis else d for i, d in enumerate(self.shape))

    @property
    def initial_value(self) -> float:
        return 0.0 if self.initial == "zeros" else float(self.initial)


@dataclass(frozen=True)
class GenerateGraph:
    """One K-step generation graph of a language model (export/generate_graph.py has the contracts).

    K steps unrolled with sampling inside: tokens [batch, 1] (x0, not yet applied) + state + uniforms
    [batch, K] + temperature [batch] (+ top_k/top_p [batch]) -> ids [batch, K], logprobs [batch, K] +
    the state after x0..x_{K-1}. Two kinds, told apart by `top_k_max`:
      top_k_max >= 1, a "cut" graph: inputs top_k and top_p too; it honours top_k up to top_k_max (one
        TopK of that width per step); a row asking for more, or for top_p < 1 with top_k 0 when
        vocab_size > top_k_max, keeps the host path.
      top_k_max == 0, a "plain" graph (`model_gen_plain_k<K>.onnx`): no top_k/top_p inputs; it serves
        only rows without a cut (top_k 0, top_p 1: greedy or any temperature), with no TopK and about
        half the sampler's nodes, so a run whose rows are all plain should take it.
    One graph per (K, kind); `graphs["generate"]` names the default (a cut graph). Why K in (1, 8) for
    the cut graphs, default 8: bench/generate_graph.py (docs/bench/generate_graph.json, a loaded 2-core
    CPU) found no K worth it on the CPU at batch >= 8 (the host's vectorised numpy sampler beats ~70
    small sampler nodes per step, which also pay a TopK and a second exp for every row), ~1.0-1.2x at
    batch 1: a CPU server should keep its host path there. The graph is for the GPU, where the logits
    never leave the device and unrolling pays (DESIGN.md's ceiling: 16 steps vs 1, 1.3x at 64 sessions,
    1.7x at 1); 8 takes most of that while halving the rollback replay of a generation that stops inside
    a block; 1 serves short tails. The plain graphs' K and where they beat the host path on the CPU:
    export/generate_bundle.py (PLAIN_STEPS).
    """

    file: str
    steps: int  # K
    top_k_max: int  # 0: a plain graph (no top_k/top_p inputs, rows without a cut only)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @property
    def plain(self) -> bool:
        """Whether this is a plain graph (rows without a top-k/top-p cut only, no top_k/top_p inputs)."""
        return self.top_k_max == 0


def generate_specs(
    state_inputs: list[TensorSpec], steps: int, *, plain: bool = False
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A K-step generation graph's (inputs, outputs), from the step graph's state inputs (GenerateGraph);
    a plain graph has no top_k/top_p inputs."""
    ins = [
        TensorSpec("tokens", ["batch", 1], "int64"),
        *state_inputs,
        TensorSpec("uniforms", ["batch", steps], "float32"),
        TensorSpec("temperature", ["batch"], "float32"),
    ]
    if not plain:
        ins += [TensorSpec("top_k", ["batch"], "int64"), TensorSpec("top_p", ["batch"], "float32")]
    outs = [TensorSpec("ids", ["batch", steps], "int64"), TensorSpec("logprobs", ["batch", steps], "float32")]
    outs += [TensorSpec(s.name.replace("state_in.", "state_out."), s.shape, s.dtype) for s in state_inputs]
    return ins, outs


def lm_state_specs(cell: str, num_layers: int, hidden_size: int, num_directions: int = 1) -> list[StateSpec]:
    """The state tensors of a recurrent stack: h (and c for LSTM), each [layers*dirs, batch, hidden]."""
    names = cell_spec(cell).state_names
    return [
        StateSpec(
            name=n,
            input_name=f"state_in.{n}",
            output_name=f"state_out.{n}",
            shape=[num_layers * num_directions, -1, hidden_size],
            batch_axis=1,
        )
        for n in names
    ]
