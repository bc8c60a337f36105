"""Export a trained model to ONNX with its recurrent state as explicit inputs and outputs.

    rnnserve export runs/lm/checkpoint.pt --repo model_repo --name stdlib-char

`export_checkpoint` dispatches on the checkpoint's kind; this module holds the language-model graph and
the shared machinery (exporter call, bundle publishing), `classifier_export` the classifier graphs.
Language model graph: inputs `tokens` int64 (batch, seq), `state_in.h` [and `state_in.c`] float32
(layers, batch, hidden); outputs `logits` float32 (batch, seq, vocab), `state_out.h` [and `state_out.c`].
Batch and seq are dynamic. Uses the TorchScript exporter (`dynamo=False`, opset 17), which maps
nn.RNN/LSTM/GRU to the native ONNX ops (the dynamo exporter fixed batch and seq to the example sizes for
these modules).
Every export is checked by `onnx.checker` and validated numerically before the bundle appears.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch
from torch import Tensor, nn

from rnnserve.export.bundle import check_version_name, next_version
from rnnserve.export.manifest import (
    MODEL_FILE,
    TOKENIZER_FILE,
    Manifest,
    TensorSpec,
    lm_state_specs,
    sha256_file,
    write_manifest,
)
from rnnserve.export.validate import input_names, output_names, validate_lm_export
from rnnserve.training.model import RNNLanguageModel
from rnnserve.training.tokenizer import special_token_ids
from rnnserve.training.train import TOKENIZER_FILE as TRAIN_TOKENIZER_FILE
from rnnserve.training.train import load_checkpoint, read_checkpoint_kind

OPSET = 17
EXPORTER = "torchscript"
VALIDATION_BATCH_SIZES = (1, 3, 8)
VALIDATION_SEQ_LENS = (1, 5, 17)
VALIDATION_ATOL = 1e-4


class _StatefulLM(nn.Module):
    """Flattens the state tuple into positional graph inputs/outputs for the exporter."""

    def __init__(self, model: RNNLanguageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        logits, new = self.model(tokens, tuple(state))
        return (logits, *new)


def io_specs(model: RNNLanguageModel) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's (inputs, outputs) as manifest TensorSpecs, with named dynamic axes."""
    a = model.args
    state_shape: list[int | str] = [a.num_layers, "batch", a.hidden_size]
    ins = [TensorSpec("tokens", ["batch", "seq"], "int64")]
    ins += [TensorSpec(n, state_shape, "float32") for n in input_names(model)[1:]]
    outs = [TensorSpec("logits", ["batch", "seq", a.vocab_size], "float32")]
    outs += [TensorSpec(n, state_shape, "float32") for n in output_names(model)[1:]]
    return ins, outs


def export_lm_to_onnx(model: RNNLanguageModel, path: Path) -> Path:
    """Write `model` (put in eval mode) as an ONNX graph at `path`; returns `path`."""
    model.eval()
    path = Path(path)
    ins, outs = io_specs(model)
    tokens = torch.zeros(2, 3, dtype=torch.long)  # (batch, seq); not 1 so no axis is specialised
    state = model.init_state(2, "cpu")
    return onnx_export_quietly(_StatefulLM(model), (tokens, *state), path, ins, outs)


def export_info(validation: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `export` record: exporter, opset, library versions and the validation figures."""
    return {
        "exporter": EXPORTER,
        "opset": OPSET,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "validation": {"provider": "CPUExecutionProvider", "atol": VALIDATION_ATOL, **validation},
    }


def onnx_export_quietly(module: nn.Module, args: tuple[Tensor, ...], path: Path, ins: list[TensorSpec],
                        outs: list[TensorSpec]) -> Path:  # fmt: skip
    """torch.onnx.export with the TorchScript exporter, opset 17, dynamic axes from the specs' names."""
    dynamic_axes = {
        s.name: {i: str(d) for i, d in enumerate(s.shape) if isinstance(d, str)} for s in ins + outs
    }
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated, warns that batch_first RNNs with a batch other than 1
        # need care, and traces nn.RNNBase's shape checks as constants: all expected here, and every
        # export is validated numerically at several batch sizes and sequence lengths anyway.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=[s.name for s in ins],
            output_names=[s.name for s in outs],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))
    return path


