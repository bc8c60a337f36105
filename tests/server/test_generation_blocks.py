"""K-step generation blocks (issue 13): the same seed gives the same tokens with the host path, K=1 and
K=8, for every cell; a generation that ends inside a block leaves its session exactly where one-token
runs would (state, position, next-token distribution), at every position of a block; cancelling, closing
and a failing run leave every session consistent and the others untouched.

The models are small untrained LMs of each cell (random weights sample varied tokens), exported with
the bundle's generation graphs; engines run in-process (no gRPC) with the graphs forced on or off.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from support import CELLS, run_engine_with

from rnnserve.export.manifest import read_manifest
from rnnserve.server.engine import Engine, GeneratedToken, GenerateRequest
from rnnserve.server.repository import ModelRepository
from rnnserve.server.runtime import RuntimeOptions
from rnnserve.server.sampling import SamplingParams
from rnnserve.server.scheduler import SchedulerOptions
from rnnserve.server.sessions import Session, SessionLimits

T = TypeVar("T")
PROMPT = "def "
HOST = RuntimeOptions(device="cpu", generate_graphs="off")  # one host-sampled token per run
K1 = RuntimeOptions(device="cpu", generate_graphs="on", generate_steps=1)
K8 = RuntimeOptions(device="cpu", generate_graphs="on", generate_steps=8)
SAMPLINGS = [
    SamplingParams(temperature=1.0, seed=5),  # plain: the plain graph
    SamplingParams(temperature=0.7, seed=6),
    SamplingParams(temperature=0.0),  # greedy
    SamplingParams(temperature=1.0, top_k=5, seed=7),  # a cut: the cut graph
    SamplingParams(temperature=1.3, top_k=10, top_p=0.8, seed=8),
]


def with_engine(repo: Path, options: RuntimeOptions, work: Callable[[Engine], Awaitable[T]]) -> T:
    def make() -> Engine:
        return Engine(
            ModelRepository.load(repo, options),
            SessionLimits(max_sessions=64),
            SchedulerOptions(inline_max_tokens=0),  # every run in the worker: the pipelined path
        )

    return run_engine_with(make, work)


async def generate(engine: Engine, session: Session, request: GenerateRequest) -> list[GeneratedToken]:
    return [t async for tokens in engine.generate(session.id, request) for t in tokens]


def request(sampling: SamplingParams, max_tokens: int, **fields: Any) -> GenerateRequest:
    return GenerateRequest(sampling, max_tokens=max_tokens, ignore_eos=True, **fields)


def state_of(session: Session) -> dict[str, np.ndarray]:
    return {name: value.copy() for name, value in session.state.items()}


@pytest.mark.parametrize("cell", CELLS)
def test_the_same_seed_gives_the_same_tokens_with_the_host_path_k1_and_k8(cell_repo: Path, cell: str) -> None:
    """Every sampling kind, all generating at once (one batch), with prompts."""

    async def work(engine: Engine) -> list[list[int]]:
        sessions = [engine.create_session(cell) for _ in SAMPLINGS]
        runs = [
            generate(engine, s, request(p, 21, prompt=PROMPT))
            for s, p in zip(sessions, SAMPLINGS, strict=True)
        ]
        return [[t.token_id for t in tokens] for tokens in await asyncio.gather(*runs)]

    host, k1, k8 = (with_engine(cell_repo, options, work) for options in (HOST, K1, K8))
    assert all(len(tokens) == 21 for tokens in host)
    assert k1 == host
    assert k8 == host
    assert len({tuple(t) for t in host}) > 1  # the samplings really differ


def test_the_engine_runs_blocks_when_the_graph_is_on(cell_repo: Path) -> None:
    """K=8 makes 21 tokens of a plain generation in 3 block runs (+ the prompt, + the replay of the block
    that ran past the end); the host path takes a run per token."""

    async def work(engine: Engine) -> int:
        session = engine.create_session("lstm")
        before = engine.schedulers["lstm@1"].batches_run
        await generate(engine, session, request(SAMPLINGS[0], 21, prompt=PROMPT))
        await asyncio.sleep(0)
        return engine.schedulers["lstm@1"].batches_run - before

    assert with_engine(cell_repo, K8, work) == 1 + 3 + 1
    assert with_engine(cell_repo, HOST, work) == 1 + 21


@pytest.mark.parametrize("cell", CELLS)
def test_a_generation_ending_inside_a_block_leaves_the_session_as_one_token_runs_do(
    cell_repo: Path, cell: str
) -> None:
    """Ending after 1..17 tokens covers every position of a K=8 block (and its edges): position, state,
    next-token distribution and what a feed then returns equal those of the host path."""
    lengths = range(1, 18)

    async def work(engine: Engine) -> list[tuple[int, dict[str, np.ndarray], np.ndarray, list[float]]]:
        async def one(n: int) -> tuple[int, dict[str, np.ndarray], np.ndarray, list[float]]:
            session = engine.create_session(cell)
            await generate(engine, session, request(SAMPLINGS[0], n, prompt=PROMPT))
            position, state = session.position, state_of(session)
            assert session.next_logprobs is not None
            following = np.array(session.next_logprobs)
            fed = await engine.feed(session.id, "x = 1", token_logprobs=True)
            return position, state, following, fed.token_logprobs

        return list(await asyncio.gather(*(one(n) for n in lengths)))

    blocks, single = with_engine(cell_repo, K8, work), with_engine(cell_repo, HOST, work)
    for n, (b, s) in zip(lengths, zip(blocks, single, strict=True), strict=True):
        assert b[0] == s[0] == len(PROMPT) + n
        for name in s[1]:
            np.testing.assert_allclose(b[1][name], s[1][name], atol=1e-5, err_msg=f"{name} after {n} tokens")
        np.testing.assert_allclose(b[2], s[2], atol=1e-5, err_msg=f"next logprobs after {n} tokens")
        np.testing.assert_allclose(b[3], s[3], atol=1e-5, err_msg=f"feed after {n} tokens")


def test_a_stop_token_inside_a_block_ends_the_generation_exactly(cell_repo: Path) -> None:
    """A stop id met inside a block ends the generation there, as with one-token runs."""

    async def work(engine: Engine) -> tuple[list[int], int]:
        reference = await generate(
            engine, engine.create_session("gru"), request(SAMPLINGS[0], 20, prompt=PROMPT)
        )
        stop = reference[10].token_id  # the first time it comes may be earlier: that is where it stops
        session = engine.create_session("gru")
        tokens = await generate(
            engine, session, request(SAMPLINGS[0], 20, prompt=PROMPT, stop_token_ids=[stop])
        )
        assert tokens[-1].finish_reason == "stop" and tokens[-1].token_id == stop
        return [t.token_id for t in tokens], session.position

    assert with_engine(cell_repo, K8, work) == with_engine(cell_repo, HOST, work)


def test_cancelling_mid_block_leaves_the_session_consistent(cell_repo: Path) -> None:
    """A reader that goes away after its first message: the tokens made meanwhile are applied (as with
    one-token runs), and the session is exactly a session that generated that many tokens."""

    async def work(engine: Engine) -> None:
        session = engine.create_session("lstm")
        stream = engine.generate(session.id, request(SAMPLINGS[1], 200, prompt=PROMPT))
        await stream.__anext__()
        await stream.aclose()  # the Generate call ended by its client
        made = session.position - len(PROMPT)
        assert 1 <= made < 200
        twin = engine.create_session("lstm")
        await generate(engine, twin, request(SAMPLINGS[1], made, prompt=PROMPT))
        assert twin.position == session.position
        for name, value in state_of(twin).items():
            np.testing.assert_allclose(state_of(session)[name], value, atol=1e-5)
        assert session.next_logprobs is not None and twin.next_logprobs is not None
        np.testing.assert_allclose(session.next_logprobs, twin.next_logprobs, atol=1e-5)

    with_engine(cell_repo, K8, work)


def test_closing_a_session_mid_block_leaves_the_others_untouched(cell_repo: Path) -> None:
    async def work(engine: Engine, close_one: bool) -> list[list[int]]:
        sessions = [engine.create_session("rnn_tanh") for _ in range(3)]
        runs = [
            asyncio.ensure_future(generate(engine, s, request(SAMPLINGS[i % 2], 40, prompt=PROMPT)))
            for i, s in enumerate(sessions)
        ]
        if close_one:
            while sessions[1].position <= len(PROMPT):  # it has generated: its blocks are running
                await asyncio.sleep(0)
            engine.sessions.close(sessions[1].id)
        results = await asyncio.gather(*runs, return_exceptions=True)
        return [[t.token_id for t in r] for i, r in enumerate(results) if i != 1 and isinstance(r, list)]

    alone = with_engine(cell_repo, K8, lambda e: work(e, False))
    closed = with_engine(cell_repo, K8, lambda e: work(e, True))
    assert closed == alone and len(closed) == 2


def test_a_failing_block_ends_the_generation_and_leaves_its_session_consistent(cell_repo: Path) -> None:
    """The second block fails: the reader gets the tokens of the first, then the error; the session is
    exactly after them (replayed from the first block's start), and a later feed works."""

    async def work(engine: Engine) -> None:
        slots = engine.schedulers["lstm@1"].runner.slots
        real, blocks = slots.run_block, [0]

        def failing_second(*args: Any) -> Any:
            blocks[0] += 1
            if blocks[0] == 2:
                raise RuntimeError("injected failure")
            return real(*args)

        slots.run_block = failing_second  # type: ignore[method-assign]
        session = engine.create_session("lstm")
        got: list[GeneratedToken] = []
        with pytest.raises(RuntimeError, match="model failed"):
            async for tokens in engine.generate(session.id, request(SAMPLINGS[0], 100, prompt=PROMPT)):
                got += tokens
        slots.run_block = real  # type: ignore[method-assign]
        assert session.position == len(PROMPT) + len(got) == len(PROMPT) + 8
        twin = engine.create_session("lstm")
        await generate(engine, twin, request(SAMPLINGS[0], 8, prompt=PROMPT))
        for name, value in state_of(twin).items():
            np.testing.assert_allclose(state_of(session)[name], value, atol=1e-5)
        assert session.next_logprobs is not None and twin.next_logprobs is not None
        np.testing.assert_allclose(session.next_logprobs, twin.next_logprobs, atol=1e-5)
        assert (await engine.feed(session.id, "x")).position == twin.position + 1

    with_engine(cell_repo, K8, work)


def test_graph_settings_are_checked(cell_repo: Path) -> None:
    """A K the bundles lack, or an unknown --generate-graphs, is refused with a clear error."""
    from rnnserve.server.runtime import OnnxModel

    bundle = cell_repo / "lstm" / "1"
    manifest = read_manifest(bundle)
    with pytest.raises(ValueError, match="no generation graph of 5 steps"):
        OnnxModel(bundle, manifest, RuntimeOptions(device="cpu", generate_graphs="on", generate_steps=5))
    with pytest.raises(ValueError, match="generate_graphs must be one of auto, on, off"):
        OnnxModel(bundle, manifest, RuntimeOptions(device="cpu", generate_graphs="always"))
    off = OnnxModel(bundle, manifest, RuntimeOptions(device="cpu", generate_graphs="off"))
    auto = OnnxModel(bundle, manifest, RuntimeOptions(device="cpu"))
    assert not off.generate
    assert auto.generate and all(plain for _, plain in auto.generate)  # on a CPU: the plain graphs
    out = subprocess.run(
        [sys.executable, "-m", "rnnserve", "serve", "--repo", str(cell_repo), "--generate-graphs", "always"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "--generate-graphs must be one of auto, on, off" in out.stderr
