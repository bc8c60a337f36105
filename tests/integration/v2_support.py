"""tritonclient in a virtual environment of its own (it pins protobuf < 7, the project needs 7), and a
way to run small client scripts in it against a real server, their answers read back as JSON.

The environment is made once (`python -m venv`, `pip install tritonclient[grpc,http]`) under the user's
cache directory and reused; without PyPI the tests that need it are skipped, except under CI (`CI` set),
where they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

TRITONCLIENT = "tritonclient[grpc,http]>=2.50,<3"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rnnserve-tests"


def triton_python() -> Path:
    """The interpreter of a virtual environment holding tritonclient (made on first use)."""
    venv = _cache_dir() / "tritonclient-venv"
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    if marker.exists() and marker.read_text() == TRITONCLIENT and python.exists():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
        pip = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", TRITONCLIENT],
            capture_output=True,
            text=True,
            timeout=600,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        _unavailable(f"could not make a virtual environment for tritonclient: {exc}")
    if pip.returncode != 0:
        _unavailable(f"pip could not install {TRITONCLIENT}: {pip.stderr[-2000:]}")
    marker.write_text(TRITONCLIENT)
    return python


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def run_client(python: Path, script: str, **args: Any) -> Any:
    """Run `script` (Python, in the tritonclient environment) with `ARGS` (a dict) defined; it prints its
    answer as JSON on its last line of output."""
    prelude = f"import json\nARGS = json.loads({json.dumps(json.dumps(args))})\n"
    done = subprocess.run(
        [str(python), "-c", prelude + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"client script failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])
