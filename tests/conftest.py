"""Fixtures shared by the suite: a real trained-and-exported model, and a real server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import CELL_TEXT, CELLS

# Real redis-server fixtures (redis_url, redis_process): tests/redis_server.py.
pytest_plugins = ["redis_server"]

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A small corpus with enough structure for a tiny char model to learn something in seconds.
TINY_CORPUS = [
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n" * 20,
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n" * 20,
]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a skip saying why (a user's clone does not have it; CI does)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared data sets at {SHARED_DATA} (present in CI, absent in a user's clone)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def lm_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding `tiny` (char LSTM 2x32) trained for a few steps and exported."""
    from rnnserve.export.onnx_export import export_checkpoint
    from rnnserve.training.train import TrainConfig, train_language_model

    root = tmp_path_factory.mktemp("lm")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(TINY_CORPUS):
        (corpus / f"doc{i}.txt").write_text(doc)
    config = TrainConfig(
        data=str(corpus),
        min_count=1,
        cell="lstm",
        layers=2,
        hidden=32,
        emb=16,
        epochs=2,
        batch_size=4,
        bptt=32,
        max_steps_per_epoch=40,
        progress=False,
        out_dir=str(root / "run"),
    )
    checkpoint = train_language_model(config)
    repo = root / "repo"
    export_checkpoint(checkpoint, repo, "tiny")
    return repo


POSITIVE = ["great", "wonderful", "fun", "moving", "brilliant", "charming", "superb", "delightful"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "clumsy", "tedious", "bad", "lifeless"]
FILLER = ["the", "movie", "was", "a", "plot", "and", "acting", "really", "film", "story", "it", "so"]


def synthetic_sentiment_tsv(path: Path, n: int, seed: int) -> Path:
    """A labelled TSV (SST-2's layout) whose label a small model learns in seconds."""
    import random

    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.choices(FILLER, k=rng.randint(2, 10)) + rng.choices(POSITIVE if label else NEGATIVE, k=2)
        rng.shuffle(words)
        lines.append(f"{' '.join(words)}\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _train_classifier(root: Path, name: str, **overrides: object) -> Path:
    from rnnserve.training.classifier_train import train_classifier
    from rnnserve.training.config import ClassifierTrainConfig

    config = ClassifierTrainConfig(
        train=str(synthetic_sentiment_tsv(root / "train.tsv", 600, seed=1)),
        dev=str(synthetic_sentiment_tsv(root / "dev.tsv", 100, seed=2)),
        layers=1,
        hidden=16,
        emb=16,
        epochs=2,
        batch_size=32,
        threads=2,
        progress=False,
        out_dir=str(root / name),
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return train_classifier(config)


@pytest.fixture(scope="session")
def classifier_checkpoints(lm_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small sentiment classifiers on synthetic data, exported into the same repository as `tiny`:
    `live` (unidirectional GRU, max pooling: streams) and `bi` (bidirectional LSTM: whole texts only).
    """
    from rnnserve.export.onnx_export import export_checkpoint

    root = tmp_path_factory.mktemp("clf")
    checkpoints = {
        "live": _train_classifier(root, "live", cell="gru", bidirectional=False, pooling="max"),
        "bi": _train_classifier(root, "bi", cell="lstm", bidirectional=True, pooling="max"),
    }
    for name, checkpoint in checkpoints.items():
        export_checkpoint(checkpoint, lm_repo, name)
    return checkpoints


@pytest.fixture(scope="session")
def server_url(lm_repo: Path, classifier_checkpoints: dict[str, Path]) -> Iterator[str]:
    """A real rnnserve server (in a background thread) on a free loopback port."""
    from rnnserve.server.app import background_server
    from rnnserve.server.config import ServerConfig

    config = ServerConfig(repo=lm_repo, host="127.0.0.1", port=0, max_message_bytes=256 * 1024)
    with background_server(config) as server:
        yield f"127.0.0.1:{server.port}"


@pytest.fixture
def client(server_url: str) -> Iterator[object]:
    from rnnserve.client import Client

    with Client(server_url, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def cell_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with one small untrained LM per cell, named after the cell (random weights sample
    varied tokens), exported with the bundle's generation graphs."""
    import math

    import torch

    from rnnserve.export.onnx_export import export_checkpoint
    from rnnserve.training.model import ModelArgs, RNNLanguageModel
    from rnnserve.training.tokenizer import build_char_tokenizer
    from rnnserve.training.train import TrainConfig, save_checkpoint

    root = tmp_path_factory.mktemp("cells")
    tokenizer = build_char_tokenizer(CELL_TEXT)
    for cell in CELLS:
        run = root / cell
        run.mkdir()
        tokenizer.save(str(run / "tokenizer.json"))
        torch.manual_seed(1)
        args = ModelArgs(cell=cell, vocab_size=tokenizer.get_vocab_size(), embedding_size=8, hidden_size=16)
        model = RNNLanguageModel(args)
        metrics = {"val_loss": 2.0, "val_ppl": math.exp(2.0), "train_loss": 2.5, "epoch": 1}
        save_checkpoint(run / "checkpoint.pt", model, TrainConfig(cell=cell), metrics)
        export_checkpoint(run / "checkpoint.pt", root / "repo", cell)
    return root / "repo"
