"""The bundle manifest: everything the server needs to know about an exported model.

The server trusts only this file and the ONNX graph, never Python objects from training. This module is
torch-free so the server can import it.

The schema is the dataclasses below (field names, annotations, defaults; checked by `rnnserve.export.schema`)
plus `Manifest.validate`'s consistency rules. It is checked when a manifest is written and when it is read.
`schema_version` history:
  1  the first release.
  2  adds `precision` and `graphs` (the export/serving contract). A version-1 manifest reads as fp32 with
     only a "step" graph; a manifest newer than SCHEMA_VERSION is refused (NewerSchemaError) rather than
     half understood.
  3  adds `generate` (the K-step generation graphs, `GenerateGraph`: cut graphs, and plain ones with
     top_k_max 0) and the "generate" graph role. A version-1 or -2 manifest reads with no generation
     graph: the server keeps its host sampling path.
  4  adds task "dialogue" (HRED/VHRED, docs/dialogue.md): the LM step interface with the state enc.*,
     ctx.*, dec.* (and z), a "last" graph, the "turn" and "turn_last" graphs (rows ending a turn), and
     the "encoder", "context", "decoder" part graphs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rnnserve.cells import CELLS, cell_spec

SCHEMA_VERSION = 4
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"

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
    # Language models (schema 3): the K-step generation graphs, by (steps, top_k_max). Empty: none (older).
    generate: list[GenerateGraph] = field(default_factory=list)

    def generate_graph(self, steps: int | None = None, *, plain: bool = False) -> GenerateGraph | None:
        """The cut (or with `plain`, the plain) generation graph of `steps` (None: the default,
        graphs["generate"], whatever `plain`), or None."""
        for g in self.generate:
            if steps is None and g.file == self.graphs.get("generate"):
                return g
            if steps is not None and g.steps == steps and g.plain == plain:
                return g
        return None

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
        from rnnserve.export.schema import check_dataclass

        if not isinstance(data, dict):
            raise ManifestError("the manifest must be a JSON object")
        schema = data.get("schema_version")
        if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
            raise ManifestError(f"schema_version: must be a positive integer, got {schema!r}")
        if schema > SCHEMA_VERSION:
            raise NewerSchemaError(
                f"schema_version {schema} is newer than this rnnserve reads ({SCHEMA_VERSION}): "
                "the bundle was exported by a newer rnnserve; upgrade rnnserve to load it"
            )
        data = {**data, "schema_version": SCHEMA_VERSION}  # 1 -> 2: the new fields take their defaults
        problems = check_dataclass(cls, data)
        if problems:
            raise ManifestError(problems)
        kwargs = dict(data)
        kwargs["inputs"] = [TensorSpec(**t) for t in data["inputs"]]
        kwargs["outputs"] = [TensorSpec(**t) for t in data["outputs"]]
        kwargs["state"] = [StateSpec(**s) for s in data["state"]]
        kwargs["generate"] = [
            GenerateGraph(
                **{
                    **g,
                    "inputs": [TensorSpec(**t) for t in g["inputs"]],
                    "outputs": [TensorSpec(**t) for t in g["outputs"]],
                }
            )
            for g in data.get("generate", [])
        ]
        manifest = cls(**kwargs)
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
        self._validate_io()
        recurrent = list(cell_spec(self.cell).state_names)
        names = [s.name for s in self.state]
        if self.task == "lm" and names != recurrent:
            raise ManifestError(f"a {self.cell} language model must carry state {recurrent}")
        if self.task == "classifier":
            self._validate_classifier(names[: len(recurrent)] == recurrent)
        if self.task == "dialogue":
            self._validate_dialogue(names, recurrent)

    def _validate_io(self) -> None:
        """The file digest, and the graph inputs/outputs the manifest lists against its state specs."""
        digest = self.model_sha256
        if len(digest) != 64 or set(digest) - set("0123456789abcdef"):
            raise ManifestError(
                f"model_sha256: must be the model file's sha256 (64 hex digits), got {digest!r}"
            )
        if self.num_directions not in (1, 2):
            raise ManifestError(f"num_directions: must be 1 or 2, got {self.num_directions}")
        first_output = "logits" if self.task in LOGITS_TASKS else "probs"
        if not self.inputs or self.inputs[0].name != "tokens":
            raise ManifestError("inputs: the first graph input must be 'tokens'")
        if not self.outputs or self.outputs[0].name != first_output:
            raise ManifestError(f"outputs: the first graph output of a {self.task} must be {first_output!r}")
        for i, spec in enumerate(self.state):
            self._validate_state_io(f"state[{i}] ({spec.name!r})", spec)
        extra = {t.name for t in self.inputs[1:]} - {s.input_name for s in self.state} - {"lengths"}
        if extra:
            raise ManifestError(f"inputs: {sorted(extra)} are neither state nor 'lengths'")

    def _validate_state_io(self, where: str, spec: StateSpec) -> None:
        """One state spec: a -1 batch axis, and a graph input and output of the same shape."""
        if not 0 <= spec.batch_axis < len(spec.shape) or spec.shape[spec.batch_axis] != -1:
            raise ManifestError(f"{where}: batch_axis {spec.batch_axis} must index the -1 in {spec.shape}")
        for name, tensors, kind in (
            (spec.input_name, self.inputs, "inputs"),
            (spec.output_name, self.outputs, "outputs"),
        ):
            tensor = next((t for t in tensors if t.name == name), None)
            if tensor is None:
                raise ManifestError(f"{where}: {name!r} is not among the graph's {kind}")
            if not _state_fits(spec, tensor):
                raise ManifestError(
                    f"{where}: shape {spec.shape} does not match {kind} {name!r} {tensor.shape}"
                )

    def _validate_variants(self) -> None:
        if self.precision not in PRECISIONS:
            raise ManifestError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        unknown = sorted(set(self.graphs) - set(GRAPH_ROLES))
        if unknown:
            raise ManifestError(f"graphs has unknown roles {unknown} (known: {GRAPH_ROLES})")
        if self.graphs.get("step", self.model_file) != self.model_file:
            raise ManifestError(f"graphs['step'] must be the model file {self.model_file!r}")
        if "last" in self.graphs and self.task not in LOGITS_TASKS:
            raise ManifestError("only a language or dialogue model has a 'last' (last-position logits) graph")
        parts = sorted(set(self.graphs) & {*DIALOGUE_PART_ROLES, *TURN_ROLES})
        if parts and self.task != "dialogue":
            raise ManifestError(f"only a dialogue model has the {parts} graphs")
        missing = [role for role in TURN_ROLES if role not in self.graphs]
        if self.task == "dialogue" and missing:
            raise ManifestError(
                f"a dialogue model needs the {missing} graphs (rows ending a turn; its step graph takes "
                "rows without <eos>): re-export it"
            )
        self._validate_generate()

    def _validate_generate(self) -> None:
        if not self.generate and "generate" not in self.graphs:
            return
        if self.task != "lm":
            raise ManifestError("only a language model has generation graphs")
        files = [g.file for g in self.generate]
        if self.graphs.get("generate") not in files:
            raise ManifestError(f"graphs['generate'] must name one of the generate[] files {files}")
        kinds = {(g.steps, g.plain) for g in self.generate}
        if len(set(files)) != len(files) or len(kinds) != len(files):
            raise ManifestError(
                "generate[]: each graph needs its own file and its own number of steps (per kind: plain, cut)"
            )
        state_in = [t for t in self.inputs if t.name in {s.input_name for s in self.state}]
        for i, g in enumerate(self.generate):
            if g.steps < 1 or not 0 <= g.top_k_max <= self.vocab_size:
                raise ManifestError(
                    f"generate[{i}]: steps >= 1 and 0 <= top_k_max <= vocab_size required (0: a plain graph)"
                )
            ins, outs = generate_specs(state_in, g.steps, plain=g.plain)
            if (g.inputs, g.outputs) != (ins, outs):
                raise ManifestError(
                    f"generate[{i}] ({g.file}): inputs/outputs are not the generation contract"
                )

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

    def _validate_dialogue(self, names: list[str], recurrent: list[str]) -> None:
        """The state in the contract's order (enc.*, ctx.*, dec.*, then z for VHRED) and an "eos" token."""
        expected = [f"{stack}.{n}" for stack in ("enc", "ctx", "dec") for n in recurrent]
        latent = int(self.model_args.get("latent_dim", 0) or 0)
        expected += ["z"] if latent > 0 else []
        if names != expected:
            raise ManifestError(
                f"a {self.cell} dialogue model must carry state {expected} in this order, got {names}"
            )
        if "eos" not in self.special_tokens:
            raise ManifestError("a dialogue model needs an 'eos' special token (its end of turn)")
        if self.num_directions != 1:
            raise ManifestError("a served dialogue model streams: num_directions must be 1")

    @property
    def streams(self) -> bool:
        """Whether sessions can append to this model's state message by message."""
        return self.task in LOGITS_TASKS or self.classifier_mode == "streaming"

    def state_spec(self, name: str) -> StateSpec:
        for spec in self.state:
            if spec.name == name:
                return spec
        raise KeyError(name)


