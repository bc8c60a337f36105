"""A byte-level BPE language model end to end: trained on a train/valid split layout, exported, served, and
text streamed through the real client. The server needs no BPE code: the ByteLevel decoder travels in
tokenizer.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from rnnserve.client import Client

TRAIN = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n" * 40
VALID = "def mul(a, b):\n    return a * b\n\n\n" * 10
PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def bpe_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding `bpe`: an LSTM 1x32 over a 300-entry byte-level BPE, trained for a few steps."""
    from rnnserve.export.onnx_export import export_checkpoint
    from rnnserve.training.train import TrainConfig, train_language_model

    root = tmp_path_factory.mktemp("bpe")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text(TRAIN)
    (corpus / "valid.txt").write_text(VALID)
    config = TrainConfig(
        data=str(corpus),
        tokenizer="bpe",
        max_vocab=300,
        min_count=2,
        layers=1,
        hidden=32,
        emb=16,
        epochs=2,
        batch_size=4,
        bptt=16,
        max_steps_per_epoch=40,
        lr=1e-2,
        progress=False,
        plot=False,
        threads=1,
        out_dir=str(root / "run"),
    )
    repo = root / "repo"
    export_checkpoint(train_language_model(config), repo, "bpe")
    return repo


@pytest.fixture(scope="module")
def bpe_client(bpe_repo: Path) -> Iterator[Client]:
    """A real server on loopback serving `bpe_repo`, and a client for it."""
    from rnnserve.server.app import background_server
    from rnnserve.server.config import ServerConfig

    config = ServerConfig(repo=bpe_repo, host="127.0.0.1", port=0)
    with background_server(config) as server, Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        yield client


def _tokenizer(repo: Path) -> Tokenizer:
    return Tokenizer.from_file(str(repo / "bpe" / "1" / "tokenizer.json"))


def test_bundle_describes_a_byte_level_bpe(bpe_repo: Path) -> None:
    manifest = json.loads((bpe_repo / "bpe" / "1" / "manifest.json").read_text())
    assert manifest["tokenizer_kind"] == "bpe" and 258 < manifest["vocab_size"] <= 300  # + 256 bytes
    assert (
        json.loads((bpe_repo / "bpe" / "1" / "tokenizer.json").read_text())["decoder"]["type"] == "ByteLevel"
    )


def test_text_is_encoded_and_candidates_decoded_by_the_server(bpe_client: Client, bpe_repo: Path) -> None:
    tok = _tokenizer(bpe_repo)
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    assert len(ids) < len(PROMPT)  # merges, not bytes
    with bpe_client.session("bpe") as session:
        out = session.feed(PROMPT, top_k=5)
        assert out.position == len(ids) and out.token_ids == ids
        for candidate in out.top:  # decoded text: a space is " ", never the byte symbol "Ġ"
            assert candidate.text == tok.decode([candidate.id]) and "Ġ" not in candidate.text
        assert session.feed("\n").position == len(ids) + 1  # chunks append to the same state


def test_generated_text_streams_decoded_with_spaces_and_newlines(bpe_client: Client, bpe_repo: Path) -> None:
    tok = _tokenizer(bpe_repo)
    with bpe_client.session("bpe") as session:
        stream = session.generate(PROMPT, max_tokens=30, temperature=0.0, ignore_eos=True)
        tokens = list(stream)
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    generated = [t.id for t in tokens]
    expected = tok.decode(ids + generated)[len(tok.decode(ids)) :]
    assert "".join(t.text for t in tokens) == stream.text == expected
    assert "Ġ" not in stream.text and "Ċ" not in stream.text
    assert " " in stream.text or "\n" in stream.text  # the decoder restored whitespace
