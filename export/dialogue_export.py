"""Export a dialogue checkpoint (HRED/VHRED, docs/dialogue.md) to a validated bundle.

    rnnserve export runs/chat/checkpoint.pt --repo model_repo --name chat

The bundle `<repo>/<name>/<version>/` has the language-model step interface, so the server runs it as it
runs an LM: `model.onnx` ("step": the stream step over a chunk without `<eos>`, the encoder and the
decoder only), `model_last.onnx` ("last": `logits_last` only), `model_turn.onnx` and
`model_turn_last.onnx` ("turn", "turn_last": the same inputs and outputs for rows whose last token is
`<eos>`, which also run the turn step; the server picks per row), plus the three parts alone, every state
explicit, validated but not served: `encoder.onnx`, `context.onnx`, `decoder.onnx`
(`rnnserve.export.dialogue_graphs` has their inputs and outputs). `tokenizer.json` is the run's, and
`manifest.json` has task "dialogue", the decoder's `hidden_size`, `special_tokens` with "eos" (the end of
turn), the state in the contract's order and the full `DialogueArgs` as `model_args`.

The step and last graphs go through the same finishing as an LM's (`variants.finish_graphs`: optimised,
at the requested precision, checked against the validated fp32 step graph), the turn graphs through the
same against the validated fp32 turn graph; the part graphs stay fp32 as exported. A bidirectional
utterance encoder cannot stream, so no bundle is written for it (`DialogueExportError` says why);
`export_dialogue_parts` still writes its three part graphs.
The TorchScript exporter only: the dynamo path swaps a single `model.rnn` (`dynamo_ops`), and a dialogue
model has three stacks.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from rnnserve.export.dialogue_graphs import (
    PART_FILES,
    TURN_FILES,
    dialogue_state_specs,
    export_dialogue_graph,
    step_specs,
    validate_dialogue_graph,
)
from rnnserve.export.manifest import (
    MODEL_FILE,
    TOKENIZER_FILE,
    Manifest,
    numeric_metrics,
    sha256_file,
    write_manifest,
)
from rnnserve.export.onnx_export import (
    DEFAULT_EXPORTER,
    VALIDATION_ATOL,
    VALIDATION_BATCH_SIZES,
    VALIDATION_SEQ_LENS,
    BundleWriter,
    export_info,
)
from rnnserve.export.variants import LAST_FILE
from rnnserve.training.checkpoint import TOKENIZER_FILE as TRAIN_TOKENIZER_FILE
from rnnserve.training.dialogue_checkpoint import load_dialogue_checkpoint
from rnnserve.training.dialogue_model import DialogueModel
from rnnserve.training.tokenizer import special_token_ids

DIALOGUE_EXPORTER = "torchscript"  # the only one (see the module docstring)
STEP_FILES: dict[str, str] = {"step": MODEL_FILE, "last": LAST_FILE}
SERVED_FILES: dict[str, str] = {**STEP_FILES, **TURN_FILES}  # the graphs the server runs


class DialogueExportError(ValueError):
    """A dialogue model that cannot be exported as asked (e.g. a bidirectional encoder cannot stream)."""


def check_servable(model: DialogueModel) -> None:
    """Raise DialogueExportError when the model cannot have a step graph (a bidirectional encoder)."""
    if model.args.encoder_bidirectional:
        raise DialogueExportError(
            "this dialogue model's utterance encoder is bidirectional: it needs whole turns, but a session "
            "streams tokens one by one, so there is no step graph and the bundle would not be servable. "
            "Train with a unidirectional encoder to serve it; export_dialogue_parts() still writes its "
            "encoder, context and decoder graphs"
        )


def export_and_validate(
    model: DialogueModel,
    out_dir: Path,
    roles: dict[str, str],
    batch_sizes: tuple[int, ...] = VALIDATION_BATCH_SIZES,
    seq_lens: tuple[int, ...] = VALIDATION_SEQ_LENS,
) -> dict[str, float]:
    """Export each graph (role -> file in `out_dir`) and validate it against PyTorch; the max abs
    difference per `<role>.<output>` (raises ExportValidationError when one is over VALIDATION_ATOL)."""
    diffs: dict[str, float] = {}
    for role, file in roles.items():
        path = export_dialogue_graph(model, role, Path(out_dir) / file)
        diffs.update(validate_dialogue_graph(model, role, path, batch_sizes, seq_lens, VALIDATION_ATOL))
    return diffs


def export_dialogue_parts(model: DialogueModel, out_dir: Path) -> dict[str, float]:
    """Write and validate encoder.onnx, context.onnx and decoder.onnx in `out_dir` (any model, a
    bidirectional encoder included); returns the max abs differences."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return export_and_validate(model, Path(out_dir), PART_FILES)


