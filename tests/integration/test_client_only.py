"""A client-only install (`pip install rnnserve`), simulated: the `rnnserve` CLI runs in a subprocess
where only the packages of pyproject.toml's base dependencies (and what they require) import; every other
installed package fails to import as it would where it is not installed. Every verb either works (the
client verbs, against a real server) or says which extra to install and exits non-zero, never with a
traceback (issue 12 item 11)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def client_install() -> set[str]:
    """The distributions `pip install rnnserve` brings: pyproject's base dependencies and what they
    require (without extras), as installed here."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        todo = [_requirement_name(r) for r in tomllib.load(f)["project"]["dependencies"]]
    found = {"rnnserve"}
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for req in metadata.requires(name) or []:
            if "extra ==" not in req:
                todo.append(_requirement_name(req))
    return found


def not_in_client_install() -> set[str]:
    """Top-level modules installed here by distributions a client-only install does not have."""
    allowed = client_install()
    return {
        module
        for module, dists in metadata.packages_distributions().items()
        if not any(d.lower().replace("_", "-") in allowed for d in dists)
        and module not in sys.stdlib_module_names
    }


BLOCKER = """
import sys

BLOCKED = set({blocked!r})


class ClientOnlyInstall:
    \"\"\"Import as a client-only install would: the other extras' packages are not there.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, ClientOnlyInstall())
"""


@pytest.fixture(scope="module")
def client_only_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    blocked = sorted(not_in_client_install())
    for module in ("torch", "onnxruntime", "tokenizers", "tqdm", "grpc_reflection", "prometheus_client"):
        assert module in blocked, module  # the simulation is worth something only if these are out
    site = tmp_path_factory.mktemp("client_only_site")
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=blocked))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
    }
    env.pop("RNNSERVE_URL", None)
    return env


def _rnnserve(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rnnserve", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_simulation_blocks_the_extras(client_only_env: dict[str, str]) -> None:
    code = (
        "import sys\n"
        "for m in ('torch', 'onnx', 'onnxruntime', 'tokenizers', 'tqdm', 'grpc_status'):\n"
        "    try:\n"
        "        __import__(m)\n"
        "    except ModuleNotFoundError:\n"
        "        continue\n"
        "    sys.exit(m + ' imported')\n"
        "import grpc, google.protobuf, numpy, grpc_health.v1.health_pb2, rnnserve.client\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=client_only_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["train", "lm", "--out", "run"], "train"),
        (["train", "classifier", "--train", "t.tsv", "--out", "run"], "train"),
        (["sample", "run/checkpoint.pt"], "train"),
        (["export", "run/checkpoint.pt", "--repo", "repo", "--name", "py"], "train"),
        (["serve", "--repo", "repo", "--port", "0"], "serve"),
        (["demo", "--workdir", "demo_out"], "train,serve"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_verbs_of_other_roles_name_the_extra_to_install(
    client_only_env: dict[str, str], tmp_path: Path, argv: list[str], extra: str
) -> None:
    done = _rnnserve(client_only_env, *argv, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"pip install 'rnnserve[{extra}]'" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_models_validate_names_the_serve_extra(client_only_env: dict[str, str], lm_repo: Path) -> None:
    done = _rnnserve(client_only_env, "models", "validate", str(lm_repo))
    assert done.returncode == 2 and "pip install 'rnnserve[serve]'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_data_verbs_need_no_extra(client_only_env: dict[str, str], tmp_path: Path) -> None:
    listed = _rnnserve(client_only_env, "data", "list")
    assert listed.returncode == 0 and "tiny-shakespeare" in listed.stdout, listed.stderr
    # fetch runs (urllib, sha256, no progress bar without tqdm); here its mirror is unreachable.
    fetched = _rnnserve(
        client_only_env, "data", "fetch", "tiny-shakespeare", "--cache-dir", str(tmp_path),
        "--url", "http://127.0.0.1:9/mirror",
    )  # fmt: skip
    assert fetched.returncode == 2 and "error:" in fetched.stderr, fetched.stderr
    assert "Traceback" not in fetched.stderr and "No module named" not in fetched.stderr


def test_client_verbs_work_client_only_against_a_real_server(
    client_only_env: dict[str, str], server_url: str
) -> None:
    health = _rnnserve(client_only_env, "health", "--url", server_url)
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
    models = _rnnserve(client_only_env, "models", "--url", server_url)
    assert models.returncode == 0 and "tiny@1" in models.stdout, models.stderr
    generated = _rnnserve(
        client_only_env, "generate", "--url", server_url, "--model", "tiny", "--prompt", "def ",
        "--max-tokens", "5", "--seed", "1",
    )  # fmt: skip
    assert generated.returncode == 0 and generated.stdout.startswith("def "), generated.stderr
    classified = _rnnserve(client_only_env, "classify", "--url", server_url, "--model", "live", "a fun film")
    assert classified.returncode == 0 and "a fun film" in classified.stdout, classified.stderr
    # The container's health check with an environment, not flags: unreachable is exit 1, no traceback.
    down = _rnnserve({**client_only_env, "RNNSERVE_URL": "127.0.0.1:9"}, "health", "--timeout", "2")
    assert down.returncode == 1 and "Traceback" not in down.stderr