def _lm_manifest(
    name: str,
    version: str,
    model: RNNLanguageModel,
    ckpt: dict[str, Any],
    diffs: dict[str, float],
    onnx_path: Path,
) -> Manifest:
    a = model.args
    ins, outs = io_specs(model)
    return Manifest(
        name=name,
        version=version,
        task="lm",
        cell=a.cell,
        num_layers=a.num_layers,
        hidden_size=a.hidden_size,
        embedding_size=a.embedding_size,
        num_directions=1,
        vocab_size=a.vocab_size,
        tokenizer_kind=str(ckpt.get("tokenizer_kind", "char")),
        special_tokens={},  # filled by the caller from the tokenizer
        inputs=ins,
        outputs=outs,
        state=lm_state_specs(a.cell, a.num_layers, a.hidden_size),
        model_args=dict(ckpt["model_args"]),
        metrics={k: float(v) for k, v in ckpt.get("metrics", {}).items()},
        export=export_info(
            {
                "batch_sizes": list(VALIDATION_BATCH_SIZES),
                "seq_lens": list(VALIDATION_SEQ_LENS),
                "max_abs_diff": diffs,
            }
        ),
        model_sha256=sha256_file(onnx_path),
    )


BundleWriter = Callable[[Path, str], None]  # (temporary bundle dir, version) -> writes the bundle files


def export_checkpoint(checkpoint: Path, repo: Path, name: str, version: str | None = None) -> Path:
    """Export, validate and publish `<repo>/<name>/<version>/`; returns the bundle directory.

    Language models and classifiers alike (dispatch on the checkpoint's `kind`; see
    `rnnserve.export.classifier_export` for the classifier graphs). `version=None` takes the next integer
    after the highest numeric version ("1" first). The bundle is assembled in a hidden temporary
    directory beside it and renamed into place, so a half-written bundle never appears; an existing
    version is never overwritten (FileExistsError).
    """
    checkpoint, repo = Path(checkpoint), Path(repo)
    check_version_name(name)
    writer: BundleWriter
    if read_checkpoint_kind(checkpoint) == "classifier":
        from rnnserve.export.classifier_export import classifier_bundle_writer

        writer = classifier_bundle_writer(checkpoint, name)
    else:
        writer = _lm_bundle_writer(checkpoint, name)
    return publish_bundle(repo, name, version, writer)


def _lm_bundle_writer(checkpoint: Path, name: str) -> BundleWriter:
    model, tok, ckpt = load_checkpoint(checkpoint)
    if tok.get_vocab_size() != model.args.vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens but the model {model.args.vocab_size}")

    def write(tmp: Path, version: str) -> None:
        onnx_path = export_lm_to_onnx(model, tmp / MODEL_FILE)
        diffs = validate_lm_export(
            model, onnx_path, VALIDATION_BATCH_SIZES, VALIDATION_SEQ_LENS, atol=VALIDATION_ATOL
        )
        shutil.copyfile(checkpoint.parent / TRAIN_TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        manifest = _lm_manifest(name, version, model, ckpt, diffs, onnx_path)
        manifest.special_tokens = special_token_ids(tok)
        write_manifest(manifest, tmp)

    return write


def publish_bundle(repo: Path, name: str, version: str | None, write: BundleWriter) -> Path:
    """Run `write` into a hidden temporary directory, then rename it to `<repo>/<name>/<version>`."""
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = version if version is not None else next_version(repo, name)
    check_version_name(version)
    final = model_dir / version
    if final.exists():
        raise FileExistsError(f"{final} already exists; pick another --version")
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))
    try:
        write(tmp, version)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the server may run as another user
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
