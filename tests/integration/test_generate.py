"""Generate through the real server: reproducible under a seed, greedy = argmax, stops, state kept."""

from __future__ import annotations

from rnnserve.client import Client
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


def test_a_slow_reader_gets_the_tokens_made_meanwhile_in_one_message(client: Client) -> None:
    import time

    def responses(per_message: int) -> list[pb.GenerateResponse]:
        with client.session("tiny") as session:
            request = pb.GenerateRequest(
                session_id=session.id,
                max_tokens=200,
                ignore_eos=True,
                prompt_text=PROMPT,
                max_tokens_per_message=per_message,
            )
            call = client.stub.Generate(request)
            first = next(call)
            time.sleep(0.5)  # the server keeps generating meanwhile
            return [first, *call]

    packed = responses(16)
    tokens = [t for r in packed for t in r.tokens]
    assert [t.position for t in tokens] == list(range(len(PROMPT) + 1, len(PROMPT) + 201))
    assert all(1 <= len(r.tokens) <= 16 for r in packed) and len(packed) < 200
    assert tokens[-1].finish_reason == pb.FINISH_REASON_LENGTH
    old_style = responses(0)  # what an older client asks: one token per message, in the message itself
    assert len(old_style) == 200 and not any(r.tokens for r in old_style)
    assert [r.token_id for r in old_style] == [t.token_id for t in tokens]  # greedy: the same tokens


def generate_messages(client: Client, **fields: object) -> list[pb.GenerateResponse]:
    """The raw Generate messages of one call (with fields of GenerateRequest), after PROMPT."""
    with client.session("tiny") as session:
        request = pb.GenerateRequest(session_id=session.id, prompt_text=PROMPT, ignore_eos=True, **fields)
        return list(client.stub.Generate(request))


def test_a_flush_interval_gathers_tokens_into_full_messages(client: Client) -> None:
    # The tiny model makes 48 tokens in far less than a second: after the first message (sent at once,
    # for the time to first token), every message waits until it is full.
    packed = generate_messages(client, max_tokens=48, max_tokens_per_message=16, flush_interval_ms=1000)
    sizes = [len(r.tokens) for r in packed]
    assert sum(sizes) == 48 and len(sizes) <= 4 and all(n == 16 for n in sizes[1:-1])
    # ... and the end of the generation is sent at once, however long the interval.
    short = generate_messages(client, max_tokens=20, max_tokens_per_message=64, flush_interval_ms=1000)
    assert len(short) <= 2 and sum(len(r.tokens) for r in short) == 20
    assert short[-1].tokens[-1].finish_reason == pb.FINISH_REASON_LENGTH
    # Packaging only: the same tokens as one per message (greedy).
    single = generate_messages(client, max_tokens=48, max_tokens_per_message=1)
    assert [r.token_id for r in single] == [t.token_id for r in packed for t in r.tokens]


def test_the_client_library_passes_the_flush_interval(client: Client) -> None:
    kwargs: dict[str, object] = {"max_tokens": 30, "temperature": 1.0, "seed": 4, "ignore_eos": True}
    assert generate_tokens(client, flush_interval_ms=0, **kwargs) == generate_tokens(
        client, flush_interval_ms=200, **kwargs
    )
