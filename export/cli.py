"""`rnnserve export CHECKPOINT --repo DIR --name NAME [--version V]` (torch is imported only when run)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "export", help="export a checkpoint to a validated ONNX bundle <repo>/<name>/<version>/"
    )
    p.add_argument(
        "checkpoint", help="checkpoint.pt written by `rnnserve train lm|classifier` (tokenizer.json beside)"
    )
    p.add_argument("--repo", required=True, help="model repository directory")
    p.add_argument("--name", required=True, help="model name (a directory under the repository)")
    p.add_argument("--version", default=None, help="version name (default: next integer)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Export and validate; prints the bundle path and the max abs differences. Returns the exit code."""
    from pathlib import Path

    from rnnserve.export.manifest import read_manifest
    from rnnserve.export.onnx_export import export_checkpoint
    from rnnserve.export.validate import ExportValidationError

    try:
        bundle = export_checkpoint(Path(args.checkpoint), Path(args.repo), args.name, args.version)
    except ExportValidationError as exc:
        print(f"export failed validation: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = read_manifest(bundle)
    print(bundle)
    for name, diff in manifest.export["validation"]["max_abs_diff"].items():
        print(f"  {name}: max abs diff {diff:.2e}")
    return 0
