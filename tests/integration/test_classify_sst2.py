"""On real data: a classifier trained on part of SST-2 answers through the server exactly as PyTorch does."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from rnnserve.client import Client

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def sst2_bundle(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from rnnserve.export.onnx_export import export_checkpoint
    from rnnserve.training.classifier_train import train_classifier
    from rnnserve.training.config import ClassifierTrainConfig

    root = tmp_path_factory.mktemp("sst2")
    config = ClassifierTrainConfig(
        train=str(shared_data / "sst-2" / "train.tsv"),
        dev=str(shared_data / "sst-2" / "dev.tsv"),
        max_train_examples=4000,
        cell="gru",
        bidirectional=False,
        layers=1,
        hidden=64,
        emb=64,
        epochs=1,
        threads=2,
        progress=False,
        out_dir=str(root / "run"),
    )
    checkpoint = train_classifier(config)
    export_checkpoint(checkpoint, root / "repo", "sst2")
    return checkpoint, root / "repo"


def dev_sample(shared_data: Path, n: int = 64) -> list[str]:
    with (shared_data / "sst-2" / "dev.tsv").open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [row["content"] for row in rows[:n]]


def test_server_matches_pytorch_on_sst2_dev(shared_data: Path, sst2_bundle: tuple[Path, Path]) -> None:
    from rnnserve.server.app import background_server
    from rnnserve.server.config import ServerConfig
    from rnnserve.training.classifier_train import load_classifier_checkpoint, predict_proba

    checkpoint, repo = sst2_bundle
    texts = dev_sample(shared_data)
    model, tokenizer, _ = load_classifier_checkpoint(checkpoint)
    expected = np.asarray(predict_proba(model, tokenizer, texts))
    with (
        background_server(ServerConfig(repo=repo, port=0)) as server,
        Client(f"127.0.0.1:{server.port}") as client,
    ):
        results = client.classify("sst2", texts)
        np.testing.assert_allclose([r.probs for r in results], expected, atol=1e-4)
        assert [r.label_id for r in results] == list(expected.argmax(axis=1))
        # ...and following a review as it is typed ends where the whole-text answer is.
        with client.session("sst2") as session:
            for word in texts[0].split():
                live = session.feed(word + " ").classification
        assert live is not None
        np.testing.assert_allclose(live.probs, expected[0], atol=1e-4)
