"""Regenerate the Python code for protos/rnnserve/v1/*.proto and protos/rnnserve/inference/*.proto (Triton's
KServe V2 protocol, vendored) and their typed stubs.

    python protos/generate.py          # rewrite the generated files next to the .proto files
    python protos/generate.py --check  # exit 1 if the committed files differ from a fresh generation

The generated code is committed so that a client-only install needs no protoc; the test suite runs
`--check` so it can never drift from the .proto. grpcio-tools and mypy-protobuf are pinned in the
`dev` extra because their output (version headers) is part of what is compared.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
# The packages whose .proto files are compiled: rnnserve.v1 (ours) and rnnserve.inference (Triton's).
PACKAGES = ("v1", "inference")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: Path) -> None:
    """Run protoc (with the mypy-protobuf plugins) over every .proto into out_dir/rnnserve/<package>."""
    out_dir.mkdir(parents=True, exist_ok=True)
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(
        str(p.relative_to(PROTO_ROOT))
        for pkg in PACKAGES
        for p in (PROTO_ROOT / "rnnserve" / pkg).glob("*.proto")
    )
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    # protoc finds the mypy-protobuf plugins on PATH; they live beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(root: Path) -> list[Path]:
    return sorted(
        p
        for pkg in PACKAGES
        if (root / "rnnserve" / pkg).is_dir()
        for p in (root / "rnnserve" / pkg).iterdir()
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if not args.check:
        generate(PROTO_ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = {str(p.relative_to(tmp)): p for p in generated_files(Path(tmp))}
        committed = {str(p.relative_to(PROTO_ROOT)): p for p in generated_files(PROTO_ROOT)}
        stale = sorted(
            name
            for name in fresh.keys() | committed.keys()
            if name not in fresh
            or name not in committed
            or not filecmp.cmp(fresh[name], committed[name], False)
        )
    if stale:
        print(f"generated protobuf code is out of date: {stale}; run `python protos/generate.py`")
        return 1
    print("generated protobuf code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
