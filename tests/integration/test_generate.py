"""Generate through the real server: reproducible under a seed, greedy = argmax, stops, state kept.

How tokens are packed into messages depends on when the Generate handler takes them, relative to the
model's runs. Those tests use a server of their own and set that up with hooks in it (a reader held
until the generation has run ahead, model runs that wait for the reader, a frozen flush clock), so
their outcome does not depend on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from rnnserve.client import Client, GenerateMessage
from rnnserve.server.app import RnnServeServer, background_server
from rnnserve.server.config import ServerConfig
from rnnserve.server.engine import Engine, GeneratedToken, GenerateRequest
from rnnserve.server.generation import MAX_AHEAD, Generation
from rnnserve.server.service import generate_responses
from rnnserve.v1 import rnnserve_pb2 as pb

PROMPT = "def add(a, b):\n"


def generate_tokens(client: Client, **kwargs: object) -> list[int]:
    with client.session("tiny") as session:
        return [t.id for t in session.generate(PROMPT, **kwargs)]  # type: ignore[arg-type]


def test_same_seed_same_tokens(client: Client) -> None:
    a = generate_tokens(client, max_tokens=40, temperature=1.0, seed=11, ignore_eos=True)
    b = generate_tokens(client, max_tokens=40, temperature=1.0, seed=11, ignore_eos=True)
    c = generate_tokens(client, max_tokens=40, temperature=1.0, seed=12, ignore_eos=True)
    assert a == b and len(a) == 40
    assert a != c


def test_seeded_sampling_is_independent_of_other_sessions_in_the_batch(client: Client) -> None:
    from concurrent.futures import ThreadPoolExecutor

    alone = generate_tokens(client, max_tokens=30, temperature=1.0, seed=5, ignore_eos=True)
    with ThreadPoolExecutor(4) as pool:
        runs = list(
            pool.map(
                lambda s: generate_tokens(client, max_tokens=30, temperature=1.0, seed=s, ignore_eos=True),
                [5, 6, 5, 7],
            )
        )
    assert runs[0] == runs[2] == alone


def test_greedy_generation_follows_the_top_candidate(client: Client) -> None:
    with client.session("tiny") as gen, client.session("tiny") as check:
        tokens = list(gen.generate(PROMPT, max_tokens=10, temperature=0.0, ignore_eos=True))
        out = check.feed(PROMPT)
        for token in tokens:
            assert token.id == out.top[0].id
            out = check.feed([token.id])
        assert gen.info().position == check.info().position == len(PROMPT) + 10


def test_max_tokens_ends_with_length_and_text_is_streamed(client: Client) -> None:
    with client.session("tiny") as session:
        stream = session.generate(PROMPT, max_tokens=25, temperature=0.0, ignore_eos=True)
        tokens = list(stream)
        assert len(tokens) == 25
        assert [t.finish_reason for t in tokens] == [None] * 24 + ["length"]
        assert stream.finish_reason == "length" and len(stream.text) == 25  # char-level: a char per token
        assert [t.position for t in tokens] == list(range(len(PROMPT) + 1, len(PROMPT) + 26))


def test_generation_continues_the_session_state(client: Client) -> None:
    with client.session("tiny") as a, client.session("tiny") as b:
        first = list(a.generate(PROMPT, max_tokens=5, ignore_eos=True))
        second = list(a.generate(max_tokens=5, ignore_eos=True))
        both = list(b.generate(PROMPT, max_tokens=10, ignore_eos=True))
        assert [t.id for t in first + second] == [t.id for t in both]


def test_stop_string_ends_generation_and_is_not_sent(client: Client) -> None:
    with client.session("tiny") as free:
        free_text = "".join(t.text for t in free.generate(PROMPT, max_tokens=60, ignore_eos=True))
    stop = free_text[10:12]  # two chars the greedy model will produce
    with client.session("tiny") as session:
        stream = session.generate(PROMPT, max_tokens=60, stop=[stop], ignore_eos=True)
        list(stream)
    assert stream.finish_reason == "stop"
    assert stream.text == free_text[: free_text.index(stop)]


def test_stop_token_id(client: Client) -> None:
    with client.session("tiny") as free:
        ids = [t.id for t in free.generate(PROMPT, max_tokens=20, ignore_eos=True)]
    with client.session("tiny") as session:
        stream = session.generate(PROMPT, max_tokens=20, stop_token_ids=[ids[5]], ignore_eos=True)
        got = [t.id for t in stream]
    assert stream.finish_reason == "stop"
    assert got == ids[: ids.index(ids[5]) + 1]


def test_empty_session_starts_a_new_document(client: Client) -> None:
    with client.session("tiny") as session:
        tokens = list(session.generate(max_tokens=5, ignore_eos=True))
        assert len(tokens) == 5 and tokens[-1].position == 6  # <eos> first, then 5 sampled


def test_several_tokens_per_message_change_the_packaging_not_the_tokens(client: Client) -> None:
    kwargs: dict[str, object] = {"max_tokens": 120, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    one_each = generate_tokens(client, max_tokens_per_message=1, **kwargs)
    packed = generate_tokens(client, max_tokens_per_message=64, **kwargs)
    assert one_each == packed and len(packed) == 120


@pytest.fixture(scope="module")
def own_server(lm_repo: Path) -> Iterator[RnnServeServer]:
    """A server whose engine the tests hook into. Every model run goes to the ORT worker thread
    (inline_max_tokens=0), where a hook may hold it without holding the event loop."""
    config = ServerConfig(repo=lm_repo, host="127.0.0.1", port=0, inline_max_tokens=0)
    with background_server(config) as server:
        yield server


@pytest.fixture
def own_client(own_server: RnnServeServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{own_server.port}", timeout=60) as c:
        yield c


Tokens = AsyncIterator[list[GeneratedToken]]


def model_runs(scheduler: Any) -> Any:
    """What a scheduler's ONNX Runtime runs go through in the worker thread (a hook replaces its
    methods): its SlotRunner, whose `run` runs steps and `run_block` K-step generation blocks."""
    return scheduler.runner.slots


RUN_METHODS = ("run", "run_block")


class ReaderHook:
    """Wraps the engine's `generate`, which the Generate handler takes its tokens from (one list per
    hand-over), with `around(hand_overs)`; undone on exit."""

    def __init__(self, server: RnnServeServer) -> None:
        self.server = server
        self.engine = server.engine

    def __enter__(self) -> ReaderHook:
        real = Engine.generate.__get__(self.engine)

        def generate(session_id: str, request: GenerateRequest) -> Tokens:
            return self.around(real(session_id, request))

        self.engine.generate = generate  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.engine.generate  # the class's method again

    def around(self, hand_overs: Tokens) -> Tokens:
        return hand_overs


class HeldAfterFirstMessage(ReaderHook):
    """The handler takes nothing after its first hand-over until `release()`, as when a slow reader's
    flow-control window is full and the handler's writes wait; the generation goes on meanwhile."""

    def __init__(self, server: RnnServeServer) -> None:
        super().__init__(server)
        self._released = asyncio.Event()  # (bound to the server's loop when first awaited there)

    async def around(self, hand_overs: Tokens) -> Tokens:  # type: ignore[override]
        first = True
        async for tokens in hand_overs:
            yield tokens
            if first:
                first = False
                await self._released.wait()

    def release(self) -> None:
        assert self.server.loop is not None
        self.server.loop.call_soon_threadsafe(self._released.set)

    def __exit__(self, *exc: object) -> None:
        self.release()
        super().__exit__(*exc)


