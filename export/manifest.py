"""The bundle manifest: everything the server needs to know about an exported model.

The server trusts only this file and the ONNX graph, never Python objects from training. This module is
torch-free so the server can import it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"

Task = Literal["lm", "classifier"]
TASKS: tuple[str, ...] = ("lm", "classifier")
CELLS: tuple[str, ...] = ("rnn_tanh", "rnn_relu", "lstm", "gru")
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
# file as "step" when that graph carries the extra output).
GRAPH_ROLES: tuple[str, ...] = ("step", "last")


class ManifestError(ValueError):
    """A manifest is missing, malformed, or does not describe its bundle."""


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


@dataclass
class Manifest:
    """Describes one exported model version (written as manifest.json in its bundle)."""

    name: str
    version: str
    task: Task
    cell: str
    num_layers: int
    hidden_size: int
    embedding_size: int
    num_directions: int
    vocab_size: int
    tokenizer_kind: str  # "char" | "word" | "bpe"
    special_tokens: dict[str, int]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    state: list[StateSpec]
    labels: list[str] = field(default_factory=list)  # classifier: class names, index = class id
    pooling: str = ""  # classifier: one of POOLINGS
    classifier_mode: str = ""  # classifier: one of CLASSIFIER_MODES
    model_args: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)  # exporter, opset, validation figures
    # Evaluation beyond the flat `metrics`, e.g. a classifier's per-class figures and confusion matrix.
    evaluation: dict[str, Any] = field(default_factory=dict)
    model_file: str = MODEL_FILE
    tokenizer_file: str = TOKENIZER_FILE
    model_sha256: str = ""
    schema_version: int = SCHEMA_VERSION
    precision: str = "fp32"  # one of PRECISIONS
    # Role (GRAPH_ROLES) -> file in the bundle. Empty (older manifests) means {"step": model_file}.
    graphs: dict[str, str] = field(default_factory=dict)

    def graph_file(self, role: str) -> str | None:
        """The bundle file that plays `role` ("step" is always the model file), or None if there is none."""
        if role == "step":
            return self.graphs.get("step", self.model_file)
        return self.graphs.get(role)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Build and validate a manifest from parsed JSON; raises ManifestError saying what is wrong."""
        if not isinstance(data, dict):
            raise ManifestError("manifest must be a JSON object")
        schema = data.get("schema_version")
        if schema != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema_version {schema!r} is not supported (this rnnserve reads {SCHEMA_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ManifestError(f"manifest has unknown fields {unknown}")
        try:
            kwargs = dict(data)
            kwargs["inputs"] = [TensorSpec(**t) for t in data["inputs"]]
            kwargs["outputs"] = [TensorSpec(**t) for t in data["outputs"]]
            kwargs["state"] = [StateSpec(**s) for s in data["state"]]
            manifest = cls(**kwargs)
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"manifest is malformed: {exc}") from exc
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Check internal consistency; raises ManifestError."""
        if self.task not in TASKS:
            raise ManifestError(f"task {self.task!r} is not one of {TASKS}")
        if self.cell not in CELLS:
            raise ManifestError(f"cell {self.cell!r} is not one of {CELLS}")
        if self.vocab_size < 1 or self.num_layers < 1 or self.hidden_size < 1:
            raise ManifestError("vocab_size, num_layers and hidden_size must be positive")
        for token, idx in self.special_tokens.items():
            if not 0 <= idx < self.vocab_size:
                raise ManifestError(f"special token {token!r} id {idx} is outside the vocabulary")
        for spec in self.state:
            try:
                spec.initial_value  # noqa: B018 - parses
            except ValueError as exc:
                raise ManifestError(
                    f"state {spec.name!r} has initial {spec.initial!r}: not a number"
                ) from exc
        self._validate_variants()
        recurrent = ["h", "c"] if self.cell == "lstm" else ["h"]
        names = [s.name for s in self.state]
        if self.task == "lm" and names != recurrent:
            raise ManifestError(f"a {self.cell} language model must carry state {recurrent}")
        if self.task == "classifier":
            self._validate_classifier(names[: len(recurrent)] == recurrent)

    def _validate_variants(self) -> None:
        if self.precision not in PRECISIONS:
            raise ManifestError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        unknown = sorted(set(self.graphs) - set(GRAPH_ROLES))
        if unknown:
            raise ManifestError(f"graphs has unknown roles {unknown} (known: {GRAPH_ROLES})")
        if self.graphs.get("step", self.model_file) != self.model_file:
            raise ManifestError(f"graphs['step'] must be the model file {self.model_file!r}")
        if "last" in self.graphs and self.task != "lm":
            raise ManifestError("only a language model has a 'last' (last-position logits) graph")

    def _validate_classifier(self, has_recurrent_state: bool) -> None:
        if len(self.labels) < 2:
            raise ManifestError("a classifier needs at least two labels")
        if self.pooling not in POOLINGS:
            raise ManifestError(f"pooling {self.pooling!r} is not one of {POOLINGS}")
        if self.classifier_mode not in CLASSIFIER_MODES:
            raise ManifestError(f"classifier_mode {self.classifier_mode!r} is not one of {CLASSIFIER_MODES}")
        if self.classifier_mode == "streaming" and (self.num_directions != 1 or not has_recurrent_state):
            raise ManifestError("a streaming classifier must be unidirectional and carry its recurrent state")
        if self.classifier_mode == "whole" and self.state:
            raise ManifestError("a whole-sequence classifier carries no state")
        if self.classifier_mode == "whole" and "pad" not in self.special_tokens:
            raise ManifestError("a whole-sequence classifier needs a 'pad' special token (its padding id)")

    @property
    def streams(self) -> bool:
        """Whether sessions can append to this model's state message by message."""
        return self.task == "lm" or self.classifier_mode == "streaming"

    def state_spec(self, name: str) -> StateSpec:
        for spec in self.state:
            if spec.name == name:
                return spec
        raise KeyError(name)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(manifest: Manifest, bundle_dir: Path) -> Path:
    """Validate and write `manifest.json` into bundle_dir (atomically)."""
    manifest.validate()
    path = bundle_dir / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json())
    tmp.replace(path)
    return path


def read_manifest(bundle_dir: Path, *, verify_sha256: bool = True) -> Manifest:
    """Read and validate a bundle's manifest; optionally check the model file's sha256."""
    path = bundle_dir / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    manifest = Manifest.from_dict(data)
    model_path = bundle_dir / manifest.model_file
    if not model_path.is_file():
        raise ManifestError(f"{model_path} named by the manifest does not exist")
    if verify_sha256 and manifest.model_sha256 and sha256_file(model_path) != manifest.model_sha256:
        raise ManifestError(f"{model_path} does not match the sha256 in its manifest (file changed?)")
    for role, file in manifest.graphs.items():
        if not (bundle_dir / file).is_file():
            raise ManifestError(f"{bundle_dir / file} named by the manifest as graph {role!r} does not exist")
    return manifest


def lm_state_specs(cell: str, num_layers: int, hidden_size: int, num_directions: int = 1) -> list[StateSpec]:
    """The state tensors of a recurrent stack: h (and c for LSTM), each [layers*dirs, batch, hidden]."""
    names = ["h", "c"] if cell == "lstm" else ["h"]
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
