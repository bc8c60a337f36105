"""Export a trained classifier to ONNX: a streaming graph (unidirectional) or a whole-text graph (bi).

    rnnserve export runs/sst2-lstm/checkpoint.pt --repo model_repo --name sst2-lstm

**Streaming** (`classifier_mode="streaming"`, every unidirectional model): inputs `tokens` int64
(batch, seq >= 1) and the state `state_in.<name>`; outputs `probs` float32 (batch, classes) — the
softmax for the text so far, after the chunk's last token — and `state_out.<name>`. The state, in order:
`h` [and `c`] float32 (layers, batch, hidden), batch axis 1, initial zeros; then the pooling accumulator,
batch axis 0: max pooling `pool_max` (batch, hidden) initial -inf; mean pooling `pool_sum` (batch, hidden)
and `pool_count` (batch, 1), initial zeros; last pooling nothing. Any split of a text into chunks gives
the same probabilities as the whole text.

**Whole** (`classifier_mode="whole"`, bidirectional models): inputs `tokens` int64 (batch, seq), right-
padded with the `<pad>` id (any id works: padding is never read), and `lengths` int64 (batch,), each in
[1, seq]; output `probs` float32 (batch, classes). The stack runs on packed sequences, which the exporter
maps to the ONNX RNN ops' `sequence_lens`, so a padded batch gives exactly what each text gives alone.

Both are validated against PyTorch before the bundle appears (`classifier_validate`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rnnserve.export.classifier_validate import (
    stream_input_names,
    stream_output_names,
    validate_stream_export,
    validate_whole_export,
)
from rnnserve.export.manifest import (
    MODEL_FILE,
    TOKENIZER_FILE,
    Manifest,
    StateSpec,
    TensorSpec,
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
    onnx_export_quietly,
    recurrent_stack_for,
)
from rnnserve.training.classifier_model import STATE_INITIAL, RNNClassifier
from rnnserve.training.classifier_train import load_classifier_checkpoint
from rnnserve.training.tokenizer import CLASSIFIER_SPECIAL_TOKENS, special_token_ids
from rnnserve.training.train import TOKENIZER_FILE as TRAIN_TOKENIZER_FILE


def classifier_mode(model: RNNClassifier) -> str:
    """ "streaming" for a unidirectional model, "whole" for a bidirectional one."""
    return "whole" if model.args.bidirectional else "streaming"


class _Streaming(nn.Module):
    def __init__(self, model: RNNClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        probs, new = self.model.stream(tokens, tuple(state))
        return (probs, *new)


class _Whole(nn.Module):
    def __init__(self, model: RNNClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        return torch.softmax(self.model(tokens, lengths), dim=-1)


class _WholeUnpacked(nn.Module):
    """`RNNClassifier.forward` without packing (the dynamo exporter cannot trace packed sequences): the
    custom-op stack (`dynamo_ops`) takes the lengths itself, as ONNX `sequence_lens`."""

    def __init__(self, model: RNNClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        m = self.model
        x = m.emb_drop(m.embedding(tokens))  # (batch, seq, emb)
        y, final = m.rnn(x, None, lengths)  # y (batch, seq, dirs * hidden), zeros past each length
        h_n = final[0] if isinstance(final, tuple) else final  # (layers * dirs, batch, hidden)
        return torch.softmax(m.classifier(m.drop(m._pool(y, lengths, h_n))), dim=-1)


def _state_dims(model: RNNClassifier, name: str, batch: int | str) -> list[int | str]:
    a = model.args
    if name in a.recurrent_state_names:
        return [a.num_layers, batch, a.hidden_size]
    return [batch, 1 if name == "pool_count" else a.hidden_size]


def classifier_state_specs(model: RNNClassifier) -> list[StateSpec]:
    """The streaming state as the manifest describes it (empty for a whole-text model)."""
    if model.args.bidirectional:
        return []
    specs = []
    for name in model.args.state_names:
        shape = [int(d) for d in _state_dims(model, name, -1)]
        specs.append(
            StateSpec(
                name=name,
                input_name=f"state_in.{name}",
                output_name=f"state_out.{name}",
                shape=shape,
                batch_axis=shape.index(-1),
                initial=STATE_INITIAL[name],
            )
        )
    return specs


def classifier_io_specs(model: RNNClassifier) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's (inputs, outputs) as manifest TensorSpecs, with named dynamic axes."""
    probs = TensorSpec("probs", ["batch", model.args.num_classes], "float32")
    tokens = TensorSpec("tokens", ["batch", "seq"], "int64")
    if model.args.bidirectional:
        return [tokens, TensorSpec("lengths", ["batch"], "int64")], [probs]
    names = model.args.state_names
    ins = [tokens, *(TensorSpec(i, _state_dims(model, n, "batch"), "float32")
                     for i, n in zip(stream_input_names(model)[1:], names, strict=True))]  # fmt: skip
    outs = [probs, *(TensorSpec(o, _state_dims(model, n, "batch"), "float32")
                     for o, n in zip(stream_output_names(model)[1:], names, strict=True))]  # fmt: skip
    return ins, outs


