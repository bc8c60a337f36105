"""The manifest's consistency rules, what `Manifest.validate` checks beyond the typed schema.

The schema (field names and types, `rnnserve.export.schema`) says a manifest is well formed; these rules
say it describes a model the server can run: values within their vocabularies (manifest_specs), graph
inputs and outputs that match the state specs, the graph roles and generation graphs its task may have,
then the rules of each task (lm, classifier, dialogue). The first rule broken raises ManifestError.
Torch-free: the server imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rnnserve.cells import CELLS, cell_spec
from rnnserve.export.manifest_specs import (
    CLASSIFIER_MODES,
    DIALOGUE_PART_ROLES,
    GRAPH_ROLES,
    LOGITS_TASKS,
    POOLINGS,
    PRECISIONS,
    TASKS,
    TURN_ROLES,
    ManifestError,
    StateSpec,
    TensorSpec,
    generate_specs,
)

if TYPE_CHECKING:
    from rnnserve.export.manifest import Manifest


def validate_manifest(m: Manifest) -> None:
    """Check the manifest's internal consistency (`Manifest.validate`); raises ManifestError."""
    if m.task not in TASKS:
        raise ManifestError(f"task {m.task!r} is not one of {TASKS}")
    if m.cell not in CELLS:
        raise ManifestError(f"cell {m.cell!r} is not one of {CELLS}")
    if m.vocab_size < 1 or m.num_layers < 1 or m.hidden_size < 1:
        raise ManifestError("vocab_size, num_layers and hidden_size must be positive")
    for token, idx in m.special_tokens.items():
        if not 0 <= idx < m.vocab_size:
            raise ManifestError(f"special token {token!r} id {idx} is outside the vocabulary")
    for spec in m.state:
        try:
            spec.initial_value  # noqa: B018 - parses
        except ValueError as exc:
            raise ManifestError(f"state {spec.name!r} has initial {spec.initial!r}: not a number") from exc
    _validate_variants(m)
    _validate_io(m)
    recurrent = list(cell_spec(m.cell).state_names)
    names = [s.name for s in m.state]
    if m.task == "lm" and names != recurrent:
        raise ManifestError(f"a {m.cell} language model must carry state {recurrent}")
    if m.task == "classifier":
        _validate_classifier(m, names[: len(recurrent)] == recurrent)
    if m.task == "dialogue":
        _validate_dialogue(m, names, recurrent)


# --- graph inputs and outputs --------------------------------------------------------------------------


def _validate_io(m: Manifest) -> None:
    """The file digest, and the graph inputs/outputs the manifest lists against its state specs."""
    digest = m.model_sha256
    if len(digest) != 64 or set(digest) - set("0123456789abcdef"):
        raise ManifestError(f"model_sha256: must be the model file's sha256 (64 hex digits), got {digest!r}")
    if m.num_directions not in (1, 2):
        raise ManifestError(f"num_directions: must be 1 or 2, got {m.num_directions}")
    first_output = "logits" if m.task in LOGITS_TASKS else "probs"
    if not m.inputs or m.inputs[0].name != "tokens":
        raise ManifestError("inputs: the first graph input must be 'tokens'")
    if not m.outputs or m.outputs[0].name != first_output:
        raise ManifestError(f"outputs: the first graph output of a {m.task} must be {first_output!r}")
    for i, spec in enumerate(m.state):
        _validate_state_io(m, f"state[{i}] ({spec.name!r})", spec)
    extra = {t.name for t in m.inputs[1:]} - {s.input_name for s in m.state} - {"lengths"}
    if extra:
        raise ManifestError(f"inputs: {sorted(extra)} are neither state nor 'lengths'")


def _validate_state_io(m: Manifest, where: str, spec: StateSpec) -> None:
    """One state spec: a -1 batch axis, and a graph input and output of the same shape."""
    if not 0 <= spec.batch_axis < len(spec.shape) or spec.shape[spec.batch_axis] != -1:
        raise ManifestError(f"{where}: batch_axis {spec.batch_axis} must index the -1 in {spec.shape}")
    for name, tensors, kind in (
        (spec.input_name, m.inputs, "inputs"),
        (spec.output_name, m.outputs, "outputs"),
    ):
        tensor = next((t for t in tensors if t.name == name), None)
        if tensor is None:
            raise ManifestError(f"{where}: {name!r} is not among the graph's {kind}")
        if not _state_fits(spec, tensor):
            raise ManifestError(f"{where}: shape {spec.shape} does not match {kind} {name!r} {tensor.shape}")


def _state_fits(spec: StateSpec, tensor: TensorSpec) -> bool:
    """A state's shape (-1 on its batch axis) against a graph tensor's (a named, dynamic axis there)."""
    if len(spec.shape) != len(tensor.shape):
        return False
    return all(
        isinstance(t, str) if i == spec.batch_axis else t == d
        for i, (d, t) in enumerate(zip(spec.shape, tensor.shape, strict=True))
    )


