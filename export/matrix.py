"""The export validation matrix: every cell x depth x graph mode x exporter, at several batch sizes x lengths.

    variant = Variant("dynamo", "whole", "gru", 3)
    exported = export_variant(variant, directory)      # one export per variant ...
    diffs = case_diffs(exported, batch=17, seq=33)      # ... checked at every (batch, seq)

Graph modes: "lm" (language model), "streaming" (unidirectional classifier carrying h/c and its pooling
accumulator) and "whole" (bidirectional classifier on padded texts with lengths). Models are tiny, with
random weights; every case draws random tokens and random states (see `validate.lm_case_diffs` and
`classifier_validate.{stream,whole}_case_diffs` for what each case checks: ONNX Runtime against PyTorch,
chunked against whole, padded against alone). Used by tests/export/test_matrix.py (one test per case, so a
failure names it) and bench/export_parity.py (the table, with the worst case per exporter).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np
import onnxruntime as ort
import torch

from rnnserve.export.classifier_export import export_classifier_to_onnx
from rnnserve.export.classifier_validate import stream_case_diffs, whole_case_diffs
from rnnserve.export.onnx_export import EXPORTERS, export_lm_to_onnx
from rnnserve.export.validate import lm_case_diffs
from rnnserve.training.classifier_model import ClassifierArgs, RNNClassifier
from rnnserve.training.model import CELLS, ModelArgs, RNNLanguageModel

MODES: tuple[str, ...] = ("lm", "streaming", "whole")
LAYERS: tuple[int, ...] = (1, 2, 3)
BATCH_SIZES: tuple[int, ...] = (1, 3, 17)
SEQ_LENS: tuple[int, ...] = (1, 5, 33)
ATOL = 1e-4
# Classifiers cycle through the poolings by depth, so each pooling (and its streaming state) is covered
# without tripling the matrix.
POOLING_BY_LAYERS: dict[int, str] = {1: "max", 2: "mean", 3: "last"}

Model: TypeAlias = RNNLanguageModel | RNNClassifier


@dataclass(frozen=True)
class Variant:
    """One exported graph of the matrix."""

    exporter: str  # "torchscript" | "dynamo"
    mode: str  # one of MODES
    cell: str  # one of training.model.CELLS
    layers: int

    @property
    def id(self) -> str:
        return f"{self.exporter}-{self.mode}-{self.cell}-{self.layers}L"


@dataclass
class Exported:
    """A variant's PyTorch model, its exported graph (file, and in ONNX Runtime), the export's seconds."""

    variant: Variant
    model: Model
    path: Path
    session: ort.InferenceSession
    export_seconds: float


def variants(exporters: tuple[str, ...] = EXPORTERS) -> list[Variant]:
    """Every (exporter, mode, cell, layers) of the matrix, in a stable order."""
    return [Variant(e, m, c, n) for e in exporters for m in MODES for c in CELLS for n in LAYERS]


def tiny_model(mode: str, cell: str, layers: int, seed: int = 0) -> Model:
    """A tiny random-weight model of `mode` (eval mode; the dropout it declares must not matter)."""
    torch.manual_seed(seed)
    if mode == "lm":
        args = ModelArgs(cell=cell, vocab_size=13, embedding_size=4, hidden_size=5, num_layers=layers,
                         dropout=0.2)  # fmt: skip
        return RNNLanguageModel(args).eval()
    cargs = ClassifierArgs(cell=cell, vocab_size=13, embedding_size=4, hidden_size=5, num_layers=layers,
                           num_classes=3, bidirectional=mode == "whole", pooling=POOLING_BY_LAYERS[layers],
                           dropout=0.2)  # fmt: skip
    return RNNClassifier(cargs).eval()


def export_variant(variant: Variant, directory: Path, provider: str = "CPUExecutionProvider") -> Exported:
    """Build the variant's tiny model, export it into `directory`, and open it in ONNX Runtime on
    `provider` (CPU by default; raises RuntimeError when another provider asked for does not work)."""
    model = tiny_model(variant.mode, variant.cell, variant.layers)
    path = Path(directory) / f"{variant.id}.onnx"
    start = time.perf_counter()
    if isinstance(model, RNNLanguageModel):
        export_lm_to_onnx(model, path, variant.exporter)
    else:
        export_classifier_to_onnx(model, path, variant.exporter)
    seconds = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # tiny graphs: threads only add overhead (and contend on small CPUs)
    session = ort.InferenceSession(str(path), options, providers=[provider])
    if session.get_providers()[0] != provider:  # ORT falls back to CPU silently
        raise RuntimeError(f"{provider} does not work here (ONNX Runtime uses {session.get_providers()})")
    return Exported(variant, model, path, session, seconds)


def case_diffs(exported: Exported, batch: int, seq: int) -> dict[str, float]:
    """Max abs differences of one (batch, seq) case, by check (output name, `step_vs_chunk.*`,
    `chunked_vs_whole.*`, `stream_vs_forward.probs`, `padded_vs_alone.probs`)."""
    v = exported.variant
    rng = np.random.default_rng(zlib.crc32(f"{v.mode}-{v.cell}-{v.layers}-{batch}-{seq}".encode()))
    model, sess = exported.model, exported.session
    if isinstance(model, RNNLanguageModel):
        return lm_case_diffs(model, sess, batch, seq, rng)
    if v.mode == "whole":
        return whole_case_diffs(model, sess, batch, seq, rng)
    return stream_case_diffs(model, sess, batch, seq, rng)


def check_kind(key: str) -> str:
    """Which column of the matrix table a check belongs to: "vs PyTorch", "chunked" or "padding"."""
    if key.startswith(("step_vs_chunk.", "chunked_vs_whole.")):
        return "chunked"
    if key.startswith("padded_vs_alone."):
        return "padding"
    return "vs PyTorch"  # each output, and stream_vs_forward (the streamed graph vs PyTorch's forward)
