"""The manifest's versioned schema: checked when written and when read, errors naming the field, version-1
manifests still read, newer ones refused with a clear message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rnnserve.export.manifest import (
    SCHEMA_VERSION,
    Manifest,
    ManifestError,
    NewerSchemaError,
    TensorSpec,
    lm_state_specs,
    read_manifest,
    write_manifest,
)


def _manifest(**overrides: Any) -> Manifest:
    """A consistent manifest of a 2-layer LSTM language model (no files needed)."""
    fields: dict[str, Any] = {
        "name": "m",
        "version": "1",
        "task": "lm",
        "cell": "lstm",
        "num_layers": 2,
        "hidden_size": 8,
        "embedding_size": 4,
        "num_directions": 1,
        "vocab_size": 10,
        "tokenizer_kind": "char",
        "special_tokens": {"unk": 0, "eos": 1},
        "inputs": [TensorSpec("tokens", ["batch", "seq"], "int64")]
        + [TensorSpec(f"state_in.{n}", [2, "batch", 8], "float32") for n in "hc"],
        "outputs": [TensorSpec("logits", ["batch", "seq", 10], "float32")]
        + [TensorSpec(f"state_out.{n}", [2, "batch", 8], "float32") for n in "hc"],
        "state": lm_state_specs("lstm", 2, 8),
        "model_sha256": "ab" * 32,
    }
    return Manifest(**{**fields, **overrides})


def _data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_manifest().to_json())
    data.update(changes)
    return data


def test_round_trip_and_current_version() -> None:
    m = _manifest()
    assert m.schema_version == SCHEMA_VERSION == 4
    assert Manifest.from_dict(json.loads(m.to_json())) == m


def test_version_2_reads_with_no_generation_graph() -> None:
    m = Manifest.from_dict(_data(schema_version=2))
    assert (m.generate, m.generate_graph(), m.graph_file("generate")) == ([], None, None)


def test_version_1_reads_as_fp32_with_only_a_step_graph() -> None:
    data = _data(schema_version=1)
    del data["precision"], data["graphs"]
    m = Manifest.from_dict(data)
    assert (m.precision, m.graphs, m.graph_file("step"), m.graph_file("last")) == (
        "fp32",
        {},
        "model.onnx",
        None,
    )


def test_a_newer_schema_is_refused_in_plain_words() -> None:
    with pytest.raises(
        NewerSchemaError, match=r"schema_version 5 is newer than this rnnserve reads \(4\).*upgrade"
    ):
        Manifest.from_dict(_data(schema_version=5, some_future_field=1))
    with pytest.raises(ManifestError, match="schema_version: must be a positive integer"):
        Manifest.from_dict(_data(schema_version="2"))


def test_schema_errors_name_every_field() -> None:
    data = _data(num_layers="2", unexpected=True)
    del data["cell"]
    data["state"][1]["batch_axis"] = "1"
    data["inputs"][0]["shape"][1] = 1.5
    data["metrics"] = {"val_loss": "low"}
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(data)
    assert sorted(info.value.problems) == [
        "cell: missing (required)",
        "inputs[0].shape[1]: must be an integer or a string, got 1.5 (a number)",
        "metrics['val_loss']: must be a number, got \"low\" (a string)",
        'num_layers: must be an integer, got "2" (a string)',
        'state[1].batch_axis: must be an integer, got "1" (a string)',
        "unexpected: unknown field",
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": "image"}, r"task: must be one of \['lm', 'classifier', 'dialogue'\]"),
        ({"cell": "transformer"}, "cell 'transformer' is not one of"),
        ({"precision": "fp8"}, "precision 'fp8' is not one of"),
        ({"graphs": {"step": "other.onnx"}}, r"graphs\['step'\] must be the model file"),
        ({"model_sha256": ""}, "model_sha256: must be the model file's sha256"),
        ({"special_tokens": {"eos": 99}}, "special token 'eos' id 99 is outside the vocabulary"),
        ({"state": lm_state_specs("lstm", 3, 8)}, r"state\[0\] \('h'\): shape \[3, -1, 8\] does not match"),
        ({"state": lm_state_specs("lstm", 2, 8)[:1]}, r"inputs: \['state_in.c'\] are neither state"),
    ],
)
def test_consistency_errors(change: dict[str, Any], message: str) -> None:
    data = json.loads(_manifest().to_json())
    data.update({k: json.loads(json.dumps(v, default=vars)) for k, v in change.items()})
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(data)


def test_write_refuses_what_a_reader_would_refuse(tmp_path: Path) -> None:
    write_manifest(_manifest(), tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["schema_version"] == SCHEMA_VERSION
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="metrics\\['loss'\\]: must be a number"):
        write_manifest(_manifest(metrics={"loss": "nan?"}), tmp_path)
    assert not (tmp_path / "manifest.json").exists()


def test_read_checks_files_and_sha256(tmp_path: Path) -> None:
    import hashlib

    (tmp_path / "model.onnx").write_bytes(b"graph")
    write_manifest(_manifest(model_sha256=hashlib.sha256(b"graph").hexdigest()), tmp_path)
    with pytest.raises(
        ManifestError, match=r"tokenizer.json \(tokenizer file named by the manifest\) is missing"
    ):
        read_manifest(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert read_manifest(tmp_path).name == "m"
    (tmp_path / "model.onnx").write_bytes(b"graph, changed")
    with pytest.raises(ManifestError, match=r"model\.onnx does not match its sha256"):
        read_manifest(tmp_path)
    assert read_manifest(tmp_path, verify_sha256=False).name == "m"