def export_classifier_to_onnx(model: RNNClassifier, path: Path, exporter: str = DEFAULT_EXPORTER) -> Path:
    """Write `model` (put in eval mode) as its streaming or whole-text ONNX graph at `path`."""
    model.eval()
    path = Path(path)
    ins, outs = classifier_io_specs(model)
    tokens = torch.ones(2, 3, dtype=torch.long)  # (batch, seq); not 1 so no axis is specialised
    with recurrent_stack_for(model, exporter):
        if model.args.bidirectional:
            whole = _WholeUnpacked(model) if exporter == "dynamo" else _Whole(model)
            return onnx_export_quietly(whole, (tokens, torch.tensor([3, 2])), path, ins, outs, exporter)
        state = model.init_stream_state(2, "cpu")
        return onnx_export_quietly(_Streaming(model), (tokens, *state), path, ins, outs, exporter)


def validate_classifier_export(model: RNNClassifier, onnx_path: Path, **kwargs: Any) -> dict[str, float]:
    """Dispatch to `validate_whole_export` or `validate_stream_export`."""
    if model.args.bidirectional:
        return validate_whole_export(model, onnx_path, **kwargs)
    return validate_stream_export(model, onnx_path, **kwargs)


def classifier_manifest(
    name: str,
    version: str,
    model: RNNClassifier,
    ckpt: dict[str, Any],
    special_tokens: dict[str, int],
    diffs: dict[str, float],
    onnx_path: Path,
    exporter: str = DEFAULT_EXPORTER,
) -> Manifest:
    """The manifest of an exported classifier (validation figures and dev evaluation included)."""
    a = model.args
    ins, outs = classifier_io_specs(model)
    metrics = dict(ckpt.get("metrics", {}))
    report = metrics.get("report", {})
    return Manifest(
        name=name,
        version=version,
        task="classifier",
        cell=a.cell,
        num_layers=a.num_layers,
        hidden_size=a.hidden_size,
        embedding_size=a.embedding_size,
        num_directions=a.num_directions,
        vocab_size=a.vocab_size,
        tokenizer_kind=str(ckpt.get("tokenizer_kind", "word")),
        special_tokens=special_tokens,
        inputs=ins,
        outputs=outs,
        state=classifier_state_specs(model),
        labels=list(ckpt["labels"]),
        pooling=a.pooling,
        classifier_mode=classifier_mode(model),
        model_args=dict(ckpt["model_args"]),
        metrics=numeric_metrics(metrics),
        export=export_info(
            {
                "batch_sizes": list(VALIDATION_BATCH_SIZES),
                "seq_lens": list(VALIDATION_SEQ_LENS),
                "max_abs_diff": diffs,
            },
            exporter,
        ),
        evaluation={"dev": report} if report else {},
        model_sha256=sha256_file(onnx_path),
    )


def classifier_bundle_writer(
    checkpoint: Path, name: str, precision: str = "fp32", exporter: str = DEFAULT_EXPORTER
) -> BundleWriter:
    """Load the classifier checkpoint; the returned writer exports, validates and writes the bundle."""
    from rnnserve.export.variants import finish_graphs

    model, tok, ckpt = load_classifier_checkpoint(checkpoint)
    if tok.get_vocab_size() != model.args.vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens but the model {model.args.vocab_size}")
    specials = special_token_ids(tok, CLASSIFIER_SPECIAL_TOKENS)
    if specials["pad"] != model.args.pad_id:
        raise ValueError(
            f"tokenizer's <pad> id {specials['pad']} is not the model's pad_id {model.args.pad_id}"
        )

    def write(tmp: Path, version: str) -> None:
        onnx_path = export_classifier_to_onnx(model, tmp / MODEL_FILE, exporter)
        diffs = validate_classifier_export(
            model, onnx_path, batch_sizes=VALIDATION_BATCH_SIZES, seq_lens=VALIDATION_SEQ_LENS,
            atol=VALIDATION_ATOL,
        )  # fmt: skip
        shutil.copyfile(checkpoint.parent / TRAIN_TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        manifest = classifier_manifest(name, version, model, ckpt, specials, diffs, onnx_path, exporter)
        finish_graphs(tmp, manifest, precision, {})  # optimised, at `precision`
        write_manifest(manifest, tmp)

    return write
