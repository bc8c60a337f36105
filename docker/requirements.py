"""Print the requirements of rnnserve's base dependencies plus the given extras, one per line.

    python docker/requirements.py serve-cpu > requirements.txt   # or several: train serve-cpu

Images install their dependencies from this before copying the source, so a code change reuses the
dependency layer; pyproject.toml stays the only place dependencies are written.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SELF = re.compile(r"^rnnserve\[([^\]]+)\]$")


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    out: list[str] = list(project["dependencies"])
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r} (pyproject.toml has: {', '.join(sorted(optional))})")
        seen.add(extra)
        for requirement in optional[extra]:
            match = SELF.match(requirement.replace(" ", ""))
            if match:
                todo += match.group(1).split(",")
            elif requirement not in out:
                out.append(requirement)
    return out


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    # In the repository the file is docker/requirements.py; in an image build it sits beside pyproject.toml.
    pyproject = next(p for p in (here / "pyproject.toml", here.parent / "pyproject.toml") if p.is_file())
    print("\n".join(requirements(pyproject, [e for a in sys.argv[1:] for e in a.split(",")])))
