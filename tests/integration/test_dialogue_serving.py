"""Dialogue sessions through the real server and the real client (docs/dialogue.md, "Serving").

A tiny random-weight dialogue bundle (tests/dialogue_bundle.py) served beside the tiny LM and a streaming
classifier: say/reply, the served conversation against the bundle's step graph run token by token (the
fused stream step), same seed => same reply alone and batched, fork, exactly-once retries of a reply
cut anywhere, bad input, and `rnnserve chat` over piped stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from dialogue_bundle import make_dialogue_bundle, make_dialogue_checkpoint
from support import HeldRuns, wait_for

from rnnserve.client import AsyncClient, Client
from rnnserve.client.errors import FailedPreconditionError, InvalidArgumentError
from rnnserve.export.manifest import read_manifest
from rnnserve.server.app import RnnServeServer, background_server
from rnnserve.server.config import ServerConfig
from rnnserve.server.errors import NotFound
from rnnserve.server.runtime import OnnxModel
from rnnserve.server.sampling import Sampler, SamplingParams
from rnnserve.server.sessions import AppliedGeneration
from rnnserve.server.tasks import DialogueTask
from rnnserve.v1 import rnnserve_pb2 as pb

MODEL = "chat"
EOS = 1
# A conversation as token ids (ids >= 2: no <unk>, no <eos>), turn by turn.
TURNS = [[5, 9, 12, 7], [3, 3, 8], [10, 4, 6, 11, 2], [7]]


@pytest.fixture(scope="module")
def dialogue_repo(
    tmp_path_factory: pytest.TempPathFactory, lm_repo: Path, classifier_checkpoints: dict[str, Path]
) -> Path:
    """The dialogue bundle `chat`, with the tiny LM `tiny` and the streaming classifier `live` beside it."""
    repo = tmp_path_factory.mktemp("dialogue_repo")
    make_dialogue_bundle(repo, name=MODEL, cell="lstm", seed=0)
    for name in ("tiny", "live"):
        shutil.copytree(lm_repo / name, repo / name)
    return repo


@pytest.fixture(scope="module")
def server(dialogue_repo: Path) -> Iterator[RnnServeServer]:
    # inline_max_tokens=0: every run goes through the ORT worker, where HeldRuns holds them.
    config = ServerConfig(repo=dialogue_repo, host="127.0.0.1", port=0, inline_max_tokens=0)
    with background_server(config) as served:
        yield served


@pytest.fixture
def chat(server: RnnServeServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference(dialogue_repo: Path) -> OnnxModel:
    """The bundle's served graphs, run directly (no server): the reference stream step."""
    bundle = next(p for p in (dialogue_repo / MODEL).iterdir() if (p / "manifest.json").is_file())
    return OnnxModel(bundle, read_manifest(bundle))


