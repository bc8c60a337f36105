"""The scheduler batches the work of many sessions into one run, with results equal to each alone.

The invariant: running sessions together changes nothing. Checked for steps (every cell type, mixed
lengths, last-position and full logits), for generation (same seed, same tokens, alone or in a batch of
many), and for the state slab (sessions created and closed interleaved never see each other's state).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from support import CELLS, run_engine_with

from rnnserve.export.manifest import read_manifest
from rnnserve.server.engine import Engine, EngineLimits, GeneratedToken, GenerateRequest
from rnnserve.server.errors import NotFound
from rnnserve.server.generation import MAX_AHEAD
from rnnserve.server.repository import ModelRepository
from rnnserve.server.runner import LAST_LOGPROBS
from rnnserve.server.runtime import LAST_LOGITS, OnnxModel
from rnnserve.server.sampling import SamplingParams, log_softmax
from rnnserve.server.scheduler import Scheduler, SchedulerOptions
from rnnserve.server.sessions import SessionLimits
from rnnserve.server.slab import State, StateSlab
from rnnserve.server.slots import SlotRunner

T = TypeVar("T")
Step = tuple[np.ndarray, State]  # tokens [seq], batch-1 state


def random_state(model: OnnxModel, rng: np.random.Generator) -> State:
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in model.initial_state(1).items()}


def run_steps(
    model: OnnxModel, steps: list[Step], options: SchedulerOptions, last: bool = False
) -> tuple[list[dict[str, np.ndarray]], list[State], Scheduler]:
    """Run every step at once through a scheduler: (outputs, new states, the scheduler)."""
    slab = StateSlab(model.manifest.state, len(steps) + 4)
    slots = [slab.allocate() for _ in steps]
    for slot, (_, state) in zip(slots, steps, strict=True):
        slab.write(slot, state)

    async def go() -> tuple[list[dict[str, np.ndarray]], Scheduler]:
        with ThreadPoolExecutor(1) as pool:
            scheduler = Scheduler(model, slab, pool, options)
            scheduler.start()
            outputs = await asyncio.gather(
                *(scheduler.step(t, s, s, last=last) for (t, _), s in zip(steps, slots, strict=True))
            )
            await scheduler.stop()
        return list(outputs), scheduler

    outputs, scheduler = asyncio.run(go())
    return outputs, [slab.read(s) for s in slots], scheduler


def assert_same_as_alone(
    model: OnnxModel, steps: list[Step], outputs: list[dict[str, np.ndarray]], states: list[State]
) -> None:
    for (tokens, state), out, new_state in zip(steps, outputs, states, strict=True):
        alone, alone_state = model.run(tokens[None, :], state)
        if LAST_LOGPROBS in out:
            np.testing.assert_allclose(out[LAST_LOGPROBS], log_softmax(alone["logits"][0, -1]), atol=1e-5)
        else:
            np.testing.assert_allclose(out["logits"], alone["logits"][0], atol=1e-5)
        for name in state:
            assert new_state[name].shape == state[name].shape
            np.testing.assert_allclose(new_state[name], alone_state[name], atol=1e-5)


def tiny(lm_repo: Path) -> OnnxModel:
    bundle = lm_repo / "tiny" / "1"
    return OnnxModel(bundle, read_manifest(bundle))


@pytest.mark.parametrize("last", [False, True])
def test_concurrent_steps_run_as_batches_and_match_single_runs(lm_repo: Path, last: bool) -> None:
    model = tiny(lm_repo)
    rng = np.random.default_rng(0)
    vocab = model.manifest.vocab_size
    # 12 sessions, two sequence lengths: same-length steps share a run, different lengths never mix.
    steps = [(rng.integers(0, vocab, size=3 if i % 2 else 5), random_state(model, rng)) for i in range(12)]
    outputs, states, scheduler = run_steps(
        model, steps, SchedulerOptions(max_batch=64, max_wait_s=0.01), last
    )
    assert scheduler.steps_run == 12
    assert scheduler.batches_run == 2  # one run per sequence length
    assert_same_as_alone(model, steps, outputs, states)


def test_last_position_graph_equals_the_step_graphs_last_position(lm_repo: Path) -> None:
    model = tiny(lm_repo)
    assert model.last is not None, "the exporter writes a 'last' graph for language models"
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, model.manifest.vocab_size, size=(4, 7))
    state = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in model.initial_state(4).items()}
    full, full_state = model.run(tokens, state)
    logits, last_state = model.run_last(tokens, state)
    np.testing.assert_allclose(logits, full["logits"][:, -1], atol=1e-5)
    for name in state:
        np.testing.assert_allclose(last_state[name], full_state[name], atol=1e-5)


def test_max_batch_caps_a_run(lm_repo: Path) -> None:
    model = tiny(lm_repo)
    rng = np.random.default_rng(1)
    steps = [(np.array([1, 2]), random_state(model, rng)) for _ in range(10)]
    _, _, scheduler = run_steps(model, steps, SchedulerOptions(max_batch=4, max_wait_s=0.01))
    assert scheduler.steps_run == 10 and scheduler.batches_run == 3


@pytest.mark.parametrize("cell", CELLS)
def test_running_sessions_together_changes_nothing_for_every_cell(cell: str, tmp_path: Path) -> None:
    """The batching invariant, per cell type: each session's outputs and state are what it gets alone.

    These bundles have no "last" graph: last-position steps fall back to the step graph.
    """
    import torch

    from rnnserve.export.manifest import Manifest, TensorSpec, lm_state_specs
    from rnnserve.export.onnx_export import export_lm_to_onnx
    from rnnserve.training.model import ModelArgs, RNNLanguageModel

    torch.manual_seed(0)
    net = RNNLanguageModel(ModelArgs(cell, 50, 16, 24, 2, dropout=0.0)).eval()
    export_lm_to_onnx(net, tmp_path / "model.onnx")
    manifest = Manifest(
        name="m",
        version="1",
        task="lm",
        cell=cell,
        num_layers=2,
        hidden_size=24,
        embedding_size=16,
        num_directions=1,
        vocab_size=50,
        tokenizer_kind="char",
        special_tokens={},
        inputs=[TensorSpec("tokens", ["batch", "seq"], "int64")],
        outputs=[],
        state=lm_state_specs(cell, 2, 24),
    )
    model = OnnxModel(tmp_path, manifest)
    assert model.last is None
    rng = np.random.default_rng(2)
    steps = [(rng.integers(0, 50, size=1 + i % 3), random_state(model, rng)) for i in range(9)]
    for last in (False, True):
        outputs, states, scheduler = run_steps(model, steps, SchedulerOptions(max_wait_s=0.01), last)
        assert scheduler.batches_run == 3  # three sequence lengths
        assert_same_as_alone(model, steps, outputs, states)


# -- the engine: generation and the slab ------------------------------------------------------------


def with_engine(
    lm_repo: Path,
    work: Callable[[Engine], Awaitable[T]],
    bound: bool = False,
    options: SchedulerOptions | None = None,
    **limits: int,
) -> T:
    """Run `work` against a started engine over the `tiny` model (no gRPC).

    bound: run with the I/O-binding runner (what CUDA uses: states stay in ORT values between runs on
    the same slots, copied back to the slab on any other use), here with host ORT values.
    """

    def make() -> Engine:
        engine = Engine(
            ModelRepository.load(lm_repo),
            SessionLimits(max_sessions=limits.pop("max_sessions", 100)),
            options or SchedulerOptions(max_wait_s=0.002),
            EngineLimits(**limits),
        )
        if bound:
            for scheduler in engine.schedulers.values():
                scheduler.runner.slots = SlotRunner(scheduler.model, scheduler.slab, io_binding=True)
        return engine

    return run_engine_with(make, work)


async def generate(engine: Engine, request: GenerateRequest) -> list[GeneratedToken]:
    session = engine.create_session("tiny")
    out = [t async for tokens in engine.generate(session.id, request) for t in tokens]
    engine.sessions.close(session.id)
    return out


SAMPLINGS = [
    SamplingParams(temperature=1.0, seed=5),
    SamplingParams(temperature=0.8, top_k=5, seed=6),
    SamplingParams(temperature=1.2, top_p=0.9, seed=7),
    SamplingParams(temperature=0.0),
]


@pytest.mark.parametrize("bound", [False, True])
def test_generation_with_a_seed_gives_the_same_tokens_alone_or_in_a_batch_of_many(
    lm_repo: Path, bound: bool
) -> None:
    def request(sampling: SamplingParams, prompt: str) -> GenerateRequest:
        return GenerateRequest(sampling, max_tokens=30, ignore_eos=True, prompt=prompt)

    prompts = ["def add(a, b):\n", "class P", "x = 1\n"]
    cases = [(s, p) for s in SAMPLINGS for p in prompts]  # 12 generations, prompts of different lengths

    async def alone(engine: Engine) -> list[list[GeneratedToken]]:
        return [await generate(engine, request(s, p)) for s, p in cases]

    async def together(engine: Engine) -> tuple[list[list[GeneratedToken]], int]:
        results = await asyncio.gather(*(generate(engine, request(s, p)) for s, p in cases))
        runner = engine.schedulers["tiny@1"].runner.slots
        assert not bound or runner.resident_hits > 0  # states stayed put between runs
        return list(results), engine.schedulers["tiny@1"].batches_run

    expected = with_engine(lm_repo, alone)
    got, runs = with_engine(lm_repo, together, bound)
    for a, b in zip(expected, got, strict=True):
        assert [t.token_id for t in a] == [t.token_id for t in b]
        assert [t.position for t in a] == [t.position for t in b]
        np.testing.assert_allclose([t.logprob for t in a], [t.logprob for t in b], atol=1e-4)
        assert b[-1].finish_reason == "length" and len(b) == 30
    # They really ran together: far fewer runs than the 12 * 31 they take one at a time.
    assert runs < 12 * 31 / 3


@pytest.mark.parametrize("bound", [False, True])
def test_sessions_join_and_leave_the_running_batch(lm_repo: Path, bound: bool) -> None:
    """Generations of different lengths, started at different times, each equal to itself alone."""

    def request(n: int, seed: int) -> GenerateRequest:
        return GenerateRequest(
            SamplingParams(temperature=1.0, seed=seed), max_tokens=n, ignore_eos=True, prompt="de"
        )

    # (start once the first generation has handed over this many tokens, max_tokens, seed): joins are
    # driven by the first generation's progress, not by timers, so they happen mid-run on any machine.
    plan = [(0, 40, 1), (0, 5, 2), (5, 25, 3), (10, 3, 4), (15, 30, 5)]

    async def alone(engine: Engine) -> list[list[int]]:
        return [[t.token_id for t in await generate(engine, request(n, s))] for _, n, s in plan]

    async def staggered(engine: Engine) -> list[list[int]]:
        made, changed = [0], asyncio.Event()

        async def one(index: int, after: int, n: int, seed: int) -> list[int]:
            while made[0] < after:
                changed.clear()
                await changed.wait()
            session = engine.create_session("tiny")
            ids: list[int] = []
            async for tokens in engine.generate(session.id, request(n, seed)):
                ids += [t.token_id for t in tokens]
                if index == 0:
                    made[0] = len(ids)
                    changed.set()
            engine.sessions.close(session.id)
            return ids

        return list(await asyncio.gather(*(one(i, *p) for i, p in enumerate(plan))))

    assert with_engine(lm_repo, alone) == with_engine(lm_repo, staggered, bound)


def test_mixed_lengths_and_long_inputs_batched_equal_alone(lm_repo: Path) -> None:
    """Feeds of different lengths (some longer than a chunk) at once: each ends where it does alone."""
    texts = ["a", "def add(a, b):\n    return a + b\n", "class Point:", "x", "    return a - b\n" * 3]

    async def feed_all(engine: Engine, concurrently: bool) -> list[tuple[int, list[int], list[float]]]:
        sessions = [engine.create_session("tiny") for _ in texts]

        async def one(i: int) -> tuple[int, list[int], list[float]]:
            result = await engine.feed(sessions[i].id, texts[i], top_k=5, token_logprobs=i % 2 == 1)
            return result.position, [c[0] for c in result.top], [c[2] for c in result.top]

        if concurrently:
            return list(await asyncio.gather(*(one(i) for i in range(len(texts)))))
        return [await one(i) for i in range(len(texts))]

    def check(engine_limits: dict[str, int]) -> None:
        alone = with_engine(lm_repo, lambda e: feed_all(e, False), **engine_limits)
        together = with_engine(lm_repo, lambda e: feed_all(e, True), **engine_limits)
        for (pos_a, ids_a, lp_a), (pos_b, ids_b, lp_b) in zip(alone, together, strict=True):
            assert pos_a == pos_b and ids_a == ids_b
            np.testing.assert_allclose(lp_a, lp_b, atol=1e-5)

    check({"chunk_tokens": 4})  # long inputs run as several chunks through a scratch slot
    check({})


@pytest.mark.parametrize("bound", [False, True])
def test_slab_sessions_created_and_closed_interleaved_never_see_each_others_state(
    lm_repo: Path, bound: bool
) -> None:
    async def work(engine: Engine) -> None:
        reference = engine.create_session("tiny")
        ref = await engine.feed(reference.id, "def f(x):")
        fresh = await engine.feed(engine.create_session("tiny").id, "x")
        live = []
        for round_ in range(6):
            # open a few, feed them different text, close every other one: their slots get reused
            opened = [engine.create_session("tiny") for _ in range(4)]
            await asyncio.gather(
                *(engine.feed(s.id, f"noise {round_} {i}" * 3) for i, s in enumerate(opened))
            )
            for s in opened[::2]:
                engine.sessions.close(s.id)
            live += opened[1::2]
            # a new session on a reused slot starts from the initial state
            new = engine.create_session("tiny")
            assert all(not v.any() for v in new.state.values())
            again = await engine.feed(new.id, "x")
            assert [c[0] for c in again.top] == [c[0] for c in fresh.top]
            np.testing.assert_allclose([c[2] for c in again.top], [c[2] for c in fresh.top], atol=1e-5)
            engine.sessions.close(new.id)
        # a long-lived session was never disturbed
        assert (await engine.feed(reference.id, "x")).position == ref.position + 1
        expect = await engine.feed(engine.create_session("tiny").id, "def f(x):x")
        got = engine.sessions.get(reference.id).next_logprobs
        assert got is not None
        np.testing.assert_allclose(got[[c[0] for c in expect.top]], [c[2] for c in expect.top], atol=1e-5)
        assert engine.sessions.slab(reference.model).in_use == len(engine.sessions)

    with_engine(lm_repo, work, bound)


def test_a_session_closed_while_generating_stops_it_and_frees_its_slot_after(lm_repo: Path) -> None:
    """Closing stops the generation at the next run (issue 12, item 7: it used to run to max_tokens);
    the reader gets the tokens made until then, then NotFound; the slot is freed once the call ends."""

    async def work(engine: Engine) -> None:
        session = engine.create_session("tiny")
        slab = session.slab
        request = GenerateRequest(
            SamplingParams(temperature=1.0, seed=1), max_tokens=4000, ignore_eos=True, prompt="a"
        )
        stream = engine.generate(session.id, request)
        first = await anext(stream)
        engine.sessions.close(session.id)
        assert session.slot >= 0 and slab.in_use == 1  # the call still holds it
        rest: list[GeneratedToken] = []
        with pytest.raises(NotFound, match="closed while generating"):
            async for tokens in stream:
                rest += tokens
        # At most a reader's lead (MAX_AHEAD) and the run in flight past what the reader had.
        assert len(first) + len(rest) <= len(first) + MAX_AHEAD + 1
        assert [t.position for t in first + rest] == list(range(2, 2 + len(first) + len(rest)))
        assert session.slot == -1 and slab.in_use == 0
        assert engine.schedulers["tiny@1"].generating == 0

    with_engine(lm_repo, work)


def test_slot_runner_gathers_and_scatters_by_slot(lm_repo: Path) -> None:
    model = tiny(lm_repo)
    slab = StateSlab(model.manifest.state, 8)
    runner = SlotRunner(model, slab)
    rng = np.random.default_rng(4)
    slots = [slab.allocate() for _ in range(5)]
    states = [random_state(model, rng) for _ in slots]
    for slot, state in zip(slots, states, strict=True):
        slab.write(slot, state)
    picked = [slots[3], slots[0], slots[4]]
    tokens = rng.integers(0, model.manifest.vocab_size, size=(3, 1))
    out = runner.run(tokens, picked, picked, last=True)
    batch = {k: np.concatenate([states[3][k], states[0][k], states[4][k]], axis=1) for k in states[0]}
    logits, new_state = model.run_last(tokens, batch)
    np.testing.assert_allclose(out[LAST_LOGITS], logits, atol=1e-5)
    for j, slot in enumerate(picked):
        for k in new_state:
            np.testing.assert_allclose(slab.read(slot)[k], new_state[k][:, j : j + 1], atol=1e-6)
    for untouched in (slots[1], slots[2]):
        for k in states[0]:
            np.testing.assert_array_equal(slab.read(untouched)[k], states[slots.index(untouched)][k])


@pytest.mark.parametrize("bound", [False, True])
def test_input_after_generation_continues_from_the_generated_state(lm_repo: Path, bound: bool) -> None:
    """Generated tokens are applied to the state (bound: the state left on the device is found again)."""

    async def work(engine: Engine) -> tuple[list[int], list[int], list[float]]:
        session = engine.create_session("tiny")
        request = GenerateRequest(
            SamplingParams(temperature=1.0, seed=9), max_tokens=12, ignore_eos=True, prompt="de"
        )
        generated = [t.token_id async for tokens in engine.generate(session.id, request) for t in tokens]
        after = await engine.feed(session.id, "x", top_k=5)
        return generated, [c[0] for c in after.top], [c[2] for c in after.top]

    async def replay(engine: Engine, generated: list[int]) -> tuple[list[int], list[float]]:
        session = engine.create_session("tiny")
        await engine.feed(session.id, "de")
        await engine.feed(session.id, generated)
        after = await engine.feed(session.id, "x", top_k=5)
        return [c[0] for c in after.top], [c[2] for c in after.top]

    generated, ids, logprobs = with_engine(lm_repo, work, bound)
    ids_b, logprobs_b = with_engine(lm_repo, lambda e: replay(e, generated))
    assert ids == ids_b
    np.testing.assert_allclose(logprobs, logprobs_b, atol=1e-5)


def test_more_generations_than_a_batch_take_turns(lm_repo: Path) -> None:
    """max_batch 2, four generations: each gets tokens before any of them is done (round robin)."""
    events: list[tuple[int, int]] = []  # (generation, tokens so far)

    async def work(engine: Engine) -> None:
        async def one(i: int) -> None:
            session = engine.create_session("tiny")
            request = GenerateRequest(SamplingParams(seed=i), max_tokens=40, ignore_eos=True, prompt="a")
            count = 0
            async for tokens in engine.generate(session.id, request):
                count += len(tokens)
                events.append((i, count))

        await asyncio.gather(*(one(i) for i in range(4)))

    with_engine(lm_repo, work, options=SchedulerOptions(max_batch=2, inline_max_tokens=0))
    first_done = next(n for n, (_, count) in enumerate(events) if count == 40)
    assert {i for i, _ in events[:first_done]} == {0, 1, 2, 3}


def test_a_failed_run_fails_its_rows_only_and_leaves_their_sessions_as_they_were(lm_repo: Path) -> None:
    async def work(engine: Engine) -> None:
        scheduler = engine.schedulers["tiny@1"]
        run = scheduler.runner.slots.run

        def failing(tokens: np.ndarray, *args: object) -> dict[str, np.ndarray]:
            if tokens.shape[1] == 3:
                raise RuntimeError("simulated ORT failure")
            return run(tokens, *args)  # type: ignore[arg-type]

        scheduler.runner.slots.run = failing  # type: ignore[method-assign]
        sessions = [engine.create_session("tiny") for _ in range(6)]
        results = await asyncio.gather(
            *(engine.feed(s.id, "abc" if i % 2 else "a") for i, s in enumerate(sessions)),
            return_exceptions=True,
        )
        for i, (session, result) in enumerate(zip(sessions, results, strict=True)):
            if i % 2:
                assert isinstance(result, RuntimeError) and session.position == 0
                assert all(not v.any() for v in session.state.values())
            else:
                assert not isinstance(result, BaseException) and result.position == 1

    with_engine(lm_repo, work, options=SchedulerOptions(max_wait_s=0.01))


def test_a_reader_that_goes_away_leaves_the_session_usable_and_consistent(lm_repo: Path) -> None:
    async def work(engine: Engine) -> None:
        session = engine.create_session("tiny")
        request = GenerateRequest(
            SamplingParams(temperature=1.0, seed=3), max_tokens=500, ignore_eos=True, prompt="a"
        )
        stream = engine.generate(session.id, request)
        seen = len(await anext(stream))
        await stream.aclose()  # what a cancelled Generate does
        assert not session.lock.locked()
        # every token applied is counted in the position (the generation may have run ahead of its reader)
        assert 1 + seen <= session.position <= 1 + 500
        position = session.position
        again = GenerateRequest(SamplingParams(seed=1), max_tokens=3, ignore_eos=True)
        tokens = [t async for batch in engine.generate(session.id, again) for t in batch]
        assert [t.position for t in tokens] == [position + 1, position + 2, position + 3]

    with_engine(lm_repo, work)


def test_a_prompt_longer_than_a_chunk_then_generation_equals_the_same_in_one_chunk(lm_repo: Path) -> None:
    prompt = "def add(a, b):\n    return a + b\n" * 4  # 128 chars: 16 chunks of 8

    async def work(engine: Engine) -> list[int]:
        request = GenerateRequest(
            SamplingParams(temperature=1.0, seed=2), max_tokens=20, ignore_eos=True, prompt=prompt
        )
        return [t.token_id for t in await generate(engine, request)]

    assert with_engine(lm_repo, work, chunk_tokens=8) == with_engine(lm_repo, work)


def test_generations_ending_in_different_ways_in_one_batch_leave_each_session_as_alone(lm_repo: Path) -> None:
    """Stop strings, stop ids, <eos> and max_tokens end generations at different runs of one batch.

    The next run of a batch starts before the last run's tokens are handed over (a pipeline of two),
    so a generation's end must be known when its last token is sampled: none may run a step past its
    end. Checked against each generation alone (tokens, finish reasons, positions) and against a
    replay of its tokens into a fresh session (the state it is left in: what the model says next).
    """
    Outcome = tuple[list[tuple[int, int, str | None]], int, list[float]]  # tokens, position, "after"

    def requests(engine: Engine) -> list[GenerateRequest]:
        codec = engine.repository.get("tiny", "").codec
        ends: list[dict[str, object]] = [
            {"stop": ["\n"]},
            {"stop": ["a", "e"]},
            {"stop": [" ("]},
            {"stop_token_ids": codec.encode("):")},
            {"stop_token_ids": codec.encode("(")},
            {},  # <eos> or max_tokens
            {"ignore_eos": True},
            {"stop": ["):"], "ignore_eos": True},
        ]
        return [
            GenerateRequest(SamplingParams(temperature=1.0, seed=seed), max_tokens=40, prompt="def ", **end)  # type: ignore[arg-type]
            for seed, end in enumerate(ends)
        ]

    async def after(engine: Engine, session_id: str) -> list[float]:
        return [c[2] for c in (await engine.feed(session_id, "x", top_k=5)).top]

    async def one(engine: Engine, request: GenerateRequest) -> Outcome:
        session = engine.create_session("tiny")
        tokens = [t async for batch in engine.generate(session.id, request) for t in batch]
        position = session.position
        return (
            [(t.token_id, t.position, t.finish_reason) for t in tokens],
            position,
            await after(engine, session.id),
        )

    async def replay(engine: Engine, tokens: list[int]) -> list[float]:
        session = engine.create_session("tiny")
        await engine.feed(session.id, "def ")
        await engine.feed(session.id, tokens)
        return await after(engine, session.id)

    async def alone(engine: Engine) -> list[Outcome]:
        return [await one(engine, r) for r in requests(engine)]

    async def together(engine: Engine) -> list[Outcome]:
        return list(await asyncio.gather(*(one(engine, r) for r in requests(engine))))

    expected = with_engine(lm_repo, alone)
    got = with_engine(lm_repo, together, options=SchedulerOptions(inline_max_tokens=0))
    finishes = {tokens[-1][2] for tokens, _, _ in got}
    assert "stop" in finishes and len(finishes) >= 2  # the cases really end in different ways
    assert [(t, p) for t, p, _ in got] == [(t, p) for t, p, _ in expected]
    replayed = with_engine(
        lm_repo, lambda e: asyncio.gather(*(replay(e, [i for i, _, _ in t]) for t, _, _ in got))
    )
    for (tokens, position, after_got), after_replayed in zip(got, replayed, strict=True):
        assert position == len("def ") + len(tokens)
        np.testing.assert_allclose(after_got, after_replayed, atol=1e-5)


def test_the_default_flush_holds_tokens_only_while_enough_sessions_generate(lm_repo: Path) -> None:
    async def hand_overs(engine: Engine, sessions: int, request: GenerateRequest) -> list[int]:
        async def one() -> int:
            session = engine.create_session("tiny")
            return len([batch async for batch in engine.generate(session.id, request)])

        return list(await asyncio.gather(*(one() for _ in range(sessions))))

    request = GenerateRequest(
        SamplingParams(seed=1), max_tokens=60, ignore_eos=True, prompt="a", max_tokens_per_message=64
    )

    def frozen(engine: Engine) -> Awaitable[list[int]]:
        engine.clock = lambda: 0.0  # the flush interval never passes, however slow the machine
        return hand_overs(engine, 2, request)

    # The first token goes out at once (time to first token); the other 59 are held (the interval
    # never passes on the frozen clock), so they arrive in one piece when the generation ends.
    held = with_engine(
        lm_repo,
        frozen,
        options=SchedulerOptions(inline_max_tokens=0),
        generate_flush_ms=300,
        generate_flush_min_sessions=2,
    )
    assert held == [2, 2]
    # One token per hand-over when asked for one per message, whatever the server's default.
    single = GenerateRequest(SamplingParams(seed=1), max_tokens=30, ignore_eos=True, prompt="a")
    one_each = with_engine(
        lm_repo, lambda e: hand_overs(e, 2, single), generate_flush_ms=300, generate_flush_min_sessions=2
    )
    assert one_each[0] >= 2


def test_flush_policy_interval() -> None:
    from rnnserve.server.generation import FlushPolicy

    policy = FlushPolicy(per_message=64, interval_s=0.05, min_sessions=8)
    assert policy.interval(generating=7, phase=0.5) == 0.0  # light load: tokens go out at once
    assert policy.interval(generating=8, phase=0.0) == pytest.approx(0.025)
    assert policy.interval(generating=64, phase=0.999) == pytest.approx(0.05, rel=1e-3)
