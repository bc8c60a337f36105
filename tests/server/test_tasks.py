"""Task classes (tasks.py) and whole-text Classify through the scheduler, in-process with real models.

`tiny` is a language model, `live` a streaming (unidirectional) classifier, `bi` a whole-text
(bidirectional) classifier: each gets its task class, which says what is allowed. A whole-text Classify
is work the model's scheduler queues and its runner runs (counted in batches_run and the model's
metrics), batched with concurrent Classify calls, with results equal to each text alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from prometheus_client import REGISTRY
from support import SENTIMENT_TEXTS, run_engine_with

from rnnserve.server.engine import Engine, EngineLimits
from rnnserve.server.errors import FailedPrecondition, InvalidArgument
from rnnserve.server.repository import LoadedModel, ModelRepository
from rnnserve.server.scheduler import SchedulerOptions
from rnnserve.server.tasks import (
    LanguageModelTask,
    StreamingClassifierTask,
    WholeTextClassifierTask,
)

T = TypeVar("T")
TEXTS = SENTIMENT_TEXTS


@pytest.fixture(scope="module")
def repo(lm_repo: Path, classifier_checkpoints: dict[str, Path]) -> Path:
    """The repository with `tiny`, `live` and `bi`."""
    return lm_repo


def run_engine(repo: Path, work: Callable[[Engine], Awaitable[T]], **limits: Any) -> T:
    def make() -> Engine:
        return Engine(
            ModelRepository.load(repo), scheduler_options=SchedulerOptions(), limits=EngineLimits(**limits)
        )

    return run_engine_with(make, work)


def metric(name: str, key: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": key}) or 0.0


def alone(model: LoadedModel, ids: list[int]) -> np.ndarray:
    """probs [classes] of one text through the whole-sequence graph, unpadded."""
    tokens = np.asarray([ids], dtype=np.int64)  # [1, seq]
    outputs, _ = model.runtime.run(tokens, {}, np.array([len(ids)], dtype=np.int64))
    return np.asarray(outputs["probs"][0])


def test_each_model_gets_its_task_and_its_refusals(repo: Path) -> None:
    async def work(engine: Engine) -> None:
        tasks = {name: engine.tasks[engine.repository.get(name).key] for name in ("tiny", "live", "bi")}
        assert isinstance(tasks["tiny"], LanguageModelTask)
        assert isinstance(tasks["live"], StreamingClassifierTask)
        assert isinstance(tasks["bi"], WholeTextClassifierTask)
        assert tasks["tiny"].last_position(token_logprobs=False)
        assert not tasks["tiny"].last_position(token_logprobs=True)
        assert not tasks["live"].last_position(token_logprobs=False)
        for task in tasks.values():
            if task is not tasks["bi"]:
                task.check_session()
        with pytest.raises(FailedPrecondition, match=r"bidirectional classifier.*use Classify"):
            tasks["bi"].check_session()
        with pytest.raises(FailedPrecondition, match="Classify needs a classifier"):
            tasks["tiny"].check_classify()
        for name in ("live", "bi"):
            tasks[name].check_classify()
            with pytest.raises(FailedPrecondition, match="Generate needs a language model"):
                tasks[name].check_generate()
            with pytest.raises(InvalidArgument, match="return_token_logprobs needs a language model"):
                tasks[name].check_token_logprobs()
        # What a Stream reply carries: top candidates for the language model, a classification otherwise.
        lm, live = engine.create_session("tiny"), engine.create_session("live")
        lm_result = await engine.feed(lm.id, "def", top_k=3)
        live_result = await engine.feed(live.id, "brilliant")
        assert len(lm_result.top) == 3 and lm_result.classification is None
        assert live_result.top == [] and live_result.classification is not None

    run_engine(repo, work)


def test_whole_text_classify_runs_through_the_scheduler(repo: Path) -> None:
    """Sorted by length, classify_batch texts per run: 5 texts in runs of 2 are 3 runs of the model's
    scheduler, counted in its metrics, with each text's probabilities as if it ran alone."""

    async def work(engine: Engine) -> None:
        model = engine.repository.get("bi")
        scheduler = engine.schedulers[model.key]
        runs, rows = scheduler.batches_run, scheduler.steps_run
        before = {
            name: metric(name, model.key)
            for name in (
                "rnnserve_batch_size_count",
                "rnnserve_batch_size_sum",
                "rnnserve_step_latency_seconds_count",
                "rnnserve_queue_wait_seconds_count",
            )
        }
        loaded, results = await engine.classify("bi", "", TEXTS)
        assert loaded is model
        assert scheduler.batches_run - runs == 3 and scheduler.steps_run - rows == len(TEXTS)
        grew = {name: metric(name, model.key) - value for name, value in before.items()}
        assert grew["rnnserve_batch_size_count"] == 3 and grew["rnnserve_batch_size_sum"] == len(TEXTS)
        assert grew["rnnserve_step_latency_seconds_count"] == 3
        assert grew["rnnserve_queue_wait_seconds_count"] == 3  # one per queued group
        ids = [model.codec.encode(t) for t in TEXTS]
        for result, text_ids in zip(results, ids, strict=True):
            np.testing.assert_allclose(result.probs, alone(model, text_ids), atol=1e-5)

    run_engine(repo, work, classify_batch=2)


