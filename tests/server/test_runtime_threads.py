"""How many ORT threads a model gets by default: all but one core for light models (the event loop
needs a core), every core of a small machine for heavy ones (their runs leave the loop gaps)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rnnserve.export.manifest import Manifest, read_manifest
from rnnserve.server import runtime
from rnnserve.server.runtime import HEAVY_TOKEN_FLOPS, default_intra_op_threads, token_flops


def sized(manifest: Manifest, hidden: int, emb: int, vocab: int) -> Manifest:
    return dataclasses.replace(manifest, hidden_size=hidden, embedding_size=emb, vocab_size=vocab)


def test_token_flops_count_the_gates_layers_and_projection(lm_repo: Path) -> None:
    tiny = read_manifest(lm_repo / "tiny" / "1")  # LSTM, 2 layers
    design = sized(tiny, hidden=512, emb=256, vocab=10_000)
    # layer 0: 4 gates x 2 x 512 x (256 + 512); layer 1: 4 x 2 x 512 x (512 + 512); projection 2 x 512 x 10k
    assert token_flops(design) == 4 * 2 * 512 * 768 + 4 * 2 * 512 * 1024 + 2 * 512 * 10_000
    gru = dataclasses.replace(design, cell="gru")
    assert token_flops(gru) == 3 * 2 * 512 * 768 + 3 * 2 * 512 * 1024 + 2 * 512 * 10_000


@pytest.mark.parametrize(("cores", "light", "heavy"), [(1, 1, 1), (2, 1, 2), (4, 3, 4), (16, 14, 15)])
def test_default_threads_by_cores_and_weight(
    lm_repo: Path, monkeypatch: pytest.MonkeyPatch, cores: int, light: int, heavy: int
) -> None:
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: cores)
    tiny = read_manifest(lm_repo / "tiny" / "1")
    design = sized(tiny, hidden=512, emb=256, vocab=10_000)
    assert token_flops(tiny) < HEAVY_TOKEN_FLOPS <= token_flops(design)
    assert default_intra_op_threads(tiny) == default_intra_op_threads() == light
    assert default_intra_op_threads(design) == heavy
