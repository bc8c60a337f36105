"""SST-2 as shipped (../shared/data/sst-2): the loaders read it; a short run learns it (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rnnserve.training.classifier_data import display_names, load_labelled

pytestmark = pytest.mark.shared_data


def test_sst2_loads_with_its_two_text_column_names(shared_data: Path) -> None:
    sst = shared_data / "sst-2"
    texts, labels, raw = load_labelled(sst / "train.tsv")  # text column `sentence`
    assert len(texts) == 67_349 and raw == ["0", "1"] and display_names(raw) == ["negative", "positive"]
    assert 0.5 < sum(labels) / len(labels) < 0.6  # 55.8% positive
    dev_texts, dev_labels, _ = load_labelled(sst / "dev.tsv", label_names=raw)  # text column `content`
    assert len(dev_texts) == 872 and set(dev_labels) == {0, 1}
    assert all(t.strip() for t in texts[:1000] + dev_texts)


@pytest.mark.slow
def test_sst2_short_run_learns(shared_data: Path, tmp_path: Path) -> None:
    """A 2-epoch GRU on 16k SST-2 phrases (~10 s on 2 cores) is well above chance on the dev set."""
    from rnnserve.training.classifier_train import (
        ClassifierTrainConfig,
        load_classifier_checkpoint,
        train_classifier,
    )

    cfg = ClassifierTrainConfig(
        train=str(shared_data / "sst-2" / "train.tsv"), dev=str(shared_data / "sst-2" / "dev.tsv"),
        cell="gru", bidirectional=False, hidden=64, emb=64, epochs=2, max_train_examples=16000,
        threads=2, progress=False, out_dir=str(tmp_path),
    )  # fmt: skip
    _, _, ckpt = load_classifier_checkpoint(train_classifier(cfg))
    assert ckpt["metrics"]["dev_accuracy"] > 0.68
