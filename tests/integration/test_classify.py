"""Classifiers through the real server: Classify equals PyTorch, live sentiment equals whole-text results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import SENTIMENT_TEXTS

from rnnserve.client import Client, FailedPreconditionError, InvalidArgumentError

TEXTS = SENTIMENT_TEXTS


def pytorch_probs(checkpoint: Path, texts: list[str]) -> np.ndarray:
    from rnnserve.training.classifier_train import load_classifier_checkpoint, predict_proba

    model, tokenizer, _ = load_classifier_checkpoint(checkpoint)
    return np.asarray(predict_proba(model, tokenizer, texts))


def test_classifiers_are_listed_with_labels_and_mode(client: Client) -> None:
    models = {m.name: m for m in client.models()}
    assert models["live"].task == "classifier" and models["live"].classifier_mode == "streaming"
    assert models["live"].streams and models["live"].num_directions == 1
    assert models["bi"].classifier_mode == "whole" and not models["bi"].streams
    assert models["bi"].num_directions == 2 and models["bi"].pooling == "max"
    assert len(models["live"].labels) == 2
    assert "dev_accuracy" in models["live"].metrics


@pytest.mark.parametrize("name", ["live", "bi"])
def test_classify_equals_the_pytorch_model(
    client: Client, classifier_checkpoints: dict[str, Path], name: str
) -> None:
    results = client.classify(name, TEXTS)
    expected = pytorch_probs(classifier_checkpoints[name], TEXTS)
    got = np.array([r.probs for r in results])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert [r.label_id for r in results] == list(expected.argmax(axis=1))
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["live", "bi"])
def test_a_batch_equals_each_text_alone(client: Client, name: str) -> None:
    together = [r.probs for r in client.classify(name, TEXTS)]
    alone = [client.classify(name, [t])[0].probs for t in TEXTS]
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_whole_text_classify_runs_as_a_batch_of_the_models_scheduler(client: Client) -> None:
    """Classify on `bi` is one run of its scheduler (5 texts, classify_batch 64), in the model's metrics
    (the server runs in this process: same registry)."""
    from prometheus_client import REGISTRY

    version = {m.name: m for m in client.models()}["bi"].version
    labels = {"model": f"bi@{version}"}

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    names = ["rnnserve_batch_size_count", "rnnserve_batch_size_sum", "rnnserve_queue_wait_seconds_count"]
    before = [sample(n) for n in names]
    client.classify("bi", TEXTS)
    assert [sample(n) - b for n, b in zip(names, before, strict=True)] == [1, len(TEXTS), 1]


def test_live_sentiment_equals_the_whole_text_result_at_every_prefix(client: Client) -> None:
    text = TEXTS[-1]
    with client.session("live") as session:
        assert session.task == "classifier" and len(session.labels) == 2
        ids = session.feed(text).token_ids  # how the model tokenizes it
    with client.session("live") as session:
        running = [session.feed([token]).classification for token in ids]
    prefixes = client.classify("live", [ids[: i + 1] for i in range(len(ids))])
    for live, whole in zip(running, prefixes, strict=True):
        assert live is not None
        np.testing.assert_allclose(live.probs, whole.probs, atol=1e-5)
        assert live.label == whole.label


def test_any_split_into_messages_gives_the_same_probabilities(client: Client) -> None:
    words = TEXTS[0].split()
    with client.session("live") as whole, client.session("live") as pieces:
        expected = whole.feed(TEXTS[0]).classification
        for i in range(0, len(words), 2):
            got = pieces.feed(" ".join(words[i : i + 2])).classification
    assert expected is not None and got is not None
    np.testing.assert_allclose(got.probs, expected.probs, atol=1e-5)
    assert got.prob(got.label) == max(got.probs)


def test_bidirectional_model_refuses_to_stream_and_says_why(client: Client) -> None:
    with pytest.raises(FailedPreconditionError, match=r"bidirectional classifier.*use Classify"):
        client.session("bi")


def test_wrong_task_and_bad_input(client: Client) -> None:
    with pytest.raises(FailedPreconditionError, match="Classify needs a classifier"):
        client.classify("tiny", ["hello"])
    with client.session("live") as session:
        with pytest.raises(FailedPreconditionError, match="Generate needs a language model"):
            list(session.generate(max_tokens=3))
        with pytest.raises(InvalidArgumentError, match="return_token_logprobs needs a language model"):
            session.feed("fun", token_logprobs=True)
        assert session.info().position == 0
    with pytest.raises(InvalidArgumentError, match="between 1 and"):
        client.classify("live", [])
    with pytest.raises(InvalidArgumentError, match=r"text 1 is empty"):
        client.classify("bi", ["good", ""])
    with pytest.raises(InvalidArgumentError, match="out of range"):
        client.classify("bi", [[1, 2], [10**7]])


def test_classify_command(client: Client, server_url: str) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnserve",
            "classify",
            "--url",
            server_url,
            "--model",
            "bi",
            *TEXTS[:2],
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = out.stdout.strip().splitlines()
    expected = client.classify("bi", TEXTS[:2])
    assert [line.split("\t")[0] for line in lines] == [r.label for r in expected]
    assert lines[0].endswith(TEXTS[0])
