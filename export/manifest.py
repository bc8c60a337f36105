"""The bundle manifest: everything the server needs to know about an exported model.

The server trusts only this file and the ONNX graph, never Python objects from training. Torch-free so the
server can import it.

This module owns the document: the `Manifest` dataclass, its schema version, reading it (`from_dict`:
older versions upgraded, newer ones refused) and writing it, and the bundle files it names. Its parts and
vocabulary (TensorSpec, StateSpec, GenerateGraph, TASKS, ..., ManifestError) live in
`rnnserve.export.manifest_specs`, its consistency rules in `rnnserve.export.manifest_rules`; every public
name of manifest_specs is re-exported here, so callers import them all from this module.

The schema is the dataclasses (field names, annotations, defaults; checked by `rnnserve.export.schema`)
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
from typing import Any

from rnnserve.export.manifest_rules import validate_manifest
from rnnserve.export.manifest_specs import (
    CLASSIFIER_MODES,
    DIALOGUE_PART_ROLES,
    GRAPH_ROLES,
    LOGITS_TASKS,
    POOLINGS,
    PRECISIONS,
    TASKS,
    TURN_ROLES,
    GenerateGraph,
    ManifestError,
    NewerSchemaError,
    StateSpec,
    Task,
    TensorSpec,
    generate_specs,
    lm_state_specs,
)

__all__ = [
    "CLASSIFIER_MODES",
    "DIALOGUE_PART_ROLES",
    "GRAPH_ROLES",
    "LOGITS_TASKS",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "POOLINGS",
    "PRECISIONS",
    "SCHEMA_VERSION",
    "TASKS",
    "TOKENIZER_FILE",
    "TURN_ROLES",
    "GenerateGraph",
    "Manifest",
    "ManifestError",
    "NewerSchemaError",
    "StateSpec",
    "Task",
    "TensorSpec",
    "file_problems",
    "generate_specs",
    "lm_state_specs",
    "load_manifest_json",
    "read_manifest",
    "sha256_file",
    "write_manifest",
]

SCHEMA_VERSION = 4
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"


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
        """Check internal consistency (the rules in manifest_rules); raises ManifestError."""
        validate_manifest(self)

    @property
    def streams(self) -> bool:
        """Whether sessions can append to this model's state message by message."""
        return self.task in LOGITS_TASKS or self.classifier_mode == "streaming"

    def state_spec(self, name: str) -> StateSpec:
        for spec in self.state:
            if spec.name == name:
                return spec
        raise KeyError(name)


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a checkpoint's metrics, as the manifest's str -> float `metrics`."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


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
