"""The scheduler batches steps of many sessions into one run, with results equal to each alone."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from rnnserve.export.manifest import read_manifest
from rnnserve.server.runtime import OnnxModel
from rnnserve.server.scheduler import Scheduler, SchedulerOptions


def random_state(model: OnnxModel, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in model.initial_state(1).items()}


def test_concurrent_steps_run_as_batches_and_match_single_runs(lm_repo: Path) -> None:
    bundle = lm_repo / "tiny" / "1"
    model = OnnxModel(bundle, read_manifest(bundle))
    rng = np.random.default_rng(0)
    vocab = model.manifest.vocab_size
    # 12 sessions, two sequence lengths: same-length steps share a run, different lengths never mix.
    requests = [(rng.integers(0, vocab, size=3 if i % 2 else 5), random_state(model, rng)) for i in range(12)]

    async def run_all() -> tuple[list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]], Scheduler]:
        with ThreadPoolExecutor(1) as pool:
            scheduler = Scheduler(model, pool, SchedulerOptions(max_batch=64, max_wait_s=0.01))
            scheduler.start()
            results = await asyncio.gather(*(scheduler.step(t, s) for t, s in requests))
            await scheduler.stop()
        return results, scheduler

    results, scheduler = asyncio.run(run_all())
    assert scheduler.steps_run == 12
    assert scheduler.batches_run == 2  # one run per sequence length
    for (tokens, state), (outputs, new_state) in zip(requests, results, strict=True):
        alone, alone_state = model.run(tokens[None, :], state)
        np.testing.assert_allclose(outputs["logits"], alone["logits"][0], atol=1e-5)
        for name in state:
            np.testing.assert_allclose(new_state[name], alone_state[name], atol=1e-5)
            assert new_state[name].shape == state[name].shape


def test_max_batch_caps_a_run(lm_repo: Path) -> None:
    bundle = lm_repo / "tiny" / "1"
    model = OnnxModel(bundle, read_manifest(bundle))
    rng = np.random.default_rng(1)

    async def run_all() -> Scheduler:
        with ThreadPoolExecutor(1) as pool:
            scheduler = Scheduler(model, pool, SchedulerOptions(max_batch=4, max_wait_s=0.01))
            scheduler.start()
            await asyncio.gather(
                *(scheduler.step(np.array([1, 2]), random_state(model, rng)) for _ in range(10))
            )
            await scheduler.stop()
        return scheduler

    scheduler = asyncio.run(run_all())
    assert scheduler.steps_run == 10 and scheduler.batches_run == 3


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
def test_running_sessions_together_changes_nothing_for_every_cell(cell: str, tmp_path: Path) -> None:
    """The batching invariant, per cell type: each session's outputs and state are what it gets alone."""
    import torch

    from rnnserve.export.manifest import Manifest, TensorSpec, lm_state_specs
    from rnnserve.export.onnx_export import export_lm_to_onnx
    from rnnserve.training.model import ModelArgs, RNNLanguageModel

    torch.manual_seed(0)
    net = RNNLanguageModel(ModelArgs(cell, 50, 16, 24, 2, dropout=0.0)).eval()
    export_lm_to_onnx(net, tmp_path / "model.onnx")
    manifest = Manifest(
        name="m",
        version="1",
        task="lm",
        cell=cell,
        num_layers=2,
        hidden_size=24,
        embedding_size=16,
        num_directions=1,
        vocab_size=50,
        tokenizer_kind="char",
        special_tokens={},
        inputs=[TensorSpec("tokens", ["batch", "seq"], "int64")],
        outputs=[],
        state=lm_state_specs(cell, 2, 24),
    )
    model = OnnxModel(tmp_path, manifest)
    rng = np.random.default_rng(2)
    requests = [(rng.integers(0, 50, size=1 + i % 3), random_state(model, rng)) for i in range(9)]

    async def run_all() -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        with ThreadPoolExecutor(1) as pool:
            scheduler = Scheduler(model, pool, SchedulerOptions(max_wait_s=0.01))
            scheduler.start()
            results = await asyncio.gather(*(scheduler.step(t, s) for t, s in requests))
            await scheduler.stop()
        assert scheduler.batches_run == 3  # three sequence lengths
        return list(results)

    for (tokens, state), (outputs, new_state) in zip(requests, asyncio.run(run_all()), strict=True):
        alone, alone_state = model.run(tokens[None, :], state)
        np.testing.assert_allclose(outputs["logits"], alone["logits"][0], atol=1e-5)
        for name in state:
            np.testing.assert_allclose(new_state[name], alone_state[name], atol=1e-5)
