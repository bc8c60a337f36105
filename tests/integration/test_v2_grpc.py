"""The Open Inference Protocol (KServe V2, Triton's gRPC flavour) driven by `tritonclient` itself, in a
virtual environment of its own (v2_support.py), against a real server; its answers are compared with
the native API's in this process."""

from __future__ import annotations

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


def test_health_and_metadata_answer_as_tritonclient_expects(tc_python: Path, server_url: str) -> None:
    out = run_client(
        tc_python,
        """
        import tritonclient.grpc as g
        c = g.InferenceServerClient(ARGS["url"])
        meta = c.get_model_metadata("tiny", as_json=True)
        config = c.get_model_config("tiny", as_json=True)["config"]
        bi = c.get_model_config("bi", as_json=True)["config"]
        print(json.dumps({
            "live": c.is_server_live(), "ready": c.is_server_ready(),
            "model_ready": c.is_model_ready("tiny"), "missing_ready": c.is_model_ready("nope"),
            "server": c.get_server_metadata(as_json=True),
            "inputs": [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]],
            "outputs": [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]],
            "versions": meta["versions"],
            "decoupled": config.get("model_transaction_policy", {}).get("decoupled", False),
            "sequence": "sequence_batching" in config, "bi_sequence": "sequence_batching" in bi,
        }))
        """,
        url=server_url,
    )
    assert out["live"] and out["ready"] and out["model_ready"]
    assert not out["missing_ready"]
    assert out["server"]["name"] == "rnnserve" and "sequence" in out["server"]["extensions"]
    assert ["INPUT_IDS", "INT64", ["1", "-1"]] in out["inputs"]
    assert ["TEXT", "BYTES", ["1"]] in out["inputs"]
    assert [o[0] for o in out["outputs"]][:2] == ["LOGPROBS", "TOKEN_IDS"]
    assert out["versions"]
    assert out["decoupled"] and out["sequence"] and not out["bi_sequence"]


SEQUENCE_SCRIPT = """
import numpy as np
import tritonclient.grpc as g
c = g.InferenceServerClient(ARGS["url"])
ids = ARGS["ids"]
rows = []
for i, token in enumerate(ids):
    inp = g.InferInput("INPUT_IDS", [1, 1], "INT64")
    inp.set_data_from_numpy(np.array([[token]], dtype=np.int64))
    r = c.infer("tiny", [inp], sequence_id=ARGS["seq"], sequence_start=i == 0,
                sequence_end=i == len(ids) - 1)
    rows.append(r.as_numpy("LOGPROBS")[0].tolist())
text = g.InferInput("TEXT", [1], "BYTES")
text.set_data_from_numpy(np.array([ARGS["text"].encode()], dtype=np.object_))
r = c.infer("tiny", [text], sequence_id="text-seq", sequence_start=True, sequence_end=True)
print(json.dumps({"rows": rows, "text_ids": r.as_numpy("TOKEN_IDS")[0].tolist(),
                  "text_logprobs": r.as_numpy("LOGPROBS")[0].tolist()}))
"""


def test_a_sequence_of_single_tokens_gives_the_native_next_token_logprobs(
    tc_python: Path, server_url: str, client: Client
) -> None:
    ids: list[int] = []
    native = []
    with client.session("tiny") as s:
        for ch in PROMPT[:6]:
            out = s.feed(ch, top_k=20)
            ids.extend(out.token_ids)
            native.append({c.id: c.logprob for c in out.top})
    assert len(ids) == 6  # one token a character
    out = run_client(tc_python, SEQUENCE_SCRIPT, url=server_url, ids=ids, seq=77, text=PROMPT)
    assert len(out["rows"]) == len(native) == 6
    for row, expected in zip(out["rows"], native, strict=True):
        for token_id, logprob in expected.items():
            assert row[token_id] == pytest.approx(logprob, abs=1e-5)
    with client.session("tiny") as s:
        whole = s.feed(PROMPT, top_k=20)
    assert out["text_ids"] == list(whole.token_ids)
    for c in whole.top:
        assert out["text_logprobs"][c.id] == pytest.approx(c.logprob, abs=1e-5)


