"""Bundle graph variants: the last-position graph, the offline-optimised graph, int8 and fp16 precision,
and a real server serving an int8 bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rnnserve.client import Client
from rnnserve.export import cli
from rnnserve.export.manifest import Manifest, read_manifest, sha256_file
from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.export.quantize import op_counts
from rnnserve.export.variants import LAST_FILE, LAST_OUTPUT
from rnnserve.server.runtime import OnnxModel
from rnnserve.server.sampling import log_softmax
from rnnserve.server.text import TextCodec
from rnnserve.training.classifier_model import ClassifierArgs, RNNClassifier
from rnnserve.training.classifier_train import ClassifierTrainConfig, save_classifier_checkpoint
from rnnserve.training.model import ModelArgs, RNNLanguageModel
from rnnserve.training.tokenizer import build_char_tokenizer, build_classifier_tokenizer
from rnnserve.training.train import TrainConfig, save_checkpoint

TEXT = "for x in range(10):\n    print(x)\n"
CPU = ["CPUExecutionProvider"]


def _lm_checkpoint(tmp_path: Path, cell: str = "lstm") -> Path:
    """A small untrained LM checkpoint with tokenizer.json beside it (what `train lm` writes)."""
    run = tmp_path / f"run-{cell}"
    run.mkdir()
    tok = build_char_tokenizer(TEXT)
    tok.save(str(run / "tokenizer.json"))
    torch.manual_seed(0)
    model = RNNLanguageModel(ModelArgs(cell=cell, vocab_size=tok.get_vocab_size(), embedding_size=8,
                                       hidden_size=24, num_layers=2))  # fmt: skip
    save_checkpoint(run / "checkpoint.pt", model, TrainConfig(cell=cell), {"val_loss": 2.0})
    return run / "checkpoint.pt"


def _feeds(m: Manifest, batch: int, seq: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"tokens": rng.integers(0, m.vocab_size, (batch, seq), dtype=np.int64)}
    for s in m.state:  # non-zero states, so the graphs' use of them is exercised
        feeds[s.input_name] = rng.uniform(-1, 1, s.shape_for_batch(batch)).astype(np.float32)
    return feeds


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_last_position_graph_equals_the_step_graphs_last_logits(cell: str, tmp_path: Path) -> None:
    bundle = export_checkpoint(_lm_checkpoint(tmp_path, cell), tmp_path / "repo", "lm")
    m = read_manifest(bundle)
    assert m.precision == "fp32" and m.graphs == {
        "step": "model.onnx",
        "last": LAST_FILE,
        "generate": "model_gen_k8.onnx",
    }
    assert m.graph_file("step") == m.model_file and m.graph_file("last") == LAST_FILE
    assert m.export["variants"]["optimization"] == "basic"
    assert m.export["variants"]["graphs_sha256"][LAST_FILE] == sha256_file(bundle / LAST_FILE)
    step = ort.InferenceSession(str(bundle / "model.onnx"), providers=CPU)
    last = ort.InferenceSession(str(bundle / LAST_FILE), providers=CPU)
    assert [o.name for o in last.get_outputs()] == [LAST_OUTPUT, *(s.output_name for s in m.state)]
    for batch, seq in [(1, 1), (3, 9), (8, 2)]:
        feeds = _feeds(m, batch, seq)
        logits, *states = step.run(None, feeds)  # logits (batch, seq, vocab)
        got, *got_states = last.run(None, feeds)  # (batch, vocab)
        assert got.shape == (batch, m.vocab_size)
        np.testing.assert_allclose(got, logits[:, -1], atol=1e-5)
        for a, b in zip(got_states, states, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_offline_optimised_graph_is_portable_standard_onnx(tmp_path: Path) -> None:
    bundle = export_checkpoint(_lm_checkpoint(tmp_path), tmp_path / "repo", "lm")
    for file in ("model.onnx", LAST_FILE):
        onnx.checker.check_model(str(bundle / file))
        domains = {n.domain for n in onnx.load(str(bundle / file)).graph.node}
        assert domains <= {"", "ai.onnx"}  # no provider-specific contrib ops in a bundle at BASIC


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_int8_bundle_quantises_recurrent_and_projection_weights(cell: str, tmp_path: Path) -> None:
    ckpt, repo = _lm_checkpoint(tmp_path, cell), tmp_path / "repo"
    fp32 = export_checkpoint(ckpt, repo, "lm")
    int8 = export_checkpoint(ckpt, repo, "lm", precision="int8")
    m = read_manifest(int8)
    assert m.precision == "int8" and set(m.graphs) == {"step", "last", "generate"}
    ops = op_counts(int8 / "model.onnx")
    assert ops.get("MatMulInteger") == 1  # the vocabulary projection
    # ORT quantises LSTM weights only; a GRU keeps its recurrent weights in fp32
    assert ops.get("com.microsoft.DynamicQuantizeLSTM", 0) == (2 if cell == "lstm" else 0)
    assert m.export["variants"]["quantized_ops"] == {k: v for k, v in ops.items() if "Quantize" in k
                                                     or "Integer" in k}  # fmt: skip
    if cell == "lstm":  # (a GRU this small is mostly fp32 recurrent weights)
        assert (int8 / "model.onnx").stat().st_size < (fp32 / "model.onnx").stat().st_size / 2
    diffs = m.export["variants"]["validation"]["max_abs_diff"]
    assert set(diffs) >= {"step.logits", "last.logits_last", "step.state_out.h"}
    assert 0 < max(diffs.values()) < 0.1  # quantised, so not exact, but close
    # the server's runtime loads it unchanged and gets float32 out
    model = OnnxModel(int8, m)
    outputs, _ = model.run(np.array([[1, 2, 3]], np.int64), model.initial_state(1))
    assert outputs["logits"].dtype == np.float32 and outputs["logits"].shape == (1, 3, m.vocab_size)


def test_int8_works_with_the_dynamo_exporter_too(tmp_path: Path) -> None:
    bundle = export_checkpoint(_lm_checkpoint(tmp_path), tmp_path / "repo", "lm", precision="int8",
                               exporter="dynamo")  # fmt: skip
    m = read_manifest(bundle)
    assert m.export["exporter"] == "dynamo" and m.precision == "int8"
    for file in ("model.onnx", LAST_FILE):  # the last-position graph goes through the same exporter
        ops = op_counts(bundle / file)
        assert ops.get("com.microsoft.DynamicQuantizeLSTM") == 2 and ops.get("MatMulInteger") == 1


def test_fp16_bundle_keeps_float32_io_and_loads_on_cpu(tmp_path: Path) -> None:
    ckpt, repo = _lm_checkpoint(tmp_path), tmp_path / "repo"
    fp32, fp16 = export_checkpoint(ckpt, repo, "lm"), export_checkpoint(ckpt, repo, "lm", precision="fp16")
    m = read_manifest(fp16)
    assert m.precision == "fp16"
    graph = onnx.load(str(fp16 / "model.onnx")).graph
    float_inits = {i.data_type for i in graph.initializer} - {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
    assert float_inits == {onnx.TensorProto.FLOAT16}
    io_types = {v.type.tensor_type.elem_type for v in [*graph.input, *graph.output] if v.name != "tokens"}
    assert io_types == {onnx.TensorProto.FLOAT}
    # ORT's CPU session at ENABLE_ALL crashed the process on this graph; the runtime loads fp16 safely
    model, reference = OnnxModel(fp16, m), OnnxModel(fp32, read_manifest(fp32))
    tokens = np.array([[4, 5, 6, 7]], np.int64)
    got, _ = model.run(tokens, model.initial_state(1))
    want, _ = reference.run(tokens, reference.initial_state(1))
    np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-2)


def _classifier_checkpoint(tmp_path: Path) -> Path:
    """An untrained bidirectional LSTM classifier checkpoint (whole-text graph with sequence_lens)."""
    run = tmp_path / "clf"
    run.mkdir()
    texts = ["a great and moving film", "dull , tedious and clumsy", "the plot was fun"]
    tok = build_classifier_tokenizer("word", texts)
    tok.save(str(run / "tokenizer.json"))
    torch.manual_seed(3)
    args = ClassifierArgs(cell="lstm", vocab_size=tok.get_vocab_size(), embedding_size=8,
                          hidden_size=16, num_layers=1, num_classes=2, bidirectional=True, pooling="max",
                          pad_id=0)  # fmt: skip
    config = ClassifierTrainConfig(train="t.tsv", cell="lstm", bidirectional=True, pooling="max")
    save_classifier_checkpoint(run / "checkpoint.pt", RNNClassifier(args), config, tok,
                               ["negative", "positive"], ["0", "1"], {"dev_accuracy": 0.5})  # fmt: skip
    return run / "checkpoint.pt"


def test_int8_whole_text_classifier_stays_exact_under_padding(tmp_path: Path) -> None:
    bundle = export_checkpoint(_classifier_checkpoint(tmp_path), tmp_path / "repo", "bi", precision="int8")
    m = read_manifest(bundle)
    assert m.precision == "int8" and m.graphs == {"step": "model.onnx"}  # no "last" graph for a classifier
    assert op_counts(bundle / "model.onnx").get("com.microsoft.DynamicQuantizeLSTM") == 1
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=CPU)
    tokens = np.array([[5, 6, 7, 8], [9, 3, 0, 0]], np.int64)  # the second text is padded
    both = sess.run(None, {"tokens": tokens, "lengths": np.array([4, 2], np.int64)})[0]
    alone = sess.run(None, {"tokens": tokens[1:, :2], "lengths": np.array([2], np.int64)})[0]
    # dynamic quantisation scales activations per run: padding never leaks, but the batch's range
    # can move the second text's probabilities by quantisation noise
    np.testing.assert_allclose(both[1], alone[0], atol=2e-2)


def test_export_cli_precision(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="rnnserve")
    cli.register(parser.add_subparsers(dest="command", required=True))
    ckpt = _lm_checkpoint(tmp_path)
    args = parser.parse_args(["export", str(ckpt), "--repo", str(tmp_path / "repo"), "--name", "q",
                              "--precision", "int8"])  # fmt: skip
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "int8 step.logits: max abs diff" in out and "vs fp32" in out
    assert read_manifest(tmp_path / "repo" / "q" / "1").precision == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["export", str(ckpt), "--repo", "r", "--name", "q", "--precision", "int4"])


def test_real_server_serves_an_int8_bundle(lm_repo: Path, tmp_path: Path) -> None:
    """The trained `tiny` LM exported at int8 into its own repository, served, fed and sampled from."""
    from rnnserve.server.app import background_server
    from rnnserve.server.config import ServerConfig

    checkpoint = lm_repo.parent / "run" / "checkpoint.pt"  # where the `lm_repo` fixture trained it
    repo = tmp_path / "repo"
    int8 = export_checkpoint(checkpoint, repo, "tiny8", precision="int8")
    fp32 = OnnxModel(lm_repo / "tiny" / "1", read_manifest(lm_repo / "tiny" / "1"))
    local8 = OnnxModel(int8, read_manifest(int8))
    prompt = "def add(a, b):\n    return a"
    config = ServerConfig(repo=repo, host="127.0.0.1", port=0)
    with background_server(config) as server, Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        (info,) = client.models()
        assert info.name == "tiny8" and info.provider == "CPUExecutionProvider"
        with client.session("tiny8") as session:
            out = session.feed(prompt, top_k=5)
            tokens = list(session.generate(max_tokens=20, temperature=0.8, seed=1))
    assert out.position == len(prompt) and len(tokens) >= 1
    # the server's answer is an int8 graph's (the step graph's last logits, or the last-position graph's:
    # dynamic quantisation scales activations per run, so the two differ by quantisation noise), and
    # close to the fp32 model's
    codec = TextCodec.from_file(int8 / "tokenizer.json", local8.manifest.special_tokens)
    x = np.array([codec.encode(prompt)], np.int64)  # (1, seq)
    state8 = {
        s.input_name: v for s, v in zip(local8.manifest.state, local8.initial_state(1).values(), strict=True)
    }
    last8 = ort.InferenceSession(str(int8 / LAST_FILE), providers=CPU)
    candidates = [
        log_softmax(local8.run(x, local8.initial_state(1))[0]["logits"][0, -1]),  # (vocab,)
        log_softmax(last8.run([LAST_OUTPUT], {"tokens": x, **state8})[0][0]),  # (vocab,)
    ]
    logp32 = log_softmax(fp32.run(x, fp32.initial_state(1))[0]["logits"][0, -1])
    got, ids = np.array([c.logprob for c in out.top]), [c.id for c in out.top]
    assert min(np.max(np.abs(got - logp[ids])) for logp in candidates) < 1e-4
    assert max(np.max(np.abs(logp - logp32)) for logp in candidates) < 0.1
    assert out.top[0].id == int(np.argmax(logp32))