class PacedByTheReader(ReaderHook):
    """Model runs wait (in the ORT worker) while the handler is busy sending what it took, so it is
    always back for the next tokens before they are due: what a reader faster than the model sees, on
    any machine. (A run already started when the handler took its tokens still finishes.)"""

    def __init__(self, server: RnnServeServer) -> None:
        super().__init__(server)
        self._waiting = threading.Event()  # the handler waits for tokens (or has not started)
        self._waiting.set()
        self._runs: dict[tuple[Any, str], Callable[..., Any]] = {}

    def __enter__(self) -> PacedByTheReader:
        for scheduler in self.engine.schedulers.values():
            runner = model_runs(scheduler)
            for method in RUN_METHODS:
                run = self._runs[(runner, method)] = getattr(runner, method)

                def paced(*args: Any, run: Callable[..., Any] = run) -> Any:  # in the worker thread
                    assert self._waiting.wait(60), "the Generate handler never came back for tokens"
                    return run(*args)

                setattr(runner, method, paced)
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._waiting.set()
        for (runner, method), run in self._runs.items():
            setattr(runner, method, run)
        super().__exit__(*exc)

    async def around(self, hand_overs: Tokens) -> Tokens:  # type: ignore[override]
        try:
            async for tokens in hand_overs:  # (received in the same step as the handler took them)
                self._waiting.clear()
                yield tokens
                self._waiting.set()
        finally:
            self._waiting.set()


