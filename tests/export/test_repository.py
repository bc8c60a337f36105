"""The model repository: versions side by side (newest served by default, any pinned on request, all
listed, never overwritten), `rnnserve models validate REPO` naming each bundle's problems, and the server
refusing exactly the bad bundles (logged) while serving the others."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import pytest
import torch

from rnnserve.cli import main as rnnserve_main
from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.training.model import ModelArgs, RNNLanguageModel
from rnnserve.training.tokenizer import build_char_tokenizer
from rnnserve.training.train import TrainConfig, save_checkpoint

TEXT = "for x in range(10):\n    print(x)\n"


def _checkpoint(root: Path, seed: int) -> Path:
    """An untrained char-LSTM checkpoint (weights from `seed`) with tokenizer.json beside it."""
    run = root / f"run{seed}"
    run.mkdir(parents=True)
    tok = build_char_tokenizer(TEXT)
    tok.save(str(run / "tokenizer.json"))
    torch.manual_seed(seed)
    model = RNNLanguageModel(ModelArgs(cell="lstm", vocab_size=tok.get_vocab_size(), embedding_size=8,
                                       hidden_size=12, num_layers=2))  # fmt: skip
    save_checkpoint(run / "checkpoint.pt", model, TrainConfig(cell="lstm"), {"val_loss": 2.0 + seed})
    return run / "checkpoint.pt"


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with `m` at versions 1 and 2 (different weights) and `candidate` (never the default)."""
    root = tmp_path_factory.mktemp("versions")
    repo = root / "repo"
    export_checkpoint(_checkpoint(root, 1), repo, "m")
    export_checkpoint(_checkpoint(root, 2), repo, "m")
    export_checkpoint(_checkpoint(root, 3), repo, "m", version="candidate", exporter="dynamo")
    return repo


def test_export_cli_records_the_exporter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, repo = _checkpoint(tmp_path, 5), tmp_path / "repo"
    argv = ["export", str(ckpt), "--repo", str(repo), "--name", "d", "--exporter", "dynamo"]
    assert rnnserve_main(argv) == 0
    assert f"{repo / 'd' / '1'} (dynamo exporter, opset 18)" in capsys.readouterr().out
    export = json.loads((repo / "d" / "1" / "manifest.json").read_text())["export"]
    assert (export["exporter"], export["opset"]) == ("dynamo", 18)
    assert max(export["validation"]["max_abs_diff"].values()) <= 1e-4


def test_export_never_overwrites_a_version(versions: Path, tmp_path: Path) -> None:
    before = (versions / "m" / "2" / "model.onnx").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        export_checkpoint(_checkpoint(tmp_path, 4), versions, "m", version="2")
    assert (versions / "m" / "2" / "model.onnx").read_bytes() == before


@pytest.fixture(scope="module")
def server(versions: Path) -> Iterator[str]:
    from rnnserve.server.app import background_server
    from rnnserve.server.config import ServerConfig

    with background_server(ServerConfig(repo=versions, host="127.0.0.1", port=0)) as srv:
        yield f"127.0.0.1:{srv.port}"


def test_server_lists_all_serves_newest_and_pins(server: str) -> None:
    from rnnserve.client import Client

    with Client(server, timeout=30) as client:
        listed = {(m.name, m.version): m.latest for m in client.models()}
        assert listed == {("m", "1"): False, ("m", "2"): True, ("m", "candidate"): False}
        tops = {}
        for pinned in ("", "1", "2", "candidate"):
            with client.session("m", version=pinned) as session:
                out = session.feed("for x in")
                tops[pinned] = (session.version, [(c.id, round(c.logprob, 5)) for c in out.top])
        assert tops[""] == tops["2"] and tops[""][0] == "2"  # the newest numeric version by default
        assert tops["1"][0] == "1" and tops["1"][1] != tops["2"][1]  # a pinned version is that version
        assert tops["candidate"][0] == "candidate"