STREAM_SCRIPT = """
import queue
import numpy as np
import tritonclient.grpc as g
results = queue.Queue()
c = g.InferenceServerClient(ARGS["url"])
c.start_stream(callback=lambda result, error: results.put((result, error)))
text = g.InferInput("TEXT", [1], "BYTES")
text.set_data_from_numpy(np.array([ARGS["prompt"].encode()], dtype=np.object_))
c.async_stream_infer("tiny", [text], request_id="gen-1", enable_empty_final_response=True,
                     parameters={"generate": True, "max_tokens": ARGS["max_tokens"], "temperature": 1.0,
                                 "seed": ARGS["seed"], "ignore_eos": True})
tokens, texts, finals = [], [], 0
while True:
    result, error = results.get(timeout=60)
    assert error is None, error
    response = result.get_response()
    final = response.parameters["triton_final_response"].bool_param
    if response.outputs:
        tokens.extend(result.as_numpy("TOKEN_IDS")[0].tolist())
        texts.append(result.as_numpy("TEXT")[0].decode())
        assert response.id == "gen-1"
    if final:
        break
# an error answers its request on the stream, which goes on
ids = g.InferInput("INPUT_IDS", [1, 1], "INT64")
ids.set_data_from_numpy(np.array([[1]], dtype=np.int64))
c.async_stream_infer("tiny", [ids], sequence_id=4242, sequence_start=False)
_, error = results.get(timeout=60)
c.async_stream_infer("tiny", [ids])
result, after = results.get(timeout=60)
c.stop_stream()
print(json.dumps({"tokens": tokens, "text": "".join(texts), "error": str(error),
                  "after": after is None and result.as_numpy("LOGPROBS").shape[1]}))
"""


def test_a_decoupled_generation_gives_the_native_tokens_for_the_same_seed(
    tc_python: Path, server_url: str, client: Client
) -> None:
    with client.session("tiny") as s:
        native = list(s.generate(PROMPT, max_tokens=25, temperature=1.0, seed=31, ignore_eos=True))
    out = run_client(tc_python, STREAM_SCRIPT, url=server_url, prompt=PROMPT, max_tokens=25, seed=31)
    assert out["tokens"] == [t.id for t in native]
    assert out["text"] == "".join(t.text for t in native)
    assert "sequence 4242" in out["error"] and "START" in out["error"]
    assert out["after"]  # the stream went on after the error


def test_unary_generation_returns_all_tokens_in_one_response(
    tc_python: Path, server_url: str, client: Client
) -> None:
    with client.session("tiny") as s:
        native = [t.id for t in s.generate(PROMPT, max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)]
    out = run_client(
        tc_python,
        """
        import numpy as np
        import tritonclient.grpc as g
        c = g.InferenceServerClient(ARGS["url"])
        text = g.InferInput("TEXT", [1], "BYTES")
        text.set_data_from_numpy(np.array([ARGS["prompt"].encode()], dtype=np.object_))
        n = g.InferInput("MAX_TOKENS", [1], "INT32")
        n.set_data_from_numpy(np.array([12], dtype=np.int32))
        r = c.infer("tiny", [text, n], parameters={"temperature": 1.0, "seed": 5, "ignore_eos": True})
        print(json.dumps(r.as_numpy("TOKEN_IDS")[0].tolist()))
        """,
        url=server_url,
        prompt=PROMPT,
    )
    assert out == native


def test_a_whole_text_classifier_answers_a_batch(tc_python: Path, server_url: str, client: Client) -> None:
    native = client.classify("bi", SENTIMENT_TEXTS)
    out = run_client(
        tc_python,
        """
        import numpy as np
        import tritonclient.grpc as g
        c = g.InferenceServerClient(ARGS["url"])
        texts = g.InferInput("TEXT", [len(ARGS["texts"])], "BYTES")
        texts.set_data_from_numpy(np.array([t.encode() for t in ARGS["texts"]], dtype=np.object_))
        r = c.infer("bi", [texts])
        print(json.dumps({"probs": r.as_numpy("PROBS").tolist(),
                          "labels": [b.decode() for b in r.as_numpy("LABEL")]}))
        """,
        url=server_url,
        texts=SENTIMENT_TEXTS,
    )
    assert out["labels"] == [r.label for r in native]
    np.testing.assert_allclose(out["probs"], [r.probs for r in native], atol=1e-6)