class FrozenFlushClock:
    """The engine's flush clock stands still: a flush interval never passes, however slow the machine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.real = engine.clock

    def __enter__(self) -> None:
        self.engine.clock = lambda: 0.0

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.engine.clock = self.real


def test_a_slow_reader_gets_the_tokens_made_meanwhile_in_one_message(
    own_server: RnnServeServer, own_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler is held after its first message (a reader too slow to take more) until the
    generation has run MAX_AHEAD tokens ahead and sits out; it then takes those tokens at once, and
    they go out max_tokens_per_message to a message (0: one per message)."""
    ahead = threading.Event()
    made = Generation._made  # where a run's tokens (one, or a K-step block's) reach the reader's queue

    def reporting(self: Generation, tokens: list[GeneratedToken]) -> None:
        made(self, tokens)
        if not self.runnable:  # MAX_AHEAD tokens wait for the reader: it sits out runs
            ahead.set()

    monkeypatch.setattr(Generation, "_made", reporting)

    def responses(per_message: int) -> list[pb.GenerateResponse]:
        ahead.clear()
        with own_client.session("tiny") as session, HeldAfterFirstMessage(own_server) as reader:
            request = pb.GenerateRequest(
                session_id=session.id,
                max_tokens=200,
                ignore_eos=True,
                prompt_text=PROMPT,
                max_tokens_per_message=per_message,
            )
            call = own_client.stub.Generate(request)
            first = next(call)
            assert ahead.wait(60), "the generation never ran ahead of its held reader"
            assert session.info().position >= len(PROMPT) + len(first.token_ids) + MAX_AHEAD  # made meanwhile
            reader.release()
            return [first, *call]

    packed = responses(16)
    tokens = [t for r in packed for t in GenerateMessage.from_pb(r).tokens]
    assert [t.position for t in tokens] == list(range(len(PROMPT) + 1, len(PROMPT) + 201))
    assert all(1 <= len(r.token_ids) <= 16 for r in packed)
    assert [len(r.token_ids) for r in packed[1:5]] == [16] * 4  # the MAX_AHEAD tokens made meanwhile
    assert [r.finish_reason for r in packed] == [0] * (len(packed) - 1) + [pb.FINISH_REASON_LENGTH]
    one_each = responses(0)  # 0 (or 1): one token per message
    assert len(one_each) == 200 and all(len(r.token_ids) == 1 for r in one_each)
    assert [r.token_ids[0] for r in one_each] == [t.id for t in tokens]  # greedy: the same tokens


