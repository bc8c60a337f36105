"""Dialogue export (export/dialogue_export.py, export/dialogue_graphs.py): all seven graphs match PyTorch
for every cell, HRED and VHRED; the step graph leaves the context alone, the turn graph handles rows
ending in <eos> beside rows that don't; the bundle and its manifest are what the server loads, and what
cannot be exported (or a manifest without its turn graphs) is refused with the reason."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from dialogue_bundle import make_dialogue_bundle, make_dialogue_checkpoint

from rnnserve.export import cli
from rnnserve.export.bundle_check import check_bundle
from rnnserve.export.dialogue_export import (
    PART_FILES,
    SERVED_FILES,
    DialogueExportError,
    export_and_validate,
    export_dialogue_parts,
)
from rnnserve.export.dialogue_graphs import TURN_FILES, export_dialogue_graph, validate_dialogue_graph
from rnnserve.export.manifest import Manifest, ManifestError, read_manifest
from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.export.validate import ExportValidationError
from rnnserve.training.dialogue_model import DialogueArgs, DialogueModel
from rnnserve.training.model import CELLS

EOS = 1
NATIVE = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}


def _model(cell: str, latent_dim: int = 0, bidirectional: bool = False, seed: int = 5) -> DialogueModel:
    torch.manual_seed(seed)
    args = DialogueArgs(cell=cell, vocab_size=19, embedding_size=6, encoder_hidden=8, context_hidden=10,
                        decoder_hidden=12, num_layers=2, encoder_bidirectional=bidirectional,
                        latent_dim=latent_dim, dropout=0.1, eos_id=EOS)  # fmt: skip
    return DialogueModel(args).eval()


@pytest.mark.parametrize("latent_dim", [0, 2], ids=["hred", "vhred"])
@pytest.mark.parametrize("cell", CELLS)
def test_every_graph_matches_pytorch(cell: str, latent_dim: int, tmp_path: Path) -> None:
    model = _model(cell, latent_dim)
    diffs = export_and_validate(model, tmp_path, {**SERVED_FILES, **PART_FILES}, (1, 4), (1, 6))
    roles = {key.split(".")[0] for key in diffs}
    assert roles == {"step", "last", "turn", "turn_last", "encoder", "context", "decoder", "step_vs_chunk",
                     "turn_vs_chunk"}  # fmt: skip
    assert max(diffs.values()) <= 1e-4
    assert ("context.z_mean" in diffs) == (latent_dim > 0)
    assert ("turn.state_out.z" in diffs) == ("step.state_out.z" in diffs) == (latent_dim > 0)
    recurrent = {}
    for file in {**SERVED_FILES, **PART_FILES}.values():
        nodes = [n.op_type for n in onnx.load(str(tmp_path / file)).graph.node]
        assert NATIVE[cell] in nodes and "Loop" not in nodes  # the native recurrent op, nothing unrolled
        recurrent[file] = nodes.count(NATIVE[cell])
    # the step graphs: the encoder and the decoder (one op per layer each); the turn graphs add the
    # context and the decoder's re-read of <eos>
    assert recurrent["model.onnx"] == recurrent["model_last.onnx"] == 2 * 2
    assert recurrent["model_turn.onnx"] == recurrent["model_turn_last.onnx"] == 4 * 2


def _run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


@torch.no_grad()
def test_turn_graph_on_a_batch_mixing_rows_that_end_a_turn(tmp_path: Path) -> None:
    model = _model("lstm", latent_dim=2)
    path = export_dialogue_graph(model, "turn", tmp_path / "model_turn.onnx")
    state = tuple(torch.rand_like(s) - 0.5 for s in model.init_state(4))
    tokens = torch.tensor([[4, 5, 6, EOS], [4, 5, 6, 7], [9, 2, 3, EOS], [EOS, 3, 3, 3]])
    tokens[3] = torch.tensor([3, 3, 3, 3])  # rows 0 and 2 end a turn, rows 1 and 3 do not
    names = model.args.state_names
    feeds = {f"state_in.{n}": s.numpy() for n, s in zip(names, state, strict=True)}
    feeds["tokens"] = tokens.numpy()
    got = _run(path, feeds)
    logits, new = model.stream(tokens, state)  # the reference, token by token
    np.testing.assert_allclose(got["logits"], logits.numpy(), atol=1e-5)
    for name, want in zip(names, new, strict=True):
        np.testing.assert_allclose(got[f"state_out.{name}"], want.numpy(), atol=1e-5)
    ctx_in, ctx_out = feeds["state_in.ctx.h"], got["state_out.ctx.h"]
    np.testing.assert_array_equal(ctx_out[:, [1, 3]], ctx_in[:, [1, 3]])  # no <eos>: context untouched
    assert not np.allclose(ctx_out[:, [0, 2]], ctx_in[:, [0, 2]])
    assert not got["state_out.enc.h"][:, [0, 2]].any()  # the encoder restarts after the turn


@pytest.mark.parametrize("latent_dim", [0, 2], ids=["hred", "vhred"])
@torch.no_grad()
def test_step_graph_passes_the_context_through(latent_dim: int, tmp_path: Path) -> None:
    model = _model("gru", latent_dim=latent_dim)
    path = export_dialogue_graph(model, "step", tmp_path / "model.onnx")
    state = tuple(torch.rand_like(s) - 0.5 for s in model.init_state(3))
    tokens = torch.tensor([[4, 5, 6], [7, 8, 9], [2, 3, 3]])  # no <eos>: within a turn
    names = model.args.state_names
    feeds = {f"state_in.{n}": s.numpy() for n, s in zip(names, state, strict=True)}
    got = _run(path, {"tokens": tokens.numpy(), **feeds})
    logits, new = model.stream(tokens, state)
    np.testing.assert_allclose(got["logits"], logits.numpy(), atol=1e-5)
    for name, want in zip(names, new, strict=True):
        np.testing.assert_allclose(got[f"state_out.{name}"], want.numpy(), atol=1e-5)
    for name in {"ctx.h", "z"} & set(names):  # exactly as they came in
        np.testing.assert_array_equal(got[f"state_out.{name}"], feeds[f"state_in.{name}"])


def test_bundle_manifest_is_what_the_server_loads(tmp_path: Path) -> None:
    bundle = make_dialogue_bundle(tmp_path / "repo", name="chat", cell="gru", seed=1, latent_dim=3)
    assert bundle == tmp_path / "repo" / "chat" / "1"
    manifest = read_manifest(bundle)  # schema, consistency, files, sha256
    assert Manifest.from_dict(json.loads((bundle / "manifest.json").read_text())) == manifest
    assert manifest.task == "dialogue" and manifest.streams and manifest.schema_version == 4
    assert [s.name for s in manifest.state] == ["enc.h", "ctx.h", "dec.h", "z"]
    assert [s.shape for s in manifest.state] == [[2, -1, 12], [2, -1, 10], [2, -1, 16], [-1, 3]]
    assert manifest.special_tokens["eos"] == manifest.model_args["eos_id"] == EOS
    assert manifest.hidden_size == manifest.model_args["decoder_hidden"] == 16
    assert manifest.graphs == {"step": "model.onnx", "last": "model_last.onnx", **TURN_FILES, **PART_FILES}
    assert not manifest.generate
    figures = manifest.export["validation"]["max_abs_diff"]
    assert {"step.logits", "last.logits_last", "turn.logits", "turn_last.logits_last", "encoder.turn_vector",
            "context.z_mean", "decoder.dec_init.h", "step_vs_chunk.state_out.z", "turn_vs_chunk.state_out.z"
            } <= set(figures) and max(figures.values()) <= 1e-4  # fmt: skip
    finished = manifest.export["variants"]  # the optimised graphs against the fp32 ones
    assert {"step.logits", "last.logits_last", "turn.logits", "turn_last.logits_last"} <= set(
        finished["validation"]["max_abs_diff"]
    )
    assert set(TURN_FILES.values()) <= set(finished["graphs_sha256"])
    assert check_bundle(bundle).ok, check_bundle(bundle).problems  # every graph loads, step/last I/O match


def _manifest_dict(tmp_path: Path) -> dict[str, Any]:
    bundle = make_dialogue_bundle(tmp_path / "repo", cell="lstm")
    data: dict[str, Any] = json.loads((bundle / "manifest.json").read_text())
    return data


def test_corrupt_manifests_are_refused_with_the_reason(tmp_path: Path) -> None:
    data = _manifest_dict(tmp_path)
    swapped = {**data, "state": [data["state"][2], *data["state"][:2], *data["state"][3:]]}
    with pytest.raises(ManifestError, match=r"must carry state \['enc.h', 'enc.c', 'ctx.h'.* in this order"):
        Manifest.from_dict(swapped)
    with pytest.raises(ManifestError, match="needs an 'eos' special token"):
        Manifest.from_dict({**data, "special_tokens": {"unk": 0}})
    with pytest.raises(ManifestError, match=r"only a dialogue model has the \['context', 'decoder'"):
        Manifest.from_dict({**data, "task": "lm"})
    without_turn = {role: file for role, file in data["graphs"].items() if role != "turn"}
    with pytest.raises(ManifestError, match=r"needs the \['turn'\] graphs .*re-export it"):
        Manifest.from_dict({**data, "graphs": without_turn})
    parts_only = {role: file for role, file in data["graphs"].items() if role not in ("context", "decoder",
                  "encoder")}  # fmt: skip
    with pytest.raises(ManifestError, match=r"only a dialogue model has the \['turn', 'turn_last'\]"):
        Manifest.from_dict({**data, "graphs": parts_only, "task": "lm"})


def test_bidirectional_encoder_refuses_the_step_graph_but_exports_its_parts(tmp_path: Path) -> None:
    checkpoint = make_dialogue_checkpoint(tmp_path / "run", "gru", bidirectional=True)
    with pytest.raises(DialogueExportError, match=r"bidirectional.*tokens one by one.*not be servable"):
        export_checkpoint(checkpoint, tmp_path / "repo", "chat")
    assert not (tmp_path / "repo" / "chat" / "1").exists()
    model = _model("gru", bidirectional=True)
    diffs = export_dialogue_parts(model, tmp_path / "parts")
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == sorted(PART_FILES.values())
    assert max(diffs.values()) <= 1e-4
    for role in SERVED_FILES:
        with pytest.raises(ValueError, match="bidirectional"):
            export_dialogue_graph(model, role, tmp_path / "model.onnx")


def test_only_the_torchscript_exporter(tmp_path: Path) -> None:
    checkpoint = make_dialogue_checkpoint(tmp_path / "run", "lstm")
    with pytest.raises(DialogueExportError, match="'torchscript' exporter only"):
        export_checkpoint(checkpoint, tmp_path / "repo", "chat", exporter="dynamo")


def test_a_graph_that_differs_from_pytorch_fails_validation_naming_each_output(tmp_path: Path) -> None:
    path = export_dialogue_graph(_model("rnn_relu", seed=1), "decoder", tmp_path / "decoder.onnx")
    with pytest.raises(ExportValidationError, match=r"decoder\.logits: max abs diff .* over tolerance"):
        validate_dialogue_graph(_model("rnn_relu", seed=2), "decoder", path, (2,), (3,), 1e-4)


def test_cli_exports_a_dialogue_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = make_dialogue_checkpoint(tmp_path / "run", "rnn_tanh")
    args = argparse.Namespace(checkpoint=str(checkpoint), repo=str(tmp_path / "repo"), name="chat",
                              version="v1", precision="fp32", exporter="torchscript")  # fmt: skip
    assert cli.run_export(args) == 0
    out = capsys.readouterr().out
    assert "chat/v1" in out and "step.logits: max abs diff" in out and "decoder.dec_init.h" in out
    assert read_manifest(tmp_path / "repo" / "chat" / "v1").task == "dialogue"