def _state_fits(spec: StateSpec, tensor: TensorSpec) -> bool:
    """A state's shape (-1 on its batch axis) against a graph tensor's (a named, dynamic axis there)."""
    if len(spec.shape) != len(tensor.shape):
        return False
    return all(
        isinstance(t, str) if i == spec.batch_axis else t == d
        for i, (d, t) in enumerate(zip(spec.shape, tensor.shape, strict=True))
    )


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(manifest: Manifest, bundle_dir: Path) -> Path:
    """Validate and write `manifest.json` into bundle_dir (atomically).

    The JSON is validated exactly as a reader will see it (schema and consistency), so a manifest that
    would be refused at load is never written.
    """
    text = manifest.to_json()
    Manifest.from_dict(json.loads(text))
    path = bundle_dir / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def load_manifest_json(bundle_dir: Path) -> Manifest:
    """Read and validate `manifest.json` (schema and consistency), without looking at the other files."""
    path = bundle_dir / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{MANIFEST_FILE} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{MANIFEST_FILE} is not valid JSON: {exc}") from exc
    return Manifest.from_dict(data)


def file_problems(bundle_dir: Path, manifest: Manifest, *, verify_sha256: bool = True) -> list[str]:
    """What is wrong with the files the manifest names: missing ones, and sha256 mismatches (the model
    file's `model_sha256`, and the other graphs' sha256 where the export recorded them)."""
    problems = []
    files = {manifest.model_file: "model file", manifest.tokenizer_file: "tokenizer file"}
    for role, name in manifest.graphs.items():
        files.setdefault(name, f"{role!r} graph")
    for g in manifest.generate:
        files.setdefault(g.file, f"{g.steps}-step {'plain ' if g.plain else ''}generation graph")
    for name, what in files.items():
        if not (bundle_dir / name).is_file():
            problems.append(f"{name} ({what} named by the manifest) is missing")
    if not verify_sha256:
        return problems
    # The export records every graph's sha256 under export.variants.graphs_sha256 (export/variants.py).
    recorded = dict(manifest.export.get("variants", {}).get("graphs_sha256", {}))
    recorded[manifest.model_file] = manifest.model_sha256
    for name, digest in recorded.items():
        if (bundle_dir / name).is_file() and sha256_file(bundle_dir / name) != digest:
            problems.append(
                f"{name} does not match its sha256 in the manifest (the file changed after export)"
            )
    return problems


def read_manifest(bundle_dir: Path, *, verify_sha256: bool = True) -> Manifest:
    """Read and validate a bundle's manifest, check that its files exist and (by default) their sha256.

    Raises ManifestError (NewerSchemaError for a newer schema) listing every problem.
    """
    manifest = load_manifest_json(bundle_dir)
    problems = file_problems(bundle_dir, manifest, verify_sha256=verify_sha256)
    if problems:
        raise ManifestError(problems)
    return manifest


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