def generate_messages(client: Client, **fields: object) -> list[pb.GenerateResponse]:
    """The raw Generate messages of one call (with fields of GenerateRequest), after PROMPT."""
    with client.session("tiny") as session:
        request = pb.GenerateRequest(session_id=session.id, prompt_text=PROMPT, ignore_eos=True, **fields)
        return list(client.stub.Generate(request))


def test_a_flush_interval_gathers_tokens_into_full_messages(
    own_server: RnnServeServer, own_client: Client
) -> None:
    # The flush interval never passes (a frozen clock) and the reader is always back before tokens are
    # due (model runs wait for it): the first token goes out at once (time to first token), then every
    # message waits until it is full ...
    with FrozenFlushClock(own_server.engine), PacedByTheReader(own_server):
        packed = generate_messages(
            own_client, max_tokens=48, max_tokens_per_message=16, flush_interval_ms=1000
        )
        # ... and the end of the generation is sent at once, though the interval never passes.
        short = generate_messages(
            own_client, max_tokens=20, max_tokens_per_message=64, flush_interval_ms=1000
        )
    sizes = [len(r.token_ids) for r in packed]  # [1, 16, 16, 15] when each run makes one token
    assert sum(sizes) == 48 and len(sizes) <= 4 and sizes[0] < 16 and all(n == 16 for n in sizes[1:-1])
    assert len(short) == 2 and sum(len(r.token_ids) for r in short) == 20
    assert short[-1].finish_reason == pb.FINISH_REASON_LENGTH
    # Packaging only: the same tokens as one per message (greedy).
    single = generate_messages(own_client, max_tokens=48, max_tokens_per_message=1)
    assert [r.token_ids[0] for r in single] == [i for r in packed for i in r.token_ids]


def test_the_client_library_passes_the_flush_interval(client: Client) -> None:
    kwargs: dict[str, object] = {"max_tokens": 30, "temperature": 1.0, "seed": 4, "ignore_eos": True}
    assert generate_tokens(client, flush_interval_ms=0, **kwargs) == generate_tokens(
        client, flush_interval_ms=200, **kwargs
    )


# Texts that a char or byte-level BPE model may emit, not one code point and one byte each: two-byte,
# three-byte and four-byte UTF-8 (the last outside the BMP, two UTF-16 units), a character of two code
# points (a thumb and its skin tone), none (a character not complete yet, or held back), several.
TEXTS = ["é", "日本", "𝔘", "👍🏽", "", "a\n", "ß"]


def test_a_message_packs_its_tokens_and_the_client_unpacks_them() -> None:
    """The server's packing (one string, offsets in code points, implied positions, the finish reason
    on the last message) read back by the client's unpacking, through the wire encoding."""
    made = [
        GeneratedToken(100 + i, text, -0.5 * i, 11 + i, "stop" if i == 9 else None)
        for i, text in enumerate([*TEXTS, "x", "", "yz"])
    ]
    for per_message, sizes in [(0, [1] * 10), (1, [1] * 10), (4, [4, 4, 2]), (64, [10])]:
        wire = [
            pb.GenerateResponse.FromString(r.SerializeToString())
            for r in generate_responses(made, per_message)
        ]
        assert [len(r.token_ids) == len(r.logprobs) == len(r.text_offsets) for r in wire] == [True] * len(
            sizes
        )
        assert [len(r.token_ids) for r in wire] == sizes
        assert [r.text_offsets[-1] for r in wire] == [len(r.text) for r in wire]  # code points
        assert [r.finish_reason for r in wire] == [0] * (len(sizes) - 1) + [pb.FINISH_REASON_STOP]
        tokens = [t for r in wire for t in GenerateMessage.from_pb(r).tokens]
        assert [(t.id, t.text, t.logprob, t.position, t.finish_reason) for t in tokens] == [
            (t.token_id, t.text, t.logprob, t.position, t.finish_reason) for t in made
        ]
    (four,) = generate_responses(made[:4], 4)
    assert four.text == "é日本𝔘👍🏽" and list(four.text_offsets) == [1, 3, 4, 6] and four.position == 14
    assert GenerateMessage.from_pb(four).texts == TEXTS[:4]