def reference_positions(model: OnnxModel, ids: list[int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The fused stream step token by token from a fresh state: (logprobs [seq, vocab] after each token,
    the state) — what `DialogueModel.stream` computes, through the bundle's own step graph (its turn
    graph for <eos>)."""
    state = model.initial_state(1)
    logits = []
    for token in ids:
        tokens = np.array([[token]], dtype=np.int64)  # [1, 1]
        outputs, state = model.run(tokens, state, turn=model.ends_turn(token))
        logits.append(outputs["logits"][0, -1])  # [vocab]
    shifted = np.stack(logits) - np.max(logits, axis=-1, keepdims=True)  # [seq, vocab]
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True)), state


def reference_stream(model: OnnxModel, ids: list[int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(logprobs [vocab] after the last token, the state): see reference_positions."""
    logprobs, state = reference_positions(model, ids)
    return logprobs[-1], state


def torch_stream_logprobs(tmp_path: Path, ids: list[int]) -> np.ndarray:
    """`DialogueModel.stream` of the whole conversation (the training model, rebuilt from the bundle's
    seed): log-probabilities [vocab] of the token after `ids`."""
    import torch

    from rnnserve.training.dialogue_checkpoint import load_dialogue_checkpoint

    model, _, _ = load_dialogue_checkpoint(make_dialogue_checkpoint(tmp_path, "lstm", seed=0))
    with torch.no_grad():
        logits, _ = model.eval().stream(torch.tensor([ids]))  # (1, seq, vocab)
    return torch.log_softmax(logits[0, -1], dim=-1).numpy()


def snapshot_state(snapshot: bytes) -> dict[str, np.ndarray]:
    parsed = pb.SessionSnapshot()
    parsed.ParseFromString(snapshot)
    return {t.name: np.frombuffer(t.data, dtype="<f4").reshape(tuple(t.shape)) for t in parsed.state}


def stream_of(turns: list[list[int]]) -> list[int]:
    return [t for turn in turns for t in (*turn, EOS)]


def test_the_bundle_is_served_as_a_dialogue_model(chat: Client, server: RnnServeServer) -> None:
    info = next(m for m in chat.models() if m.name == MODEL)
    assert info.task == "dialogue" and info.special_tokens["eos"] == EOS
    runtime = next(s.runner.model for k, s in server.engine.schedulers.items() if k.startswith(f"{MODEL}@"))
    assert runtime.last is not None  # the "last" graph: a step's vocabulary projection at its end only
    assert runtime.generate == {} and runtime.default_generate_steps == 0  # no K-step graphs: host sampling


def test_say_then_reply_round_trip(chat: Client) -> None:
    with chat.session(MODEL) as session:
        said = session.say(TURNS[0])
        assert said.token_ids == [*TURNS[0], EOS] and said.position == len(TURNS[0]) + 1
        assert len(said.top) == 5  # the first token of the next turn
        reply = session.reply(max_tokens=6, temperature=1.0, seed=3)
        tokens = list(reply)
        assert tokens[-1].id == EOS and tokens[-1].text == "" and reply.finish_reason
        assert EOS not in [t.id for t in tokens[:-1]]  # a sampled <eos> ends it
        assert len(tokens) <= 7  # at most max_tokens sampled, then the <eos> that closes the turn
        assert [t.position for t in tokens] == list(range(said.position + 1, said.position + 1 + len(tokens)))
        assert session.position == session.info().position == said.position + len(tokens)
        text_said = session.say("hello")  # text turns too (the bundle's tokenizer)
        assert text_said.token_ids[-1] == EOS and text_said.position == session.position


def test_conversation_turn_by_turn_equals_the_stream_step(
    chat: Client, reference: OnnxModel, tmp_path: Path
) -> None:
    """Said turn by turn, or all at once with <eos> inside one message (cut after each <eos>: the step
    graph gives another state for a row with <eos> inside), the served session ends where the reference
    step graph run token by token ends (state and next token), and where `DialogueModel.stream` ends."""
    expected_logprobs, expected_state = reference_stream(reference, stream_of(TURNS))
    np.testing.assert_allclose(
        expected_logprobs, torch_stream_logprobs(tmp_path, stream_of(TURNS)), atol=1e-4
    )
    best = [int(i) for i in np.argsort(-expected_logprobs)[:5]]
    with chat.session(MODEL) as by_turn, chat.session(MODEL) as at_once:
        for turn in TURNS:
            out = by_turn.say(turn, top_k=5)
        whole = at_once.feed(
            stream_of(TURNS), top_k=5, token_logprobs=True
        )  # the step graph's every position
        positions, _ = reference_positions(reference, stream_of(TURNS))
        predicted = [positions[i - 1][t] for i, t in enumerate(stream_of(TURNS)) if i]  # by the one before
        assert np.isnan(whole.token_logprobs[0])
        np.testing.assert_allclose(whole.token_logprobs[1:], predicted, rtol=1e-4, atol=1e-4)
        for session, last in ((by_turn, out), (at_once, whole)):
            assert [c.id for c in last.top] == best
            np.testing.assert_allclose(
                [c.logprob for c in last.top], expected_logprobs[best], rtol=1e-4, atol=1e-4
            )
            state = snapshot_state(session.export())
            assert set(state) == set(expected_state)
            for name, value in expected_state.items():
                np.testing.assert_allclose(state[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_a_reply_is_the_model_turn_and_say_continues_after_it(chat: Client, reference: OnnxModel) -> None:
    with chat.session(MODEL) as session:
        session.say(TURNS[0])
        reply = [t.id for t in session.reply(max_tokens=5, temperature=1.0, seed=8)]
        out = session.say(TURNS[1])
        assert out.position == len(TURNS[0]) + 1 + len(reply) + len(TURNS[1]) + 1
        conversation = [*TURNS[0], EOS, *reply, *TURNS[1], EOS]
        expected_logprobs, expected_state = reference_stream(reference, conversation)
        assert out.top[0].id == int(np.argmax(expected_logprobs))
        state = snapshot_state(session.export())
        for name, value in expected_state.items():
            np.testing.assert_allclose(state[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_a_reply_that_samples_eos_is_not_closed_twice(chat: Client, reference: OnnxModel) -> None:
    """A reply whose first sampled token is <eos> (a seed found with the server's own sampler on the
    reference distribution) ends there, closed by that <eos>: none is appended after it."""
    logprobs, _ = reference_stream(reference, [*TURNS[0], EOS])
    seed = next(
        s for s in range(100_000) if Sampler(SamplingParams(temperature=1.0, seed=s)).choose(logprobs) == EOS
    )
    with chat.session(MODEL) as session:
        said = session.say(TURNS[0])
        reply = session.reply(max_tokens=4, temperature=1.0, seed=seed)
        assert [t.id for t in reply] == [EOS] and reply.finish_reason == "eos"
        assert session.info().position == said.position + 1


def dialogue(client: Client, turns: list[list[int]], seed: int) -> list[list[int]]:
    """Say each turn and take a seeded reply: the replies' tokens."""
    replies = []
    with client.session(MODEL) as session:
        for turn in turns:
            session.say(turn)
            replies.append([t.id for t in session.reply(max_tokens=8, temperature=1.0, seed=seed)])
    return replies


def saying(server: RnnServeServer) -> int:
    """Dialogue sessions held by a request (their turn queued or running), read from the test's thread."""
    sessions = server.engine.sessions
    try:
        held = [sessions.get(i) for i in sessions.ids()]
    except (RuntimeError, NotFound):  # the table changed meanwhile: look again
        return -1
    return sum(s.model.manifest.name == MODEL and s.lock.locked() for s in held)


def test_same_seed_same_reply_alone_and_batched(chat: Client, server: RnnServeServer) -> None:
    alone = dialogue(chat, TURNS[:2], seed=21)
    other = dialogue(chat, TURNS[:2], seed=22)
    assert alone != other
    seeds = [21, 22, 23, 21, 24, 21, 25, 26]
    # The first run is held until every dialogue's first turn waits in the scheduler (each holds its
    # session meanwhile), so their turns and replies run in shared batches of the one scheduler
    # (however fast the machine).
    with HeldRuns(server) as runs, ThreadPoolExecutor(len(seeds)) as pool:
        futures = [pool.submit(dialogue, chat, TURNS[:2], s) for s in seeds]
        wait_for(lambda: runs.held.is_set(), "a held run")
        wait_for(lambda: saying(server) == len(seeds), "every dialogue's first turn in the scheduler")
        runs.release()
        results = [f.result(timeout=120) for f in futures]
    assert results[0] == results[3] == results[5] == alone
    assert results[1] == other


def test_fork_mid_dialogue(chat: Client) -> None:
    with chat.session(MODEL) as original:
        original.say(TURNS[0])
        list(original.reply(max_tokens=5, temperature=1.0, seed=4))
        original.say(TURNS[1])
        with original.fork() as fork:
            assert fork.position == original.position
            assert snapshot_state(fork.export()).keys() == snapshot_state(original.export()).keys()
            a = [t.id for t in original.reply(max_tokens=6, temperature=1.0, seed=9)]
            b = [t.id for t in fork.reply(max_tokens=6, temperature=1.0, seed=9)]
            assert a == b
            fork.say(TURNS[2])  # the fork goes on alone: the original is where it was
            assert original.info().position == original.position != fork.position
            after = original.say(TURNS[2])
            assert after.position == fork.position
            for name, value in snapshot_state(original.export()).items():
                np.testing.assert_allclose(snapshot_state(fork.export())[name], value, err_msg=name)


def generate_request(session_id: str, position: int, request_id: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        session_id=session_id,
        sampling=pb.SamplingParams(temperature=1.0, seed=77),
        max_tokens=3,
        max_tokens_per_message=1,
        expected_position=position,
        request_id=request_id,
        end_turn=True,
    )


def tokens_of(responses: Iterator[pb.GenerateResponse]) -> list[tuple[int, int, int]]:
    """(id, position, finish_reason) of every token of a Generate call."""
    out = []
    for r in responses:
        n = len(r.token_ids)
        for i, token in enumerate(r.token_ids):
            out.append((token, r.position - n + 1 + i, r.finish_reason if i == n - 1 else 0))
    return out


@pytest.mark.parametrize("held_run", [3, 4], ids=["last-sampled-token", "appended-eos"])
def test_a_reply_cut_anywhere_is_made_once(chat: Client, server: RnnServeServer, held_run: int) -> None:
    """A reply (end_turn) whose call is cancelled while its last sampled token runs (3rd run) or while the
    <eos> that closes the turn runs (4th), retried under its request_id: the same tokens, <eos> last and
    once, the session where an uncut reply leaves it."""
    stub = chat.stub
    with chat.session(MODEL) as uncut:
        uncut.say(TURNS[0])
        with uncut.fork() as cut:
            start = uncut.position
            expected = tokens_of(stub.Generate(generate_request(uncut.id, start, "r1")))
            assert [t for t, _, _ in expected].count(EOS) == 1 and len(expected) == 4  # 3 sampled + <eos>
            assert expected[-1][2] == pb.FINISH_REASON_LENGTH
            again = tokens_of(stub.Generate(generate_request(uncut.id, start, "r1")))
            assert again == expected and uncut.info().position == start + 4  # replayed, not applied again

            with HeldRuns(server, start=held_run) as runs:
                call = stub.Generate(generate_request(cut.id, start, "r1"))
                seen: list[pb.GenerateResponse] = []
                reader = threading.Thread(target=lambda: _read_until_cancelled(call, seen))
                reader.start()
                wait_for(lambda: runs.held.is_set(), "the held run")
                call.cancel()
                reader.join(timeout=60)
            assert len(tokens_of(iter(seen))) < len(expected)  # cut: its last token waits for the <eos>
            held = server.engine.sessions.get(cut.id)
            wait_for(lambda: not held.lock.locked(), "the cancelled call to let go of its session")
            applied = held.last_applied  # cut before its <eos> ran, or while it ran (then it is applied)
            assert isinstance(applied, AppliedGeneration) and applied.finish_reason == "length"
            assert applied.appended_eos == (held_run == 4)
            retried = tokens_of(stub.Generate(generate_request(cut.id, start, "r1")))
            assert retried == expected
            assert cut.info().position == start + 4
            assert snapshot_state(cut.export()).keys() == snapshot_state(uncut.export()).keys()
            for name, value in snapshot_state(uncut.export()).items():
                np.testing.assert_allclose(snapshot_state(cut.export())[name], value, err_msg=name)


def _read_until_cancelled(call: Iterator[pb.GenerateResponse], seen: list[pb.GenerateResponse]) -> None:
    with contextlib.suppress(grpc.RpcError):
        seen.extend(call)


def test_end_turn_on_a_plain_language_model_appends_eos(chat: Client) -> None:
    with chat.session("tiny") as session:
        out = session.say("def add(a, b):")
        assert out.token_ids[-1] == EOS and out.position == len("def add(a, b):") + 1
        only_eos = session.say()  # no text: the message only closes the turn
        assert only_eos.token_ids == [EOS]
        tokens = list(session.reply(max_tokens=3, temperature=1.0, seed=1, ignore_eos=True))
        assert tokens[-1].id == EOS


def test_end_turn_on_a_classifier_is_refused_clearly(chat: Client) -> None:
    with chat.session("live") as session:
        with pytest.raises(FailedPreconditionError, match="end_turn needs a language model"):
            session.say("a fine film")
        with pytest.raises(FailedPreconditionError, match="classifier"):
            list(session.reply(max_tokens=3))
        assert session.feed("a fine film").classification is not None  # the session is unharmed


def test_a_message_with_no_input_and_no_end_turn_is_invalid(chat: Client) -> None:
    stub = chat.stub
    with chat.session(MODEL) as session:
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Stream(iter([pb.StreamRequest(session_id=session.id)])))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(InvalidArgumentError, match="out of range"):
            session.say([10_000_000])


def test_chat_command_with_piped_stdin(chat: Client, server: RnnServeServer) -> None:
    """`rnnserve chat`: a reply line per said line; /reset starts over (so the same line gets the same
    greedy reply again); /quit ends before the last line."""
    lines = "hello\nhello\n/reset\nhello\n/quit\nnever said\n"
    command = [sys.executable, "-m", "rnnserve.client.chat", "--url", f"127.0.0.1:{server.port}"]
    command += ["--model", MODEL, "--temperature", "0", "--max-tokens", "5"]
    done = subprocess.run(command, input=lines, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    expected = []
    with chat.session(MODEL) as session:  # the same conversation through the client: greedy replies
        for _ in range(2):
            session.say("hello")
            reply = session.reply(max_tokens=5, temperature=0.0)
            list(reply)
            expected.append(reply.text)
    assert done.stdout == f"{expected[0]}\n{expected[1]}\n{expected[0]}\n"


def test_the_asyncio_client_says_and_replies_alike(chat: Client, server: RnnServeServer) -> None:
    async def conversation() -> tuple[list[int], str, int]:
        async with (
            AsyncClient(f"127.0.0.1:{server.port}", timeout=60) as client,
            client.session(MODEL) as session,
        ):
            await session.say(TURNS[0])
            reply = session.reply(max_tokens=6, temperature=1.0, seed=5)
            ids = [t.id async for t in reply]
            return ids, reply.text, (await session.say(TURNS[1])).position

    ids, text, position = asyncio.run(conversation())
    with chat.session(MODEL) as session:
        session.say(TURNS[0])
        reply = session.reply(max_tokens=6, temperature=1.0, seed=5)
        assert [t.id for t in reply] == ids and reply.text == text and ids[-1] == EOS
        assert session.say(TURNS[1]).position == position


def test_an_exported_dialogue_imports_and_goes_on_alike(chat: Client) -> None:
    with chat.session(MODEL) as original:
        original.say(TURNS[0])
        list(original.reply(max_tokens=4, temperature=1.0, seed=2))
        original.say(TURNS[1])
        with chat.import_session(original.export()) as copy:
            assert copy.position == original.position
            a = [t.id for t in original.reply(max_tokens=5, temperature=1.0, seed=6)]
            b = [t.id for t in copy.reply(max_tokens=5, temperature=1.0, seed=6)]
            assert a == b and a[-1] == EOS and copy.position == original.position


def test_a_turn_streamed_in_pieces_then_closed_equals_one_say(chat: Client) -> None:
    with chat.session(MODEL) as pieces, chat.session(MODEL) as whole:
        pieces.feed(TURNS[0][:2])
        pieces.feed(TURNS[0][2:])
        closed = pieces.say()  # only the <eos>
        assert closed.token_ids == [EOS]
        said = whole.say(TURNS[0])
        assert closed.position == said.position and [c.id for c in closed.top] == [c.id for c in said.top]
        for name, value in snapshot_state(whole.export()).items():
            np.testing.assert_allclose(snapshot_state(pieces.export())[name], value, atol=1e-6, err_msg=name)


def test_dialogue_inputs_are_cut_after_every_eos(server: RnnServeServer) -> None:
    task = next(t for key, t in server.engine.tasks.items() if key.startswith(f"{MODEL}@"))
    assert isinstance(task, DialogueTask)
    steps = task.chunks([4, 5, EOS, EOS, 6, 7, 8, 9, 10, EOS, 11], 3)
    assert [s.tolist() for s in steps] == [[4, 5, EOS], [EOS], [6, 7, 8], [9, 10, EOS], [11]]
    assert all(s.dtype == np.int64 for s in steps)


def test_the_v2_protocol_maps_a_dialogue_model_as_a_language_model(server: RnnServeServer) -> None:
    from rnnserve.inference import grpc_service_pb2 as v2
    from rnnserve.inference import grpc_service_pb2_grpc as v2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        metadata = v2_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            v2.ModelMetadataRequest(name=MODEL)
        )
    assert {t.name for t in metadata.inputs} >= {"INPUT_IDS", "TEXT"}
    assert "LOGPROBS" in {t.name for t in metadata.outputs}
