"""Bundle layout helpers: `<repo>/<name>/<version>/{model.onnx, manifest.json, tokenizer.json}`.

Torch-free (the server uses it too). Versions are directory names; numeric ones ("1", "2", ...) order
numerically and are what `next_version` counts. Directories starting with "." are in-progress writes
(a bundle appears only by an atomic rename) and are never versions.
"""

from __future__ import annotations

from pathlib import Path


def list_versions(repo: Path, name: str) -> list[str]:
    """Version directory names of model `name`: numeric ones in numeric order, then others sorted."""
    model_dir = Path(repo) / name
    if not model_dir.is_dir():
        return []
    names = [p.name for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    numeric = sorted((n for n in names if n.isdigit()), key=int)
    return numeric + sorted(n for n in names if not n.isdigit())


def next_version(repo: Path, name: str) -> str:
    """One more than the highest numeric version of `name`, or "1" when there is none."""
    numeric = [int(v) for v in list_versions(repo, name) if v.isdigit()]
    return str(max(numeric, default=0) + 1)


def latest_version(repo: Path, name: str) -> str | None:
    """The highest numeric version of `name` (None when there is none)."""
    numeric = [v for v in list_versions(repo, name) if v.isdigit()]
    return numeric[-1] if numeric else None


def check_version_name(version: str) -> None:
    """Reject names that are not a single safe path component."""
    if not version or version.startswith(".") or "/" in version or "\\" in version:
        raise ValueError(f"version {version!r} must be a plain directory name (e.g. '3')")
