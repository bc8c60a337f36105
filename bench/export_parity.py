"""Export parity table: ONNX Runtime vs PyTorch for every cell type at 1 and 2 layers.

    python bench/export_parity.py

Random-weight language models (embedding 32, hidden 64, vocab 100) go through `export_lm_to_onnx` and
`validate_lm_export` (batch 1/3/8 x seq 1/5/17, random states; and step-by-step vs chunk).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from rnnserve.export.onnx_export import export_lm_to_onnx
from rnnserve.export.validate import validate_lm_export
from rnnserve.training.model import CELLS, ModelArgs, RNNLanguageModel


def main() -> None:
    torch.manual_seed(0)
    print("| cell | layers | max abs diff ORT vs PyTorch | step-by-step vs chunk |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for cell in CELLS:
            for layers in (1, 2):
                model = RNNLanguageModel(ModelArgs(cell, 100, 32, 64, layers, dropout=0.0)).eval()
                diffs = validate_lm_export(
                    model, export_lm_to_onnx(model, Path(tmp) / f"{cell}{layers}.onnx")
                )
                outputs = max(v for k, v in diffs.items() if not k.startswith("step_vs_chunk"))
                steps = max(v for k, v in diffs.items() if k.startswith("step_vs_chunk"))
                print(f"| {cell} | {layers} | {outputs:.1e} | {steps:.1e} |")


if __name__ == "__main__":
    main()