def test_several_tokens_in_a_message_are_the_tokens_of_one_per_message(
    own_server: RnnServeServer, own_client: Client
) -> None:
    """The packed arrays of a message hold, token for token, what one message per token holds: ids,
    logprobs, the text split at text_offsets, positions implied by the last."""
    with FrozenFlushClock(own_server.engine), PacedByTheReader(own_server):
        packed = generate_messages(
            own_client, max_tokens=40, max_tokens_per_message=16, flush_interval_ms=1000
        )
    single = generate_messages(own_client, max_tokens=40, max_tokens_per_message=1)
    assert max(len(r.token_ids) for r in packed) == 16 and len(single) == 40
    assert all(len(r.token_ids) == len(r.logprobs) == len(r.text_offsets) for r in packed)
    rows = []
    for r in packed:
        n, starts = len(r.token_ids), [0, *r.text_offsets[:-1]]
        assert r.text_offsets[-1] == len(r.text)
        for i, (start, end) in enumerate(zip(starts, r.text_offsets, strict=True)):
            rows.append((r.token_ids[i], r.text[start:end], r.position - n + 1 + i))
    assert rows == [(r.token_ids[0], r.text, r.position) for r in single]
    logprobs = [lp for r in packed for lp in r.logprobs]
    assert logprobs == pytest.approx([r.logprobs[0] for r in single], abs=1e-4)
    assert packed[-1].finish_reason == single[-1].finish_reason == pb.FINISH_REASON_LENGTH


class NonAsciiTexts(PacedByTheReader):
    """As PacedByTheReader, and the k-th token of a generation gets the text TEXTS[k % len(TEXTS)] (the
    tiny model's own texts are ASCII)."""

    async def around(self, hand_overs: Tokens) -> Tokens:  # type: ignore[override]
        async def replaced() -> Tokens:
            k = 0
            async for tokens in hand_overs:
                for t in tokens:
                    t.text, k = TEXTS[k % len(TEXTS)], k + 1
                yield tokens

        async for tokens in super().around(replaced()):
            yield tokens


def test_non_ascii_texts_split_per_token_in_a_message(own_server: RnnServeServer, own_client: Client) -> None:
    n = 40
    expected = [TEXTS[k % len(TEXTS)] for k in range(n)]
    kwargs: dict[str, Any] = {"max_tokens": n, "max_tokens_per_message": 16, "flush_interval_ms": 1000}
    with FrozenFlushClock(own_server.engine), NonAsciiTexts(own_server):
        raw = generate_messages(own_client, **kwargs)
        kwargs["ignore_eos"] = True
        with own_client.session("tiny") as session:
            stream = session.generate(PROMPT, **kwargs)
            tokens = list(stream)
            blocks = session.generate(**kwargs)  # after the first
            messages = list(blocks.messages())
    assert max(len(r.token_ids) for r in raw) == 16
    assert [t for r in raw for t in GenerateMessage.from_pb(r).texts] == expected
    assert [r.text_offsets[-1] for r in raw] == [len(r.text) for r in raw]  # code points, not bytes
    assert [t.text for t in tokens] == expected and stream.text == "".join(expected)
    assert [t.position for t in tokens] == list(range(len(PROMPT) + 1, len(PROMPT) + n + 1))
    # The per-message iterator: the same tokens, several to a message.
    assert max(len(m) for m in messages) == 16 and blocks.finish_reason == "length"
    assert [t.text for m in messages for t in m.tokens] == expected and blocks.text == "".join(expected)
    assert [t.position for t in blocks.tokens] == list(range(len(PROMPT) + n + 1, len(PROMPT) + 2 * n + 1))
    assert session.position == len(PROMPT) + 2 * n
