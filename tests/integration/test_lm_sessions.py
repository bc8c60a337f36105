"""A real server on loopback, the real client: sessions keep state across messages and streams."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from rnnserve.client import Client, FeedOutput
from rnnserve.export.manifest import read_manifest
from rnnserve.server.runtime import OnnxModel
from rnnserve.server.sampling import log_softmax
from rnnserve.server.text import TextCodec

TEXT = "def add(a, b):\n    return a"


def same_output(a: FeedOutput, b: FeedOutput) -> None:
    assert a.position == b.position
    assert [c.id for c in a.top] == [c.id for c in b.top]
    np.testing.assert_allclose([c.logprob for c in a.top], [c.logprob for c in b.top], atol=1e-5)


def test_models_are_listed_with_their_metadata(client: Client) -> None:
    (model,) = [m for m in client.models() if m.name == "tiny"]
    assert (model.task, model.cell, model.num_layers, model.hidden_size) == ("lm", "lstm", 2, 32)
    assert model.latest and model.version == "1"
    assert model.special_tokens == {"unk": 0, "eos": 1}
    assert model.provider == "CPUExecutionProvider"
    assert "val_ppl" in model.metrics


def test_feeding_in_pieces_equals_feeding_whole(client: Client) -> None:
    with client.session("tiny") as whole, client.session("tiny") as pieces:
        expected = whole.feed(TEXT)
        for piece in ["de", "f add(a", ", b):\n", "    return a"]:
            got = pieces.feed(piece)
        same_output(expected, got)
        assert got.position == len(TEXT)


def test_state_carries_across_two_streams_of_one_session(client: Client, server_url: str) -> None:
    with client.session("tiny") as reference:
        expected = reference.feed(TEXT)
    with client.session("tiny") as first:
        first.feed(TEXT[:10])
        with Client(server_url) as other:  # another connection, another Stream call, same session
            second = other.attach(first.id)
            assert second.position == 10
            got = second.feed(TEXT[10:])
        same_output(expected, got)
        assert first.info().position == len(TEXT)


def test_token_ids_and_text_are_the_same_input(client: Client, lm_repo: Path) -> None:
    bundle = lm_repo / "tiny" / "1"
    codec = TextCodec.from_file(bundle / "tokenizer.json", {"unk": 0, "eos": 1})
    with client.session("tiny") as by_text, client.session("tiny") as by_ids:
        same_output(by_text.feed(TEXT), by_ids.feed(codec.encode(TEXT)))


def test_outputs_match_onnx_runtime_run_directly(client: Client, lm_repo: Path) -> None:
    bundle = lm_repo / "tiny" / "1"
    model = OnnxModel(bundle, read_manifest(bundle))
    codec = TextCodec.from_file(bundle / "tokenizer.json", model.manifest.special_tokens)
    ids = codec.encode(TEXT)
    outputs, _ = model.run(np.array([ids], dtype=np.int64), model.initial_state(1))
    logits = outputs["logits"]
    logprobs = log_softmax(logits[0])  # [seq, vocab]
    with client.session("tiny") as session:
        out = session.feed(ids, top_k=3, token_logprobs=True)
    assert np.isnan(out.token_logprobs[0])  # nothing predicted the first token of a session
    np.testing.assert_allclose(out.token_logprobs[1:], logprobs[np.arange(len(ids) - 1), ids[1:]], atol=1e-5)
    assert [c.id for c in out.top] == list(np.argsort(-logprobs[-1])[:3])


def test_concurrent_sessions_give_the_same_results_as_each_alone(client: Client) -> None:
    texts = [f"def f{i}(x):\n    return x + {i}" * (1 + i % 3) for i in range(12)]

    def run(text: str) -> FeedOutput:
        with client.session("tiny") as session:
            for start in range(0, len(text), 7):
                out = session.feed(text[start : start + 7])
            return out

    alone = [run(t) for t in texts]
    with ThreadPoolExecutor(max_workers=12) as pool:
        together = list(pool.map(run, texts))
    for a, b in zip(alone, together, strict=True):
        same_output(a, b)


def test_retry_of_the_last_message_is_answered_without_applying_it_twice(client: Client) -> None:
    with client.session("tiny") as session:
        first = session.feed("def ", expected_position=0)
        again = session.feed("def ", expected_position=0)
        assert again.replayed and not first.replayed
        assert again.position == first.position == 4
        same_output(first, again)
        assert session.info().position == 4


def test_session_info_and_close(client: Client) -> None:
    session = client.session("tiny", ttl_seconds=60)
    info = session.info()
    assert info.ttl_seconds == 60 and info.expires_at > info.created_at
    session.feed("abc")
    session.close()
    with pytest.raises(Exception, match="does not exist"):
        client.attach(session.id)
