"""The K-step generation graphs (export/generate_graph.py), cut and plain: ids equal the PyTorch reference
sampler's and the server's numpy sampler's, for every cell and K; batch invariance; greedy = argmax; a
broken graph is caught; the plain graph's manifest record."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rnnserve.cells import CELLS
from rnnserve.export.generate_check import (
    RowParams,
    check_generate_graph,
    generate_feeds,
    ort_step,
    torch_step,
    validation_rows,
)
from rnnserve.export.generate_graph import (
    TOP_K_MAX,
    build_generate_graph,
    build_plain_generate_graph,
    generate_graph_record,
)
from rnnserve.export.manifest import (
    GenerateGraph,
    Manifest,
    ManifestError,
    TensorSpec,
    generate_specs,
    lm_state_specs,
)
from rnnserve.export.onnx_export import export_lm_to_onnx
from rnnserve.export.validate import ExportValidationError
from rnnserve.server.sampling import SamplingParams, log_softmax_and_weights, sample_batch
from rnnserve.training.model import ModelArgs, RNNLanguageModel

CPU = ["CPUExecutionProvider"]
HIDDEN = 24


def _lm(cell: str, vocab: int) -> RNNLanguageModel:
    torch.manual_seed(0)
    return RNNLanguageModel(ModelArgs(cell, vocab, 12, HIDDEN, 2, 0.0)).eval()


def _graphs(tmp_path: Path, model: RNNLanguageModel, k: int) -> tuple[Path, ort.InferenceSession]:
    step = export_lm_to_onnx(model, tmp_path / f"step_{model.args.cell}_{model.args.vocab_size}.onnx")
    gen = build_generate_graph(step, tmp_path / f"gen_{k}.onnx", k, model.args.vocab_size)
    return step, ort.InferenceSession(str(gen), providers=CPU)


@pytest.mark.parametrize("cell", CELLS)
def test_ids_equal_the_pytorch_reference_sampler(cell: str, tmp_path: Path) -> None:
    # vocab 50: one CDF block; 300: the two-level inverse CDF (3 blocks, the last one short)
    for vocab in (50, 300):
        model = _lm(cell, vocab)
        for k in (1, 3):
            _, gen = _graphs(tmp_path, model, k)
            figures = check_generate_graph(
                gen, torch_step(model), model.args.state_names, vocab, (2, HIDDEN), min(TOP_K_MAX, vocab)
            )
            assert figures["draws"] == 12 * k and figures["boundary_ties"] == 0
            assert figures["logprobs_max_abs_diff"] < 1e-5 and figures["state_max_abs_diff"] < 1e-5


def test_ids_equal_the_servers_numpy_sampler_on_the_step_graphs_logits(tmp_path: Path) -> None:
    """The server's host path (step graph + sampling.sample_batch) and the graph choose the same ids.

    Both sample the same logits (the generation graph is the step graph's nodes, copied) with the same
    float32 uniform, but sum differently (ORT's float32 block sums vs numpy's pairwise float32 sums and
    float64 cumulative sums): a draw flips only when u * total lands within ~1e-6 relative of an interval
    boundary, ~1e-6 per draw (the expected number of flips over this test's 2,880 draws is < 0.01). Fixed
    seeds make the test deterministic. The engine passes each session's float64 draw as float32: that
    rounding (<= 6e-8) can flip a draw against today's float64 host path with a probability of that order.
    """
    model = _lm("lstm", 300)
    k = 4
    step_path, gen = _graphs(tmp_path, model, k)
    step = ort_step(step_path, model.args.state_names)
    settings = validation_rows(300, TOP_K_MAX)
    rng = np.random.default_rng(7)
    for batch in (1, 9, 80):
        rows = [settings[i % len(settings)] for i in range(batch)]
        state = tuple(rng.uniform(-1, 1, (2, batch, HIDDEN)).astype(np.float32) for _ in range(2))
        tokens = rng.integers(0, 300, (batch, 1), dtype=np.int64)
        uniforms = rng.random((batch, k), dtype=np.float32)
        ids = gen.run(["ids"], generate_feeds(rows, state, model.args.state_names, tokens, uniforms))[0]
        params = [SamplingParams(r.temperature, r.top_k, r.top_p) for r in rows]
        x, carried = tokens, state
        for i in range(k):
            logits, carried = step(x, carried)
            lp, w = log_softmax_and_weights(logits)
            host = sample_batch(lp, params, uniforms[:, i].astype(np.float64), w)
            np.testing.assert_array_equal(ids[:, i], host, err_msg=f"batch {batch}, step {i}")
            x = ids[:, i : i + 1]


def test_a_row_gets_the_same_ids_alone_or_in_any_batch(tmp_path: Path) -> None:
    model = _lm("gru", 300)
    _, gen = _graphs(tmp_path, model, 8)
    rng = np.random.default_rng(3)
    batch = 16
    rows = [validation_rows(300, TOP_K_MAX)[i % 8] for i in range(batch)]
    state = (rng.uniform(-1, 1, (2, batch, HIDDEN)).astype(np.float32),)
    tokens = rng.integers(0, 300, (batch, 1), dtype=np.int64)
    uniforms = rng.random((batch, 8), dtype=np.float32)
    together = gen.run(None, generate_feeds(rows, state, ("h",), tokens, uniforms))
    for r in range(batch):
        sl = slice(r, r + 1)
        alone = gen.run(None, generate_feeds(rows[sl], (state[0][:, sl],), ("h",), tokens[sl], uniforms[sl]))
        np.testing.assert_array_equal(alone[0], together[0][sl])
        np.testing.assert_allclose(alone[1], together[1][sl], atol=1e-6)
        np.testing.assert_allclose(alone[2], together[2][:, sl], atol=1e-6)


def test_temperature_zero_is_argmax_and_the_state_excludes_the_last_id(tmp_path: Path) -> None:
    model = _lm("lstm", 300)
    k = 5
    _, gen = _graphs(tmp_path, model, k)
    rng = np.random.default_rng(5)
    state = tuple(rng.uniform(-1, 1, (2, 4, HIDDEN)).astype(np.float32) for _ in range(2))
    tokens = rng.integers(0, 300, (4, 1), dtype=np.int64)
    feeds = generate_feeds([RowParams(0.0)] * 4, state, model.args.state_names, tokens, rng.random((4, k)))
    ids, logprobs, h, c = gen.run(None, feeds)
    x, carried = torch.from_numpy(tokens), tuple(torch.from_numpy(s) for s in state)
    with torch.no_grad():
        for i in range(k):
            logits, carried = model(x, carried)
            lp = torch.log_softmax(logits[:, -1], -1)
            np.testing.assert_array_equal(ids[:, i], lp.argmax(-1).numpy())
            np.testing.assert_allclose(logprobs[:, i], lp.max(-1).values.numpy(), atol=1e-5)
            x = torch.from_numpy(ids[:, i : i + 1])
    # the state after x0..x_{K-1}: x_K (ids[:, -1]) is sampled, not applied
    np.testing.assert_allclose(h, carried[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(c, carried[1].numpy(), atol=1e-5)


def test_validation_catches_a_graph_that_swaps_its_uniforms(tmp_path: Path) -> None:
    model = _lm("lstm", 300)
    _graphs(tmp_path, model, 2)
    broken = onnx.load(str(tmp_path / "gen_2.onnx"))
    for t in broken.graph.initializer:  # step 0 reads uniforms[:, 1] and step 1 uniforms[:, 0]
        if t.name in ("gen/step0", "gen/step1"):
            t.CopyFrom(onnx.numpy_helper.from_array(np.array(1 - int(t.name[-1]), np.int64), t.name))
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "broken.onnx"), providers=CPU)
    with pytest.raises(ExportValidationError, match=r"chose id .* where the reference sampler chose"):
        check_generate_graph(sess, torch_step(model), model.args.state_names, 300, (2, HIDDEN), TOP_K_MAX)


def _plain(tmp_path: Path, model: RNNLanguageModel, k: int, **kw: bool) -> tuple[Path, ort.InferenceSession]:
    step = export_lm_to_onnx(model, tmp_path / f"step_{model.args.cell}_{model.args.vocab_size}.onnx")
    gen = build_plain_generate_graph(step, tmp_path / f"plain_{k}.onnx", k, model.args.vocab_size, **kw)
    return step, ort.InferenceSession(str(gen), providers=CPU)


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_plain_graph_ids_equal_the_pytorch_reference_sampler(cell: str, tmp_path: Path) -> None:
    # vocab 50: one CDF block; 300: two levels (3 blocks, the last one short)
    for vocab in (50, 300):
        model = _lm(cell, vocab)
        for k in (1, 3):
            _, gen = _plain(tmp_path, model, k)
            assert {i.name for i in gen.get_inputs()} >= {"uniforms", "temperature"}
            assert not {"top_k", "top_p"} & {i.name for i in gen.get_inputs()}
            figures = check_generate_graph(
                gen, torch_step(model), model.args.state_names, vocab, (2, HIDDEN), 0
            )
            # each batch size twice: all temperatures (the If's tempered branch), then 0 and 1 only
            assert figures["draws"] == 24 * k and figures["boundary_ties"] == 0
            assert figures["logprobs_max_abs_diff"] < 1e-5 and figures["state_max_abs_diff"] < 1e-5


@pytest.mark.parametrize("branch", [True, False])
def test_plain_graph_ids_equal_the_servers_numpy_sampler(branch: bool, tmp_path: Path) -> None:
    """The host path (step graph + sampling.sample_batch, with the weights log_softmax_and_weights gives, as
    the server runs it) and the plain graph choose the same ids for greedy and temperature rows, batch
    by batch: mixed temperatures (the tempered branch) and 0/1 only (the untempered one). Same rounding
    caveat as the cut graph's test above; the CDFs' cumulative sums are float64 in both."""
    model = _lm("lstm", 300)
    k = 4
    step_path, gen = _plain(tmp_path, model, k, temperature_branch=branch)
    step = ort_step(step_path, model.args.state_names)
    rng = np.random.default_rng(11)
    for temps in ([0.0, 1.0, 0.7, 1.6, 0.3], [0.0, 1.0, 1.0]):
        for batch in (1, 9, 80):
            rows = [RowParams(temps[(i + batch) % len(temps)]) for i in range(batch)]
            state = tuple(rng.uniform(-1, 1, (2, batch, HIDDEN)).astype(np.float32) for _ in range(2))
            tokens = rng.integers(0, 300, (batch, 1), dtype=np.int64)
            uniforms = rng.random((batch, k), dtype=np.float32)
            feeds = generate_feeds(rows, state, model.args.state_names, tokens, uniforms, plain=True)
            ids, logprobs = gen.run(["ids", "logprobs"], feeds)
            params = [SamplingParams(r.temperature) for r in rows]
            x, carried = tokens, state
            for i in range(k):
                logits, carried = step(x, carried)
                lp, w = log_softmax_and_weights(logits)
                host = sample_batch(lp, params, uniforms[:, i].astype(np.float64), w)
                np.testing.assert_array_equal(ids[:, i], host, err_msg=f"{temps}, batch {batch}, step {i}")
                np.testing.assert_allclose(logprobs[:, i], lp[np.arange(batch), host], atol=1e-5)
                x = ids[:, i : i + 1]


def test_plain_graph_greedy_is_argmax_with_first_index_on_ties(tmp_path: Path) -> None:
    """Greedy without a vocabulary-wide ArgMax (block maxima, then ArgMax inside the first block holding
    the max) still takes the first of tied maxima, also across blocks: logits tied by zeroed output rows."""
    model = _lm("gru", 300)
    with torch.no_grad():  # ids 5, 130 and 290 (blocks 0, 1, 2) share the best logit: zero weights, big bias
        model.decoder.weight[[5, 130, 290]] = 0.0
        model.decoder.bias[[5, 130, 290]] = 50.0
    _, gen = _plain(tmp_path, model, 2)
    state = (np.zeros((2, 3, HIDDEN), np.float32),)
    ids = gen.run(["ids"], generate_feeds([RowParams(0.0)] * 3, state, ("h",), np.zeros((3, 1), np.int64),
                                          np.full((3, 2), 0.99), plain=True))[0]  # fmt: skip
    assert (ids == 5).all()
    with torch.no_grad():
        model.decoder.bias[5] = 0.0
    _, gen = _plain(tmp_path, model, 2)
    ids = gen.run(["ids"], generate_feeds([RowParams(0.0)] * 3, state, ("h",), np.zeros((3, 1), np.int64),
                                          np.full((3, 2), 0.99), plain=True))[0]  # fmt: skip
    assert (ids == 130).all()


def test_plain_graph_manifest_record_and_validation() -> None:
    vocab = 300
    state = [TensorSpec(f"state_in.{n}", [2, "batch", HIDDEN], "float32") for n in "hc"]
    step_inputs = [TensorSpec("tokens", ["batch", "seq"], "int64"), *state]
    plain = generate_graph_record("model_gen_plain_k8.onnx", 8, step_inputs, vocab, 0)
    cut = generate_graph_record("model_gen_k8.onnx", 8, step_inputs, vocab)
    assert plain.plain and not cut.plain and (plain.top_k_max, cut.top_k_max) == (0, TOP_K_MAX)
    assert [t.name for t in plain.inputs] == ["tokens", "state_in.h", "state_in.c", "uniforms", "temperature"]
    assert plain.inputs == generate_specs(state, 8, plain=True)[0]
    assert [t.name for t in cut.inputs][-2:] == ["top_k", "top_p"]
    assert plain.outputs == cut.outputs
    logits = TensorSpec("logits", ["batch", "seq", vocab], "float32")
    manifest = Manifest(
        name="m", version="1", task="lm", cell="lstm", num_layers=2, hidden_size=HIDDEN, embedding_size=4,
        num_directions=1, vocab_size=vocab, tokenizer_kind="char", special_tokens={"unk": 0},
        inputs=step_inputs, outputs=[logits, *cut.outputs[2:]],
        state=lm_state_specs("lstm", 2, HIDDEN), graphs={"generate": cut.file}, generate=[plain, cut],
        model_sha256="ab" * 32,
    )  # fmt: skip
    data = json.loads(manifest.to_json())
    assert Manifest.from_dict(data).generate_graph(8, plain=True) == plain  # plain and cut of one K: fine
    bad = GenerateGraph(plain.file, 8, 0, cut.inputs, cut.outputs)  # a plain graph with top_k inputs
    with pytest.raises(ManifestError, match="not the generation contract"):
        Manifest.from_dict({**data, "generate": [dataclasses.asdict(g) for g in (bad, cut)]})
    twin = GenerateGraph("model_gen_plain_k8b.onnx", 8, 0, plain.inputs, plain.outputs)
    with pytest.raises(ManifestError, match="own number of steps"):
        Manifest.from_dict({**data, "generate": [dataclasses.asdict(g) for g in (plain, twin, cut)]})
