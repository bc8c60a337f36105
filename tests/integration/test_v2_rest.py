"""The KServe V2 REST routes driven by `tritonclient.http` (in its own environment, v2_support.py)
against a real server with HTTP on, compared with the native API's answers in this process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support import SENTIMENT_TEXTS
from v2_support import run_client, triton_python

from rnnserve.client import Client

PROMPT = "def add(a, b):\n"


@pytest.fixture(scope="module")
def tc_python() -> Path:
    return triton_python()


@pytest.fixture(scope="module")
def http_server(lm_repo: Path, classifier_checkpoints: dict[str, Path]) -> Iterator[tuple[str, str]]:
    """A server with HTTP on: (gRPC target, HTTP host:port)."""
    from rnnserve.server.app import background_server
    from rnnserve.server.config import ServerConfig

    config = ServerConfig(repo=lm_repo, host="127.0.0.1", port=0, http_port=0)
    with background_server(config) as server:
        yield f"127.0.0.1:{server.port}", f"127.0.0.1:{server.http_port}"


@pytest.fixture
def native(http_server: tuple[str, str]) -> Iterator[Client]:
    with Client(http_server[0], timeout=30) as c:
        yield c


def test_health_and_metadata(tc_python: Path, http_server: tuple[str, str]) -> None:
    out = run_client(
        tc_python,
        """
        import tritonclient.http as h
        c = h.InferenceServerClient(ARGS["url"])
        print(json.dumps({
            "live": c.is_server_live(), "ready": c.is_server_ready(),
            "model_ready": c.is_model_ready("tiny"), "missing_ready": c.is_model_ready("nope"),
            "server": c.get_server_metadata(), "meta": c.get_model_metadata("tiny"),
            "config": c.get_model_config("tiny"), "index": c.get_model_repository_index(),
        }))
        """,
        url=http_server[1],
    )
    assert out["live"] and out["ready"] and out["model_ready"] and not out["missing_ready"]
    assert out["server"]["name"] == "rnnserve"
    assert {"name": "INPUT_IDS", "datatype": "INT64", "shape": [1, -1]} in out["meta"]["inputs"]
    assert out["config"]["name"] == "tiny" and out["config"]["model_transaction_policy"]["decoupled"]
    assert {m["name"] for m in out["index"]} >= {"tiny", "bi", "live"}


def test_a_sequence_over_rest_gives_the_native_logprobs_json_and_binary(
    tc_python: Path, http_server: tuple[str, str], native: Client
) -> None:
    ids: list[int] = []
    expected = []
    with native.session("tiny") as s:
        for ch in PROMPT[:5]:
            fed = s.feed(ch, top_k=20)
            ids.extend(fed.token_ids)
            expected.append({c.id: c.logprob for c in fed.top})
    out = run_client(
        tc_python,
        """
        import numpy as np
        import tritonclient.http as h
        c = h.InferenceServerClient(ARGS["url"])
        rows = []
        for i, token in enumerate(ARGS["ids"]):
            inp = h.InferInput("INPUT_IDS", [1, 1], "INT64")
            inp.set_data_from_numpy(np.array([[token]], dtype=np.int64), binary_data=i % 2 == 0)
            want = [h.InferRequestedOutput("LOGPROBS", binary_data=i % 2 == 1)]
            r = c.infer("tiny", [inp], outputs=want, sequence_id="rest-seq", sequence_start=i == 0,
                        sequence_end=i == len(ARGS["ids"]) - 1)
            rows.append(r.as_numpy("LOGPROBS")[0].tolist())
        try:
            c.infer("tiny", [inp], sequence_id="rest-seq")
            error = None
        except Exception as e:
            error = [str(e.status()), e.message()]
        print(json.dumps({"rows": rows, "error": error}))
        """,
        url=http_server[1],
        ids=ids,
    )
    for row, want in zip(out["rows"], expected, strict=True):
        for token_id, logprob in want.items():
            assert row[token_id] == pytest.approx(logprob, abs=1e-5)
    assert out["error"][0] == "400" and "sequence rest-seq" in out["error"][1]


def test_generation_and_a_classifier_batch_over_rest(
    tc_python: Path, http_server: tuple[str, str], native: Client
) -> None:
    with native.session("tiny") as s:
        tokens = [t.id for t in s.generate(PROMPT, max_tokens=10, temperature=1.0, seed=3, ignore_eos=True)]
    classified = native.classify("bi", SENTIMENT_TEXTS)
    out = run_client(
        tc_python,
        """
        import numpy as np
        import tritonclient.http as h
        c = h.InferenceServerClient(ARGS["url"])
        text = h.InferInput("TEXT", [1], "BYTES")
        text.set_data_from_numpy(np.array([ARGS["prompt"].encode()], dtype=np.object_), binary_data=False)
        r = c.infer("tiny", [text], parameters={"generate": True, "max_tokens": 10, "temperature": 1.0,
                                                "seed": 3, "ignore_eos": True})
        texts = h.InferInput("TEXT", [len(ARGS["texts"])], "BYTES")
        texts.set_data_from_numpy(np.array([t.encode() for t in ARGS["texts"]], dtype=np.object_))
        k = c.infer("bi", [texts])
        tokens = r.as_numpy("TOKEN_IDS")[0].tolist()
        print(json.dumps({"tokens": tokens, "probs": k.as_numpy("PROBS").tolist()}))
        """,
        url=http_server[1],
        prompt=PROMPT,
        texts=SENTIMENT_TEXTS,
    )
    assert out["tokens"] == tokens
    np.testing.assert_allclose(out["probs"], [r.probs for r in classified], atol=1e-6)
