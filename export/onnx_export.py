"""Export a trained model to ONNX with its recurrent state as explicit inputs and outputs.

    rnnserve export runs/lm/checkpoint.pt --repo model_repo --name stdlib-char

`export_checkpoint` dispatches on the checkpoint's kind; this module holds the language-model graph and
the shared machinery (exporter call, bundle publishing), `classifier_export` the classifier graphs.
Language model graph: inputs `tokens` int64 (batch, seq), `state_in.h` [and `state_in.c`] float32
(layers, batch, hidden); outputs `logits` float32 (batch, seq, vocab), `state_out.h` [and `state_out.c`].
Batch and seq are dynamic.

Two exporters, both mapping each recurrent layer to the native ONNX LSTM/GRU/RNN op (`--exporter`):
- "torchscript" (the default): `torch.onnx.export(dynamo=False)`, opset 17. Deprecated upstream, but it
  maps nn.RNN/LSTM/GRU (and packed sequences) to the native ops by itself.
- "dynamo": `torch.onnx.export(dynamo=True)`, opset 18, with each layer swapped for a custom op that the
  exporter translates to the native op (`dynamo_ops`); left alone, dynamo would silently fix batch and
  seq to the example's sizes for these modules.
Both pass the same validation matrix (tests/export/test_matrix.py) with the same figures (the native ops
compute the same thing whichever exporter wrote them: bench/export_parity.py). The default stays
"torchscript": it is exact too, exports the user's modules as they are (no substitute recurrent stack to
keep in step with PyTorch) and takes ~0.1 s where dynamo takes ~2-3 s for a small model. "dynamo" is
ready for the day the TorchScript exporter leaves PyTorch (torch is pinned, so that day is chosen).
Every export is checked by `onnx.checker` and validated numerically before the bundle appears.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
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

EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "torchscript"  # why: see the module docstring
OPSETS: dict[str, int] = {"torchscript": 17, "dynamo": 18}
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


def export_lm_to_onnx(model: RNNLanguageModel, path: Path, exporter: str = DEFAULT_EXPORTER) -> Path:
    """Write `model` (put in eval mode) as an ONNX graph at `path` with `exporter`; returns `path`."""
    model.eval()
    path = Path(path)
    ins, outs = io_specs(model)
    tokens = torch.zeros(2, 3, dtype=torch.long)  # (batch, seq); not 1 so no axis is specialised
    state = model.init_state(2, "cpu")
    with recurrent_stack_for(model, exporter):
        return onnx_export_quietly(_StatefulLM(model), (tokens, *state), path, ins, outs, exporter)


@contextlib.contextmanager
def recurrent_stack_for(model: nn.Module, exporter: str) -> Iterator[None]:
    """For the dynamo exporter, swap `model.rnn` for its custom-op twin while exporting (see dynamo_ops)."""
    check_exporter(exporter)
    if exporter != "dynamo":
        yield
        return
    from rnnserve.export.dynamo_ops import recurrent_stack_for_dynamo

    with recurrent_stack_for_dynamo(model):
        yield


def check_exporter(exporter: str) -> None:
    """Raise ValueError naming the choices when `exporter` is not one of EXPORTERS."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter {exporter!r} is not one of {EXPORTERS}")


def export_info(validation: dict[str, Any], exporter: str = DEFAULT_EXPORTER) -> dict[str, Any]:
    """The manifest's `export` record: exporter, opset, library versions and the validation figures."""
    return {
        "exporter": exporter,
        "opset": OPSETS[exporter],
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "validation": {"provider": "CPUExecutionProvider", "atol": VALIDATION_ATOL, **validation},
    }


def onnx_export_quietly(module: nn.Module, args: tuple[Tensor, ...], path: Path, ins: list[TensorSpec],
                        outs: list[TensorSpec], exporter: str = DEFAULT_EXPORTER) -> Path:  # fmt: skip
    """torch.onnx.export with `exporter`, dynamic axes from the specs' names; checked by onnx.checker.

    For "dynamo", `module` must already hold the custom-op recurrent stack (`recurrent_stack_for`).
    """
    check_exporter(exporter)
    module.eval()  # the export wrappers are fresh modules (training mode); eval is what is served
    if exporter == "dynamo":
        _dynamo_export(module, args, path, ins, outs)
    else:
        _torchscript_export(module, args, path, ins, outs)
    onnx.checker.check_model(str(path))
    return path