def test_models_cli_still_lists_a_servers_models(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert rnnserve_main(["models", "--url", server]) == 0
    out = capsys.readouterr().out
    assert "m@2 (latest): lm lstm 2x12" in out and "m@1:" in out and "m@candidate:" in out


# -- bad bundles: `models validate` and the server refuse them, naming what is wrong -------------------


def _edit_manifest(bundle: Path, edit: Callable[[dict], None]) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _fix_graph_hidden_size(bundle: Path) -> None:
    """Make the manifest consistent with itself but not with its graph (state says hidden 13, graph 12)."""

    def edit(data: dict) -> None:
        for spec in data["state"]:
            spec["shape"][2] = 13
        for t in data["inputs"][1:] + data["outputs"][1:]:
            t["shape"][2] = 13
        for g in data["generate"]:  # the generation graphs' state tensors, consistently
            for t in g["inputs"] + g["outputs"]:
                if t["name"].startswith("state_"):
                    t["shape"][2] = 13

    _edit_manifest(bundle, edit)


def _fix_batch_in_graph(bundle: Path) -> None:
    """Rewrite the graph with its batch axis fixed to 2 (what a careless exporter does), sha256 updated."""
    model = onnx.load(str(bundle / "model.onnx"))
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "batch":
                dim.Clear()
                dim.dim_value = 2
    onnx.save(model, str(bundle / "model.onnx"))
    digest = hashlib.sha256((bundle / "model.onnx").read_bytes()).hexdigest()
    extras = set(json.loads((bundle / "manifest.json").read_text()).get("graphs", {}).values()) - {
        "model.onnx"
    }
    extras |= {g["file"] for g in json.loads((bundle / "manifest.json").read_text()).get("generate", [])}
    _edit_manifest(bundle, lambda d: d.update(model_sha256=digest, graphs={}, generate=[]))
    for extra in extras:
        (bundle / extra).unlink()


BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "no-manifest": (lambda b: (b / "manifest.json").unlink(), "manifest.json is missing"),
    "no-model": (
        lambda b: (b / "model.onnx").unlink(),
        "model.onnx (model file named by the manifest) is missing",
    ),
    "no-tokenizer": (
        lambda b: (b / "tokenizer.json").unlink(),
        "tokenizer.json (tokenizer file named by the manifest) is missing",
    ),
    "bad-sha": (
        lambda b: (b / "model.onnx").write_bytes((b / "model.onnx").read_bytes() + b"\0"),
        "model.onnx does not match its sha256 in the manifest",
    ),
    "schema": (
        lambda b: _edit_manifest(b, lambda d: d.update(num_layers="2")),
        'num_layers: must be an integer, got "2" (a string)',
    ),
    "newer": (
        lambda b: _edit_manifest(b, lambda d: d.update(schema_version=99)),
        "schema_version 99 is newer than this rnnserve reads",
    ),
    "state-vs-graph": (
        _fix_graph_hidden_size,
        "input 'state_in.h' has shape [2, 'batch', 12] in the graph but [2, 'batch', 13] in the manifest",
    ),
    "fixed-batch": (_fix_batch_in_graph, "(axis 1, 'batch', is fixed to 2 in the graph)"),
    "wrong-place": (
        lambda b: _edit_manifest(b, lambda d: d.update(version="7")),
        "the manifest says wrong-place/7 but the bundle lives in wrong-place/1",
    ),
}


@pytest.fixture(scope="module")
def broken_repo(versions: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`good/1` plus one bundle per breakage, each a copy of m/1 broken one way."""
    repo = tmp_path_factory.mktemp("broken") / "repo"
    sources = versions / "m" / "1"
    shutil.copytree(sources, repo / "good" / "1")
    _edit_manifest(repo / "good" / "1", lambda d: d.update(name="good"))
    for name, (breakage, _) in BREAKAGES.items():
        bundle = repo / name / "1"
        shutil.copytree(sources, bundle)
        _edit_manifest(bundle, lambda d, name=name: d.update(name=name))
        breakage(bundle)
    (repo / ".tmp-export").mkdir()  # an export in progress: not a bundle
    return repo


def test_models_validate_names_each_problem(broken_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert rnnserve_main(["models", "validate", str(broken_repo)]) == 1
    out, err = capsys.readouterr()
    assert "good/1: ok (lm lstm 2x12, fp32, torchscript exporter, schema 4)" in out.splitlines()
    for name, (_, message) in BREAKAGES.items():
        block = out.split(f"{name}/1: BAD\n", 1)[1].split("/1:", 1)[0]
        assert message in block, (name, block)
    assert f"{1 + len(BREAKAGES)} bundle(s), {len(BREAKAGES)} bad" in err


def test_models_validate_on_a_good_repository(versions: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert rnnserve_main(["models", "validate", str(versions)]) == 0
    out = capsys.readouterr().out
    assert "m/candidate: ok (lm lstm 2x12, fp32, dynamo exporter, schema 4)" in out
    assert "3 bundle(s), 0 bad" in out
    assert rnnserve_main(["models", "validate", str(versions / "nowhere")]) == 2


def test_server_refuses_exactly_the_bad_bundles(broken_repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    from rnnserve.server.repository import ModelRepository

    with caplog.at_level(logging.ERROR, logger="rnnserve.server.repository"):
        loaded = ModelRepository.load(broken_repo)
    assert [(m.manifest.name, latest) for m, latest in loaded.all()] == [("good", True)]
    refused = {r.getMessage().split("/1:")[0].rsplit("/", 1)[-1]: r.getMessage() for r in caplog.records}
    assert set(refused) == set(BREAKAGES)
    for name, (_, message) in BREAKAGES.items():
        assert message in refused[name], (name, refused[name])
    assert math.isfinite(loaded.get("good").manifest.metrics["val_loss"])