def test_concurrent_classify_calls_share_runs_and_other_models_are_unaffected(repo: Path) -> None:
    """Four Classify calls on `bi` at once, with session work on `tiny` and `live` and a streaming
    Classify on `live`: the `bi` calls share one run (all queued before the scheduler's next batch), each
    gets its own texts' probabilities, and the other models' results equal the same work done alone."""

    async def other_models(engine: Engine) -> tuple[list[float], list[float], list[list[float]]]:
        lm, live = engine.create_session("tiny"), engine.create_session("live")
        lm_result, live_result, streamed = await asyncio.gather(
            engine.feed(lm.id, "def add(a, b):", top_k=5),
            engine.feed(live.id, TEXTS[4]),
            engine.classify("live", "", TEXTS[:3]),
        )
        assert live_result.classification is not None
        return (
            [c[2] for c in lm_result.top],
            live_result.classification.probs,
            [r.probs for r in streamed[1]],
        )

    async def work(engine: Engine) -> None:
        model = engine.repository.get("bi")
        scheduler = engine.schedulers[model.key]
        expected_other = await other_models(engine)
        calls = [TEXTS[:2], TEXTS[2:3], TEXTS[3:5], [TEXTS[1]]]
        runs = scheduler.batches_run
        *results, got_other = await asyncio.gather(
            *(engine.classify("bi", "", texts) for texts in calls), other_models(engine)
        )
        assert scheduler.batches_run - runs == 1
        for texts, (_, classified) in zip(calls, results, strict=True):
            assert len(classified) == len(texts)
            for text, result in zip(texts, classified, strict=True):
                np.testing.assert_allclose(result.probs, alone(model, model.codec.encode(text)), atol=1e-5)
        for got, expected in zip(got_other, expected_other, strict=True):
            np.testing.assert_allclose(got, expected, atol=1e-5)

    run_engine(repo, work)


def test_a_failing_classify_run_fails_its_call_only(repo: Path) -> None:
    """A run that raises fails the Classify whose texts it held (not counted as a run); the next call
    runs normally."""

    async def work(engine: Engine) -> None:
        model = engine.repository.get("bi")
        scheduler = engine.schedulers[model.key]
        real_run = model.runtime.run
        calls = [0]

        def failing_once(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("injected ORT failure")
            return real_run(*args, **kwargs)

        model.runtime.run = failing_once  # type: ignore[method-assign]
        try:
            runs = scheduler.batches_run
            with pytest.raises(RuntimeError, match="injected"):
                await engine.classify("bi", "", TEXTS[:2])
            assert scheduler.batches_run == runs
            _, results = await engine.classify("bi", "", TEXTS[:2])
            assert scheduler.batches_run == runs + 1 and len(results) == 2
        finally:
            model.runtime.run = real_run  # type: ignore[method-assign]

    run_engine(repo, work)
