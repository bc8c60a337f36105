"""A bundle's turn graph in the runner: rows that end a turn (their last token is the end-of-turn token)
run through the turn graph, the others through the step graph, and a plan mixing both kinds (step rows
and sampled generations, an <eos> fed under ignore_eos included) gives each row what it gets alone and
what `DialogueModel.stream` computes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from dialogue_bundle import make_dialogue_bundle, make_dialogue_checkpoint

from rnnserve.export.manifest import read_manifest
from rnnserve.server import metrics
from rnnserve.server.runner import LAST_LOGPROBS, ModelRunner, RunOutput, RunPlan
from rnnserve.server.runtime import OnnxModel
from rnnserve.server.sampling import Sampler, SamplingParams, log_softmax
from rnnserve.server.slab import State, StateSlab
from rnnserve.server.slots import SlotRunner
from rnnserve.training.dialogue_checkpoint import load_dialogue_checkpoint
from rnnserve.training.dialogue_model import DialogueModel

EOS = 1
SEED = 4


@dataclass
class Step:
    tokens: np.ndarray  # int64 [seq]
    src: int
    dst: int
    last: bool
    start_state: State | None = None


@dataclass
class Generating:
    slot: int
    sampler: Sampler


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[OnnxModel, DialogueModel]:
    """The bundle's runtime (VHRED: z passes through the step graph too) and the PyTorch model."""
    root = tmp_path_factory.mktemp("dialogue_runs")
    bundle = make_dialogue_bundle(root / "repo", name="chat", cell="lstm", seed=SEED, latent_dim=2)
    model, _, _ = load_dialogue_checkpoint(make_dialogue_checkpoint(root / "run", "lstm", SEED, latent_dim=2))
    return OnnxModel(bundle, read_manifest(bundle)), model


# (tokens, last): same lengths with and without <eos> at the end, so only the turn splits the runs
STEPS = [([4, 5, EOS], False), ([4, 5, 6], False), ([EOS], True), ([7], True), ([9, 2, EOS], False)]
SAMPLED = [EOS, 9, EOS]  # the tokens generations feed (an <eos> under ignore_eos: the turn ends)


def random_state(model: OnnxModel, rng: np.random.Generator) -> State:
    return {k: (rng.random(v.shape, dtype=np.float32) - 0.5) for k, v in model.initial_state(1).items()}


def run_plan(
    model: OnnxModel,
    steps: list[tuple[list[int], bool]],
    sampled: list[int],
    starts: list[State],
    bound: bool,
) -> tuple[RunOutput, list[State]]:
    """One plan (one scheduler run) over `steps` then `sampled`, each row from its start state in
    `starts`: (the output, the states after)."""
    rows = len(steps) + len(sampled)
    slab = StateSlab(model.manifest.state, rows + 2)
    runner = ModelRunner(model, slab, metrics.ModelMetrics("test_dialogue_runs"))
    runner.slots = SlotRunner(model, slab, io_binding=bound)  # bound: the CUDA bookkeeping, on the CPU
    slots = [slab.allocate() for _ in range(rows)]
    for slot, state in zip(slots, starts, strict=True):
        slab.write(slot, state)
    step_rows = [
        Step(np.asarray(t, dtype=np.int64), s, s, last) for (t, last), s in zip(steps, slots, strict=False)
    ]
    generating = [
        Generating(s, Sampler(SamplingParams(temperature=1.0, seed=k)))
        for k, s in enumerate(slots[len(steps) :])
    ]
    plan = RunPlan(steps=step_rows, sampled=generating, sampled_tokens=sampled)
    output = runner.execute(plan)
    runner.slots.flush(slots)
    return output, [slab.read(s) for s in slots]


@torch.no_grad()
def reference(model: DialogueModel, tokens: list[int], state: State) -> tuple[np.ndarray, State]:
    """`DialogueModel.stream` (token by token, the fused step): (logits [seq, vocab], the new state)."""
    names = model.args.state_names
    logits, new = model.stream(torch.tensor([tokens]), tuple(torch.from_numpy(state[n]) for n in names))
    return logits[0].numpy(), {n: v.numpy() for n, v in zip(names, new, strict=True)}


def assert_states_close(got: State, want: State) -> None:
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("bound", [False, True], ids=["host", "io_binding"])
def test_a_plan_mixing_rows_that_end_a_turn_gives_each_row_what_it_gets_alone(
    served: tuple[OnnxModel, DialogueModel], bound: bool
) -> None:
    runtime, model = served
    assert runtime.turn is not None and runtime.end_of_turn == EOS
    rng = np.random.default_rng(1)
    starts = [random_state(runtime, rng) for _ in range(len(STEPS) + len(SAMPLED))]
    output, after = run_plan(runtime, STEPS, SAMPLED, starts, bound)
    # (3, full logits) with and without a turn, (1, last position) with and without: four runs
    assert output.runs == 4
    fed = [*(t for t, _ in STEPS), *([t] for t in SAMPLED)]
    for i, tokens in enumerate(fed):
        logits, state = reference(model, tokens, starts[i])
        if i < len(STEPS):
            out = output.step_outputs[i]
            assert isinstance(out, dict)
            if STEPS[i][1]:
                np.testing.assert_allclose(out[LAST_LOGPROBS], log_softmax(logits[-1]), atol=1e-5)
            else:
                np.testing.assert_allclose(out["logits"], logits, atol=1e-5)
        else:
            sampled = output.sampled[i - len(STEPS)]
            assert not isinstance(sampled, Exception)
            np.testing.assert_allclose(sampled[0], log_softmax(logits[-1]), atol=1e-5)
        assert_states_close(after[i], state)
    for i, step in enumerate(STEPS):  # alone: one row, one run
        alone, alone_after = run_plan(runtime, [step], [], [starts[i]], bound)
        assert alone.runs == 1
        key = LAST_LOGPROBS if step[1] else "logits"
        out, alone_out = output.step_outputs[i], alone.step_outputs[0]
        assert isinstance(out, dict) and isinstance(alone_out, dict)
        np.testing.assert_allclose(out[key], alone_out[key], atol=1e-5)
        assert_states_close(after[i], alone_after[0])


def test_only_rows_ending_with_the_end_of_turn_token_run_the_turn_graph(
    served: tuple[OnnxModel, DialogueModel],
) -> None:
    runtime, _ = served
    assert runtime.ends_turn(EOS) and not runtime.ends_turn(5)
    rng = np.random.default_rng(0)
    state = random_state(runtime, rng)
    tokens = np.array([[4, 6]], dtype=np.int64)  # no <eos>: the step graph leaves ctx and z as they were
    _, within = runtime.run(tokens, state)
    for name in ("ctx.h", "ctx.c", "z"):
        np.testing.assert_array_equal(within[name], state[name])
    _, turned = runtime.run(np.array([[4, EOS]], dtype=np.int64), state, turn=True)
    assert not np.allclose(turned["ctx.h"], state["ctx.h"])  # the context advanced
    assert not turned["enc.h"].any()  # the encoder restarts after the turn