def dialogue_manifest(
    name: str,
    version: str,
    model: DialogueModel,
    ckpt: dict[str, Any],
    special_tokens: dict[str, int],
    diffs: dict[str, float],
    bundle: Path,
) -> Manifest:
    """The manifest of an exported dialogue model (before `finish_graphs` fills precision and graphs)."""
    a = model.args
    ins, outs = step_specs(a)
    metrics = numeric_metrics(ckpt.get("metrics", {}))
    validation = {
        "batch_sizes": list(VALIDATION_BATCH_SIZES),
        "seq_lens": list(VALIDATION_SEQ_LENS),
        "eos_rows": "step, last: no <eos>; turn, turn_last: about half the rows of every case end with "
        "<eos>, the others do not",
        "max_abs_diff": diffs,
    }
    return Manifest(
        name=name,
        version=version,
        task="dialogue",
        cell=a.cell,
        num_layers=a.num_layers,
        hidden_size=a.decoder_hidden,
        embedding_size=a.embedding_size,
        num_directions=1,
        vocab_size=a.vocab_size,
        tokenizer_kind=str(ckpt.get("tokenizer_kind", "char")),
        special_tokens=special_tokens,
        inputs=ins,
        outputs=outs,
        state=dialogue_state_specs(a),
        model_args=dict(ckpt["model_args"]),
        metrics=metrics,
        export=export_info(validation, DIALOGUE_EXPORTER),
        model_sha256=sha256_file(bundle / MODEL_FILE),
    )


def _check_tokenizer(model: DialogueModel, specials: dict[str, int], vocab_size: int) -> None:
    a = model.args
    if vocab_size != a.vocab_size or specials["eos"] != a.eos_id:
        raise DialogueExportError(
            f"the tokenizer ({vocab_size} tokens, <eos> id {specials['eos']}) does not match the model "
            f"({a.vocab_size} tokens, eos_id {a.eos_id})"
        )


def dialogue_bundle_writer(
    checkpoint: Path, name: str, precision: str = "fp32", exporter: str = DEFAULT_EXPORTER
) -> BundleWriter:
    """Load the dialogue checkpoint; the returned writer exports, validates and writes the bundle.

    Raises DialogueExportError (before anything is written) for a bidirectional encoder, another
    exporter than "torchscript", or a tokenizer that does not match the model.
    """
    from rnnserve.export.variants import finish_graphs

    if exporter != DIALOGUE_EXPORTER:
        raise DialogueExportError(
            f"dialogue models export with the {DIALOGUE_EXPORTER!r} exporter only (asked: {exporter!r})"
        )
    checkpoint = Path(checkpoint)
    model, tok, ckpt = load_dialogue_checkpoint(checkpoint)
    check_servable(model)
    specials = special_token_ids(tok)
    _check_tokenizer(model, specials, tok.get_vocab_size())

    def write(tmp: Path, version: str) -> None:
        diffs = export_and_validate(model, tmp, {**SERVED_FILES, **PART_FILES})
        shutil.copyfile(checkpoint.parent / TRAIN_TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        manifest = dialogue_manifest(name, version, model, ckpt, specials, diffs, tmp)
        finish_graphs(tmp, manifest, precision, {"last": LAST_FILE})  # optimised, at `precision`
        finish_turn_graphs(tmp, manifest, precision)
        manifest.graphs.update(PART_FILES)  # fp32 as exported and validated (not served)
        digests = manifest.export["variants"]["graphs_sha256"]
        digests.update({file: sha256_file(tmp / file) for file in PART_FILES.values()})
        write_manifest(manifest, tmp)

    return write


def finish_turn_graphs(bundle: Path, manifest: Manifest, precision: str) -> None:
    """`variants.finish_graphs` for the turn graphs (after it ran for step and last): each optimised, at
    `precision`, checked against the validated fp32 turn graph (not the step graph: they compute another
    function for a row ending in <eos>); adds them to `manifest.graphs` and their figures and digests to
    `export.variants`. Raises ExportValidationError when one is off."""
    from rnnserve.export.optimize import optimize_offline
    from rnnserve.export.quantize import convert_precision
    from rnnserve.export.variants import check_graphs

    with tempfile.TemporaryDirectory() as ref_dir:
        reference = Path(ref_dir) / "turn_reference.onnx"
        shutil.copyfile(bundle / TURN_FILES["turn"], reference)
        for file in TURN_FILES.values():
            optimize_offline(bundle / file, bundle / file)
            convert_precision(bundle / file, bundle / file, precision)
        diffs, rel = check_graphs(bundle, TURN_FILES, reference, manifest, precision)
    manifest.graphs.update(TURN_FILES)
    variants = manifest.export["variants"]
    variants["graphs_sha256"].update({file: sha256_file(bundle / file) for file in TURN_FILES.values()})
    variants["validation"]["max_abs_diff"].update(diffs)
    variants["validation"]["relative_rms_error"].update(rel)


def export_dialogue_checkpoint(
    checkpoint: Path, repo: Path, name: str, version: str | None = None, precision: str = "fp32"
) -> Path:
    """Export, validate and publish `<repo>/<name>/<version>/` (see `onnx_export.export_checkpoint`,
    which dispatches dialogue checkpoints here); returns the bundle directory."""
    from rnnserve.export.bundle import check_version_name
    from rnnserve.export.onnx_export import publish_bundle

    check_version_name(name)
    return publish_bundle(Path(repo), name, version, dialogue_bundle_writer(checkpoint, name, precision))