def _dynamo_export(module: nn.Module, args: tuple[Tensor, ...], path: Path, ins: list[TensorSpec],
                   outs: list[TensorSpec]) -> None:  # fmt: skip
    from rnnserve.export.dynamo_ops import OPSET as DYNAMO_OPSET
    from rnnserve.export.dynamo_ops import TRANSLATIONS

    dims: dict[str, Any] = {}  # one torch.export.Dim per axis name, shared by every input using it
    shapes: list[Any] = [
        {i: dims.setdefault(d, torch.export.Dim(d)) for i, d in enumerate(s.shape) if isinstance(d, str)}
        for s in ins
    ]
    params = list(inspect.signature(module.forward).parameters.values())
    if params[-1].kind is inspect.Parameter.VAR_POSITIONAL:  # forward(tokens, *state): state is one tuple
        shapes = [*shapes[: len(params) - 1], tuple(shapes[len(params) - 1 :])]
    with _quiet_dynamo():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=[s.name for s in ins],
            output_names=[s.name for s in outs],
            dynamic_shapes=tuple(shapes),
            custom_translation_table=TRANSLATIONS,
            opset_version=DYNAMO_OPSET,
            external_data=False,  # one self-contained model file (the manifest's sha256 covers it all)
            verbose=False,
            dynamo=True,
        )


@contextlib.contextmanager
def _quiet_dynamo() -> Iterator[None]:
    """Silence the dynamo exporter's chatter (optional torchvision ops, pytree deprecations, axis renames):
    none of it concerns our graphs, which are validated numerically anyway."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*axis name.*")
            yield
    finally:
        registration.setLevel(level)


def _torchscript_export(module: nn.Module, args: tuple[Tensor, ...], path: Path, ins: list[TensorSpec],
                        outs: list[TensorSpec]) -> None:  # fmt: skip
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
            opset_version=OPSETS["torchscript"],
            dynamo=False,
        )


def _lm_manifest(
    name: str,
    version: str,
    model: RNNLanguageModel,
    ckpt: dict[str, Any],
    diffs: dict[str, float],
    onnx_path: Path,
    exporter: str = DEFAULT_EXPORTER,
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
            },
            exporter,
        ),
        model_sha256=sha256_file(onnx_path),
    )


BundleWriter = Callable[[Path, str], None]  # (temporary bundle dir, version) -> writes the bundle files


def export_checkpoint(
    checkpoint: Path,
    repo: Path,
    name: str,
    version: str | None = None,
    precision: str = "fp32",
    exporter: str = DEFAULT_EXPORTER,
) -> Path:
    """Export, validate and publish `<repo>/<name>/<version>/`; returns the bundle directory.

    Language models and classifiers alike (dispatch on the checkpoint's `kind`; see
    `rnnserve.export.classifier_export` for the classifier graphs). `version=None` takes the next integer
    after the highest numeric version ("1" first). The bundle is assembled in a hidden temporary
    directory beside it and renamed into place, so a half-written bundle never appears; an existing
    version is never overwritten (FileExistsError). `precision` ("fp32", "int8" or "fp16") is that of
    the bundle's graphs (`rnnserve.export.variants`). `exporter` is "torchscript" or "dynamo" (see above).
    """
    checkpoint, repo = Path(checkpoint), Path(repo)
    check_version_name(name)
    check_exporter(exporter)
    writer: BundleWriter
    kind = read_checkpoint_kind(checkpoint)
    if kind == "classifier":
        from rnnserve.export.classifier_export import classifier_bundle_writer

        writer = classifier_bundle_writer(checkpoint, name, precision, exporter)
    elif kind == "dialogue":  # HRED/VHRED: rnnserve.export.dialogue_export
        from rnnserve.export.dialogue_export import dialogue_bundle_writer

        writer = dialogue_bundle_writer(checkpoint, name, precision, exporter)
    else:
        writer = _lm_bundle_writer(checkpoint, name, precision, exporter)
    return publish_bundle(repo, name, version, writer)


def _lm_bundle_writer(
    checkpoint: Path, name: str, precision: str = "fp32", exporter: str = DEFAULT_EXPORTER
) -> BundleWriter:
    from rnnserve.export.variants import finish_lm_graphs

    model, tok, ckpt = load_checkpoint(checkpoint)
    if tok.get_vocab_size() != model.args.vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens but the model {model.args.vocab_size}")

    def write(tmp: Path, version: str) -> None:
        onnx_path = export_lm_to_onnx(model, tmp / MODEL_FILE, exporter)
        diffs = validate_lm_export(
            model, onnx_path, VALIDATION_BATCH_SIZES, VALIDATION_SEQ_LENS, atol=VALIDATION_ATOL
        )
        shutil.copyfile(checkpoint.parent / TRAIN_TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        manifest = _lm_manifest(name, version, model, ckpt, diffs, onnx_path, exporter)
        manifest.special_tokens = special_token_ids(tok)
        finish_lm_graphs(model, tmp, manifest, precision)  # last-position graph, optimised, precision
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