# --- graph roles and generation graphs -----------------------------------------------------------------


def _validate_variants(m: Manifest) -> None:
    """The precision, and which graph roles the task may (or must) have."""
    if m.precision not in PRECISIONS:
        raise ManifestError(f"precision {m.precision!r} is not one of {PRECISIONS}")
    unknown = sorted(set(m.graphs) - set(GRAPH_ROLES))
    if unknown:
        raise ManifestError(f"graphs has unknown roles {unknown} (known: {GRAPH_ROLES})")
    if m.graphs.get("step", m.model_file) != m.model_file:
        raise ManifestError(f"graphs['step'] must be the model file {m.model_file!r}")
    if "last" in m.graphs and m.task not in LOGITS_TASKS:
        raise ManifestError("only a language or dialogue model has a 'last' (last-position logits) graph")
    parts = sorted(set(m.graphs) & {*DIALOGUE_PART_ROLES, *TURN_ROLES})
    if parts and m.task != "dialogue":
        raise ManifestError(f"only a dialogue model has the {parts} graphs")
    missing = [role for role in TURN_ROLES if role not in m.graphs]
    if m.task == "dialogue" and missing:
        raise ManifestError(
            f"a dialogue model needs the {missing} graphs (rows ending a turn; its step graph takes "
            "rows without <eos>): re-export it"
        )
    _validate_generate(m)


def _validate_generate(m: Manifest) -> None:
    """A language model's generation graphs: one file and one K per kind, each on the contract."""
    if not m.generate and "generate" not in m.graphs:
        return
    if m.task != "lm":
        raise ManifestError("only a language model has generation graphs")
    files = [g.file for g in m.generate]
    if m.graphs.get("generate") not in files:
        raise ManifestError(f"graphs['generate'] must name one of the generate[] files {files}")
    kinds = {(g.steps, g.plain) for g in m.generate}
    if len(set(files)) != len(files) or len(kinds) != len(files):
        raise ManifestError(
            "generate[]: each graph needs its own file and its own number of steps (per kind: plain, cut)"
        )
    state_in = [t for t in m.inputs if t.name in {s.input_name for s in m.state}]
    for i, g in enumerate(m.generate):
        if g.steps < 1 or not 0 <= g.top_k_max <= m.vocab_size:
            raise ManifestError(
                f"generate[{i}]: steps >= 1 and 0 <= top_k_max <= vocab_size required (0: a plain graph)"
            )
        ins, outs = generate_specs(state_in, g.steps, plain=g.plain)
        if (g.inputs, g.outputs) != (ins, outs):
            raise ManifestError(f"generate[{i}] ({g.file}): inputs/outputs are not the generation contract")


# --- per task ------------------------------------------------------------------------------------------


def _validate_classifier(m: Manifest, has_recurrent_state: bool) -> None:
    """Labels, pooling and mode; a streaming classifier carries its recurrent state, a whole one none."""
    if len(m.labels) < 2:
        raise ManifestError("a classifier needs at least two labels")
    if m.pooling not in POOLINGS:
        raise ManifestError(f"pooling {m.pooling!r} is not one of {POOLINGS}")
    if m.classifier_mode not in CLASSIFIER_MODES:
        raise ManifestError(f"classifier_mode {m.classifier_mode!r} is not one of {CLASSIFIER_MODES}")
    if m.classifier_mode == "streaming" and (m.num_directions != 1 or not has_recurrent_state):
        raise ManifestError("a streaming classifier must be unidirectional and carry its recurrent state")
    if m.classifier_mode == "whole" and m.state:
        raise ManifestError("a whole-sequence classifier carries no state")
    if m.classifier_mode == "whole" and "pad" not in m.special_tokens:
        raise ManifestError("a whole-sequence classifier needs a 'pad' special token (its padding id)")


def _validate_dialogue(m: Manifest, names: list[str], recurrent: list[str]) -> None:
    """The state in the contract's order (enc.*, ctx.*, dec.*, then z for VHRED) and an "eos" token."""
    expected = [f"{stack}.{n}" for stack in ("enc", "ctx", "dec") for n in recurrent]
    latent = int(m.model_args.get("latent_dim", 0) or 0)
    expected += ["z"] if latent > 0 else []
    if names != expected:
        raise ManifestError(
            f"a {m.cell} dialogue model must carry state {expected} in this order, got {names}"
        )
    if "eos" not in m.special_tokens:
        raise ManifestError("a dialogue model needs an 'eos' special token (its end of turn)")
    if m.num_directions != 1:
        raise ManifestError("a served dialogue model streams: num_directions must be 1")
