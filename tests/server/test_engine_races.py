"""Races between requests on one session, driven in-process with real models (issue 12).

Every race is set up with events and hooks (a lock that reports its waiters, a model run held in the
worker until the test lets it go), never with sleeps, so the outcome does not depend on machine speed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from support import run_engine_with

from rnnserve.server.engine import Engine, EngineLimits, FeedResult, GeneratedToken, GenerateRequest
from rnnserve.server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from rnnserve.server.generation import MAX_AHEAD
from rnnserve.server.repository import ModelRepository
from rnnserve.server.sampling import SamplingParams
from rnnserve.server.scheduler import SchedulerOptions
from rnnserve.server.sessions import SessionLimits
from rnnserve.server.slab import SlotError, StateSlab

T = TypeVar("T")
LONG_TEXT = "def add(a, b):\n    return a + b\n" * 20  # 640 characters: three chunks of 256 tokens


def run_engine(
    lm_repo: Path, work: Callable[[Engine], Awaitable[T]], max_sessions: int = 100, **limits: Any
) -> T:
    """Run `work` against a started engine over the repository (no gRPC). Every run goes to the ORT
    worker thread (inline_max_tokens=0), where a test can hold it."""

    def make() -> Engine:
        return Engine(
            ModelRepository.load(lm_repo),
            SessionLimits(max_sessions=max_sessions),
            SchedulerOptions(inline_max_tokens=0),
            EngineLimits(**limits),
        )

    return run_engine_with(make, work)


class WatchedLock(asyncio.Lock):
    """A session lock that counts the requests that had to wait for it."""

    def __init__(self) -> None:
        super().__init__()
        self.waited = 0
        self._changed = asyncio.Event()

    async def acquire(self) -> bool:
        if self.locked():
            self.waited += 1
            self._changed.set()
        return await super().acquire()

    async def until_waited(self, n: int) -> None:
        while self.waited < n:
            self._changed.clear()
            await self._changed.wait()


def top(result: FeedResult) -> tuple[list[int], list[float]]:
    return [c[0] for c in result.top], [c[2] for c in result.top]


def test_requests_queued_on_a_session_that_closes_get_not_found_and_its_slot_is_freed_once(
    lm_repo: Path,
) -> None:
    """Item 1: a Generate holds the session (its reader stalled), two long feeds wait for it, the
    session is closed. The feeds get NOT_FOUND (they used to run on slot -1 and push -1 onto the free
    list), the generation stops, and every slot of the slab is free exactly once afterwards."""

    async def work(engine: Engine) -> None:
        session = engine.create_session("tiny")
        session.lock = lock = WatchedLock()
        slab = session.slab
        request = GenerateRequest(SamplingParams(seed=1), max_tokens=4000, ignore_eos=True, prompt="de")
        stream = engine.generate(session.id, request)
        tokens: list[GeneratedToken] = list(await anext(stream))  # then the reader stalls
        feeds = [asyncio.create_task(engine.feed(session.id, LONG_TEXT)) for _ in range(2)]
        await lock.until_waited(2)  # both feeds wait for the session
        engine.sessions.close(session.id)
        with pytest.raises(NotFound, match="closed while generating"):
            async for more in stream:
                tokens += more
        assert len(tokens) <= 1 + MAX_AHEAD + 1  # it stopped: the reader's lead and one run in flight
        for feed in feeds:
            with pytest.raises(NotFound, match="does not exist"):
                await feed
        assert session.slot == -1 and slab.in_use == 0
        # Every slot can be handed out exactly once (none lost, none twice, never -1).
        slots = [slab.allocate() for _ in range(slab.capacity)]
        assert sorted(slots) == list(range(slab.capacity))
        with pytest.raises(ResourceExhausted):
            slab.allocate()
        for slot in slots:
            slab.free(slot)
        # Two new sessions have rows of their own: one's input does not disturb the other.
        a, b = engine.create_session("tiny"), engine.create_session("tiny")
        assert a.slot != b.slot and min(a.slot, b.slot) >= 0
        await engine.feed(a.id, LONG_TEXT)
        await engine.feed(b.id, "class Point:")
        got = await engine.feed(a.id, "x", top_k=8)
        reference = engine.create_session("tiny")
        await engine.feed(reference.id, LONG_TEXT)
        expected = await engine.feed(reference.id, "x", top_k=8)
        assert top(got)[0] == top(expected)[0]
        np.testing.assert_allclose(top(got)[1], top(expected)[1], atol=1e-6)

    run_engine(lm_repo, work)


def test_the_slab_refuses_to_free_a_slot_twice_or_slot_minus_one(lm_repo: Path) -> None:
    from rnnserve.export.manifest import read_manifest

    slab = StateSlab(read_manifest(lm_repo / "tiny" / "1").state, 4)
    slot = slab.allocate()
    slab.free(slot)
    with pytest.raises(SlotError, match="not allocated"):
        slab.free(slot)
    with pytest.raises(SlotError, match="out of range"):
        slab.free(-1)
    assert sorted(slab.allocate() for _ in range(4)) == [0, 1, 2, 3]


@pytest.mark.parametrize("chunk_tokens", [256, 4], ids=["one chunk", "eight chunks"])
def test_a_feed_cancelled_while_it_runs_is_applied_once_and_replayed_on_retry(
    lm_repo: Path, chunk_tokens: int
) -> None:
    """Item 4: the call is cancelled (the reply is lost) while its run is in ONNX Runtime. The input is
    applied once, recorded as the last applied with its state change, and the retry with the same
    expected_position gets the same answer, replayed (it used to get FAILED_PRECONDITION)."""
    text = "def add(a, b):\n    return a + b\n"  # 32 tokens

    async def work(engine: Engine) -> None:
        session = engine.create_session("tiny")
        await engine.feed(session.id, "abc", expected_position=0)
        scheduler = engine.schedulers["tiny@1"]
        loop = asyncio.get_running_loop()
        running, release = asyncio.Event(), threading.Event()
        run = scheduler.runner.slots.run

        def held(*args: Any) -> Any:  # in the worker thread
            loop.call_soon_threadsafe(running.set)
            assert release.wait(60)
            return run(*args)

        scheduler.runner.slots.run = held  # type: ignore[method-assign]
        call = asyncio.create_task(engine.feed(session.id, text, expected_position=3, top_k=5))
        await running.wait()  # its (first) run is in ONNX Runtime
        call.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert session.position == 3 + 32  # applied, once; the session is free again
        retry = await engine.feed(session.id, text, expected_position=3, top_k=5)
        assert retry.replayed and retry.position == 35
        other = engine.create_session("tiny")
        await engine.feed(other.id, "abc")
        direct = await engine.feed(other.id, text, top_k=5)
        assert top(retry)[0] == top(direct)[0]
        np.testing.assert_allclose(top(retry)[1], top(direct)[1], atol=1e-6)

    run_engine(lm_repo, work, chunk_tokens=chunk_tokens)


def test_a_generate_is_the_last_applied_message(lm_repo: Path) -> None:
    """Item 6: feed at 0 (now 7), Generate 5 (now 12): resending the feed is FAILED_PRECONDITION (it
    used to replay the feed's stale answer), and so is resending the Generate, saying where it ended."""

    async def work(engine: Engine) -> None:
        session = engine.create_session("tiny")
        assert (await engine.feed(session.id, "def add", expected_position=0)).position == 7
        request = GenerateRequest(SamplingParams(seed=1), max_tokens=5, ignore_eos=True, expected_position=7)
        tokens = [t async for batch in engine.generate(session.id, request) for t in batch]
        assert [t.position for t in tokens] == [8, 9, 10, 11, 12]
        with pytest.raises(FailedPrecondition, match="is at position 12, but the request expected 0"):
            await engine.feed(session.id, "def add", expected_position=0)
        with pytest.raises(FailedPrecondition, match=r"already ran.*at position 12, where it ended"):
            async for _ in engine.generate(session.id, request):
                pass
        assert session.position == 12
        # After a feed again, the feed is what a retry replays.
        fed = await engine.feed(session.id, "x", expected_position=12)
        again = await engine.feed(session.id, "x", expected_position=12)
        assert again.replayed and again.position == fed.position == 13

    run_engine(lm_repo, work)


def test_text_over_the_character_limit_is_refused_before_it_is_tokenised(lm_repo: Path) -> None:
    """Item 3: the cheap limit (characters) is checked before any tokenising; token ids are counted
    before their range is checked."""

    class Recording:
        def __init__(self, tokenizer: Any) -> None:
            self.tokenizer, self.texts = tokenizer, []  # type: ignore[var-annotated]

        def __getattr__(self, name: str) -> Any:
            method = getattr(self.tokenizer, name)
            if name not in ("encode", "encode_batch"):
                return method

            def recorded(texts: Any, *args: Any, **kwargs: Any) -> Any:
                self.texts.append(texts)
                return method(texts, *args, **kwargs)

            return recorded

    async def work(engine: Engine) -> None:
        codec = engine.repository.get("tiny").codec
        codec.tokenizer = recording = Recording(codec.tokenizer)  # type: ignore[assignment]
        session = engine.create_session("tiny")
        with pytest.raises(InvalidArgument, match="has 801 characters, more than the limit of 800"):
            await engine.feed(session.id, "a" * 801)
        assert recording.texts == []
        with pytest.raises(InvalidArgument, match="has 101 tokens, more than the limit of 100"):
            await engine.feed(session.id, [10**9] * 101)
        with pytest.raises(InvalidArgument, match="has 300 tokens, more than the limit of 100"):
            await engine.feed(session.id, "a" * 300)
        assert (await engine.feed(session.id, "a" * 100)).position == 100
        assert session.position == 100

    run_engine(lm_repo, work, max_tokens_per_input=100, max_input_chars=800)


def test_stop_strings_longer_than_the_limit_are_invalid(lm_repo: Path) -> None:
    async def work(engine: Engine) -> None:
        session = engine.create_session("tiny")
        request = GenerateRequest(SamplingParams(seed=1), max_tokens=5, stop=["ok", "z" * 257])
        with pytest.raises(InvalidArgument, match=r"at most 256 characters; got 257: 'z{64}'…"):
            async for _ in engine.generate(session.id, request):
                pass
        fine = GenerateRequest(SamplingParams(seed=1), max_tokens=5, stop=["z" * 256] * 16, ignore_eos=True)
        assert len([t async for batch in engine.generate(session.id, fine) for t in batch]) == 5

    run_engine(lm_repo, work)


def test_concurrent_classify_calls_wait_for_slots_instead_of_failing(
    lm_repo: Path, classifier_checkpoints: dict[str, Path]
) -> None:
    """Item 7: four Classify calls of 1,024 texts at once on a streaming classifier used to take a
    scratch slot per text and fail with "close sessions"; they now wait for a bounded set of slots."""
    texts = ["the movie was great fun", "a dull and tedious plot", "so boring"] * 341 + ["superb"]

    async def work(engine: Engine) -> None:
        alone = (await engine.classify("live", "", texts[:4]))[1]
        results = await asyncio.gather(*(engine.classify("live", "", texts) for _ in range(4)))
        for _, classifications in results:
            assert len(classifications) == len(texts)
            for i, c in enumerate(classifications[:4]):
                np.testing.assert_allclose(c.probs, alone[i].probs, atol=1e-6)
        assert engine.schedulers["live@1"].slab.in_use == 0

    run_engine(lm_repo, work, max_sessions=4)
