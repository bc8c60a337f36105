"""Export parity matrix: ONNX Runtime vs PyTorch for both exporters, every graph mode, cell and depth.

    python bench/export_parity.py                       # both exporters (about 2 minutes on 2 cores)
    python bench/export_parity.py --exporter torchscript
    python bench/export_parity.py --device cuda          # the same graphs on ONNX Runtime's CUDA provider

The matrix of tests/export/test_matrix.py (`rnnserve.export.matrix`): {torchscript, dynamo} x {lm,
streaming, whole} x {rnn_tanh, rnn_relu, lstm, gru} x {1, 2, 3} layers, tiny random-weight models, each
exported once and checked at batch 1/3/17 x seq 1/5/33 on random tokens and random states. One row per
exported graph: the export's seconds and the largest max-abs-difference over its 9 cases for each kind of
check ("vs PyTorch": every output against PyTorch; "chunked": the same tokens fed in pieces, carrying the
state, against fed at once; "padding": a padded batch against each text alone). Then the worst case per
exporter, with where it happened. Prints markdown.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from rnnserve.export.matrix import (
    ATOL,
    BATCH_SIZES,
    SEQ_LENS,
    case_diffs,
    check_kind,
    export_variant,
    variants,
)
from rnnserve.export.onnx_export import EXPORTERS

KINDS = ("vs PyTorch", "chunked", "padding")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exporter", choices=EXPORTERS, action="append", help="default: both")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="ONNX Runtime's provider")
    args = parser.parse_args()
    exporters = tuple(args.exporter or EXPORTERS)
    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[args.device]
    torch.set_num_threads(1)  # tiny models: as the tests run them
    worst: dict[str, tuple[float, str]] = {e: (0.0, "") for e in exporters}
    print("| exporter | graph | cell | layers | export s | vs PyTorch | chunked | padding |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants(exporters):
            exported = export_variant(variant, Path(tmp), provider)
            row = dict.fromkeys(KINDS, float("nan"))
            for batch in BATCH_SIZES:
                for seq in SEQ_LENS:
                    for key, d in case_diffs(exported, batch, seq).items():
                        kind = check_kind(key)
                        row[kind] = d if row[kind] != row[kind] else max(row[kind], d)  # nan = not run yet
                        if d >= worst[variant.exporter][0]:
                            worst[variant.exporter] = (d, f"{variant.id}, batch {batch}, seq {seq}: {key}")
            cells = " | ".join("n/a" if v != v else f"{v:.1e}" for v in row.values())
            print(f"| {variant.exporter} | {variant.mode} | {variant.cell} | {variant.layers} | "
                  f"{exported.export_seconds:.2f} | {cells} |")  # fmt: skip
    print(f"\nONNX Runtime on {provider}; PyTorch on CPU.")
    for exporter, (d, where) in worst.items():
        verdict = "within" if d <= ATOL else "OVER"
        print(f"- worst case, {exporter}: {d:.2e} ({verdict} {ATOL:g}) at {where}")


if __name__ == "__main__":
    main()
