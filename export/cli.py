"""`rnnserve export CHECKPOINT --repo DIR --name NAME [--version V] [--precision P]` (torch only when run)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "export", help="export a checkpoint to a validated ONNX bundle <repo>/<name>/<version>/"
    )
    p.add_argument(
        "checkpoint",
        help="checkpoint.pt written by `rnnserve train lm|classifier|dialogue` (tokenizer.json beside); "
        "a dialogue model (HRED/VHRED) exports its step, last, encoder, context and decoder graphs",
    )
    p.add_argument("--repo", required=True, help="model repository directory")
    p.add_argument("--name", required=True, help="model name (a directory under the repository)")
    p.add_argument("--version", default=None, help="version name (default: next integer; never overwritten)")
    p.add_argument(
        "--exporter",
        choices=["torchscript", "dynamo"],
        default="torchscript",
        help="PyTorch's ONNX exporter (recorded in the manifest): torchscript (default; exact, exports the "
        "modules as they are) or dynamo (the non-deprecated one; each recurrent layer goes through a custom "
        "op translated to the native ONNX op); both are validated the same way",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "int8", "fp16"],
        default="fp32",
        help="weights of the bundle's graphs: fp32; int8 (dynamic quantisation, for CPUs: smaller and "
        "faster, small accuracy cost); fp16 (for GPUs). Inputs/outputs stay float32 (default: fp32)",
    )
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Export and validate; prints the bundle path and the max abs differences. Returns the exit code."""
    from pathlib import Path

    from rnnserve.export.manifest import read_manifest
    from rnnserve.export.onnx_export import export_checkpoint
    from rnnserve.export.validate import ExportValidationError

    try:
        bundle = export_checkpoint(
            Path(args.checkpoint),
            Path(args.repo),
            args.name,
            args.version,
            precision=args.precision,
            exporter=args.exporter,
        )
    except ExportValidationError as exc:
        print(f"export failed validation: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = read_manifest(bundle)
    print(f"{bundle} ({manifest.export['exporter']} exporter, opset {manifest.export['opset']})")
    for name, diff in manifest.export["validation"]["max_abs_diff"].items():
        print(f"  {name}: max abs diff {diff:.2e}")
    variants = manifest.export.get("variants", {}).get("validation", {}).get("max_abs_diff", {})
    for name, diff in variants.items():  # the bundle's graphs (optimised, at --precision) vs the fp32 one
        print(f"  {manifest.precision} {name}: max abs diff {diff:.2e} vs fp32")
    return 0


def register_models_validate(subparsers: argparse._SubParsersAction) -> None:
    """Add `validate REPO` under `rnnserve models` (offline: no server, no torch)."""
    p = subparsers.add_parser(
        "validate",
        help="check every bundle of a model repository offline and say what is wrong with each",
        description="Checks each <repo>/<name>/<version>/ bundle: manifest schema (and schema_version), "
        "files present, sha256, graph inputs/outputs against the manifest's state spec, tokenizer. "
        "Exits 1 if any bundle is bad (the server would refuse it), 2 if the repository is missing.",
    )
    p.add_argument("repo", help="model repository directory")
    p.set_defaults(func=run_models_validate)


def run_models_validate(args: argparse.Namespace) -> int:
    """Print one line per bundle (and its problems); returns 0 if all are good, 1 if any is bad."""
    from pathlib import Path

    from rnnserve.export.bundle_check import check_repository

    try:
        reports = check_repository(Path(args.repo))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for report in reports:
        m = report.manifest
        if report.ok and m is not None:
            exporter = m.export.get("exporter", "?")
            print(f"{report.label}: ok ({m.task} {m.cell} {m.num_layers}x{m.hidden_size}, {m.precision}, "
                  f"{exporter} exporter, schema {m.schema_version})")  # fmt: skip
        else:
            print(f"{report.label}: BAD")
            for problem in report.problems:
                print(f"  - {problem}")
    bad = sum(not r.ok for r in reports)
    if not reports:
        print(f"no bundles under {args.repo} (expected <repo>/<name>/<version>/)", file=sys.stderr)
        return 1
    print(f"{len(reports)} bundle(s), {bad} bad", file=sys.stderr if bad else sys.stdout)
    return 1 if bad else 0