def test_errors_carry_the_native_messages_and_statuses(tc_python: Path, server_url: str) -> None:
    out = run_client(
        tc_python,
        """
        import numpy as np
        import tritonclient.grpc as g
        from tritonclient.utils import InferenceServerException
        c = g.InferenceServerClient(ARGS["url"])
        ids = g.InferInput("INPUT_IDS", [1, 1], "INT64")
        ids.set_data_from_numpy(np.array([[1]], dtype=np.int64))
        big = g.InferInput("INPUT_IDS", [1, 1], "INT64")
        big.set_data_from_numpy(np.array([[10**9]], dtype=np.int64))
        errors = {}
        for name, call in [
            ("unknown_sequence", lambda: c.infer("tiny", [ids], sequence_id=991, sequence_start=False)),
            ("unknown_model", lambda: c.infer("nope", [ids])),
            ("bad_token", lambda: c.infer("tiny", [big])),
            ("bi_sequence", lambda: c.infer("bi", [ids], sequence_id=5, sequence_start=True)),
        ]:
            try:
                call()
                errors[name] = None
            except InferenceServerException as e:
                errors[name] = [e.status(), e.message()]
        print(json.dumps(errors))
        """,
        url=server_url,
    )
    assert out["unknown_sequence"][0] == "StatusCode.INVALID_ARGUMENT"
    assert "sequence 991" in out["unknown_sequence"][1] and "START" in out["unknown_sequence"][1]
    assert out["unknown_model"][0] == "StatusCode.NOT_FOUND" and "nope" in out["unknown_model"][1]
    assert out["bad_token"][0] == "StatusCode.INVALID_ARGUMENT"
    assert out["bi_sequence"][0] == "StatusCode.FAILED_PRECONDITION"


def test_authentication_applies_to_the_v2_service(tc_python: Path, lm_repo: Path, tmp_path: Path) -> None:
    from rnnserve.server.app import background_server
    from rnnserve.server.auth import hash_token
    from rnnserve.server.config import ServerConfig

    tokens = {"alice": "tok-alice-v2", "bob": "tok-bob-v2", "carol": "tok-carol-v2"}
    models = {"alice": '["*"]', "bob": '["*"]', "carol": '["other"]'}
    (tmp_path / "tokens.toml").write_text(
        "".join(
            f'[[token]]\nname = "{n}"\nsha256 = "{hash_token(t)}"\nmodels = {models[n]}\n'
            for n, t in tokens.items()
        )
    )
    config = ServerConfig(repo=lm_repo, host="127.0.0.1", port=0, auth_tokens=tmp_path / "tokens.toml")
    with background_server(config) as server:
        out = run_client(
            tc_python,
            """
            import numpy as np
            import tritonclient.grpc as g
            from tritonclient.utils import InferenceServerException
            c = g.InferenceServerClient(ARGS["url"])
            ids = g.InferInput("INPUT_IDS", [1, 1], "INT64")
            ids.set_data_from_numpy(np.array([[1]], dtype=np.int64))
            def who(name):
                return {"authorization": "Bearer " + ARGS["tokens"][name]}
            def status(call):
                try:
                    call()
                    return "OK"
                except InferenceServerException as e:
                    return e.status()
            print(json.dumps({
                "none": status(lambda: c.infer("tiny", [ids])),
                "carol": status(lambda: c.infer("tiny", [ids], headers=who("carol"))),
                "alice": status(lambda: c.infer("tiny", [ids], headers=who("alice"), sequence_id=9,
                                                sequence_start=True)),
                "bob_in_alices_sequence": status(lambda: c.infer("tiny", [ids], headers=who("bob"),
                                                                 sequence_id=9)),
                "alice_again": status(lambda: c.infer("tiny", [ids], headers=who("alice"), sequence_id=9,
                                                      sequence_end=True)),
            }))
            """,
            url=f"127.0.0.1:{server.port}",
            tokens=tokens,
        )
    assert out == {
        "none": "StatusCode.UNAUTHENTICATED",
        "carol": "StatusCode.PERMISSION_DENIED",
        "alice": "OK",
        "bob_in_alices_sequence": "StatusCode.INVALID_ARGUMENT",
        "alice_again": "OK",
    }
