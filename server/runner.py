"""The model runner: runs what the scheduler chose, on ONNX Runtime, and samples. Knows no sessions.

One plan (`RunPlan`) is up to four kinds of rows, the first three stacked along the state's batch axis:
- steps: tokens [seq] of one input (streamed text, a prompt, a rollback replay), from a slot (or a given
  start state) to a slot; rows of equal length and kind run together, so nothing is padded, and rows
  that end a turn (a bundle with a turn graph: their last token is its end-of-turn token) apart from
  those that don't, each kind through its own graph;
- sampled generations: one token each through the step graph's last position, the next token sampled
  on the host for all of them at once (vectorised, each row from its session's own random stream);
- a block of generations: K tokens each through a K-step generation graph, sampled inside the graph from
  uniforms drawn from the same streams, so a run returns ids, not logits (see export/generate_graph.py);
- whole-text Classify groups (a whole-sequence classifier: no state): the plan's texts sorted by length,
  padded into runs of at most `run_rows` texts: tokens [run, longest] + lengths [run] -> probs [run,
  classes] (exact under padding).
Which kinds a model gets is its task's business (tasks.py): only a language model's steps ask for the
last position, only a language model generates, only a whole-text classifier classifies here.
A failing run fails its own rows only; the slab is written after a run succeeds.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from rnnserve.server import metrics
from rnnserve.server.runtime import LAST_LOGITS, GenerateGraphRuntime, OnnxModel, Outputs
from rnnserve.server.sampling import Sampler, draw_batch, log_softmax_and_weights, sample_batch
from rnnserve.server.slab import State, StateSlab
from rnnserve.server.slots import BlockControls, BlockOutput, SlotRunner

log = logging.getLogger(__name__)

LAST_LOGPROBS = "logprobs_last"  # log-softmax of the last position, [vocab] per row (language models)
Sampled = tuple[np.ndarray, int]  # a generation's logprobs [vocab] after its token, and the next token
GroupKey = tuple[int, bool, bool]  # (seq, last, ends turn): the rows of one run


class StepRow(Protocol):
    tokens: np.ndarray  # int64 [seq]
    src: int  # state slot read (unless start_state is given)
    dst: int  # state slot written
    last: bool  # language model: only the last position's log-probabilities are wanted
    start_state: State | None  # batch-1 start state in the graph's layout, instead of slot src


class ClassifyRow(Protocol):
    texts: Sequence[Sequence[int]]  # token ids of each whole text
    pad: int  # the padding id
    run_rows: int  # texts per run at most (the engine's classify_batch)


class GeneratingRow(Protocol):
    slot: int
    sampler: Sampler  # its sampling parameters and its own random stream


@dataclass
class RunPlan:
    steps: Sequence[StepRow] = ()
    sampled: Sequence[GeneratingRow] = ()
    sampled_tokens: Sequence[int] = ()  # the token each sampled generation feeds
    block: Sequence[GeneratingRow] = ()
    block_tokens: Sequence[int] = ()  # x0 of each block generation
    block_graph: GenerateGraphRuntime | None = None
    classify: Sequence[ClassifyRow] = ()

    @property
    def tokens(self) -> int:
        """Tokens this plan applies (a block counts K per row)."""
        steps = sum(len(r.tokens) for r in self.steps)
        classify = sum(len(t) for r in self.classify for t in r.texts)
        block = len(self.block) * (self.block_graph.steps if self.block_graph else 0)
        return steps + len(self.sampled) + block + classify


@dataclass
class RunOutput:
    step_outputs: list[Outputs | Exception]  # per step: its outputs, or why its run failed
    sampled: list[Sampled | Exception]  # per sampled generation
    block: BlockOutput | Exception | None  # the block's ids, logprobs and start states
    seconds: float = 0.0  # how long the whole plan took
    runs: int = field(default=0)  # ORT runs made
    # per Classify group: its probs [texts, classes], or why a run of its texts failed
    classified: list[np.ndarray | Exception] = field(default_factory=list)


class ModelRunner:
    """Owns a model version's state slab (through SlotRunner) and its graphs; runs plans."""

    def __init__(self, model: OnnxModel, slab: StateSlab, model_metrics: metrics.ModelMetrics) -> None:
        self.model = model
        self.slab = slab
        self.slots = SlotRunner(model, slab)
        self.metrics = model_metrics
        self.vocab_size = model.manifest.vocab_size
        self.batches_run = 0  # ORT runs
        self.steps_run = 0  # rows run (steps and generated tokens)

    def block_graph_for(self, rows: Sequence[GeneratingRow]) -> GenerateGraphRuntime | None:
        """The generation graph a block of these rows runs on (rows are those `expresses` accepted):
        the plain one when no row has a cut, else the cut one."""
        if not rows:
            return None
        return self.model.generate_graph(plain=all(_plain(g.sampler) for g in rows))

    def expresses(self, sampler: Sampler) -> bool:
        """Whether a generation with these settings can run in a generation graph loaded."""
        graph = self.model.generate_graph(plain=_plain(sampler))
        p = sampler.params
        return graph is not None and graph.expresses(p.top_k, p.top_p, self.vocab_size)

    def execute(self, plan: RunPlan) -> RunOutput:
        """Run a plan: each group of equal-length step rows (with the sampled generations, which are
        one-token last-position rows) once, then the block, then the Classify groups."""
        started = time.perf_counter()
        output = RunOutput([{}] * len(plan.steps), [], None)
        self._run_steps(plan, output)
        if plan.block:
            output.block = self._run_block(plan)
        if plan.classify:
            output.classified = self._run_classify(plan.classify, output)
        output.seconds = time.perf_counter() - started
        return output

    def _step_groups(self, plan: RunPlan) -> dict[GroupKey, list[int]]:
        """Row indices by the run they share, ascending: the step rows (0..n-1) by (seq, last, ends
        turn), then the sampled generations (n + k) as one-token last-position rows. A row ends a turn
        when the model has a turn graph and the row's last token (a generation's: the token it feeds,
        sampled, e.g. an <eos> under ignore_eos) is its end-of-turn token (OnnxModel.ends_turn)."""
        ends_turn = self.model.ends_turn
        groups: dict[GroupKey, list[int]] = defaultdict(list)
        for i, r in enumerate(plan.steps):
            groups[(len(r.tokens), r.last, len(r.tokens) > 0 and ends_turn(int(r.tokens[-1])))].append(i)
        n = len(plan.steps)
        for k, token in enumerate(plan.sampled_tokens):
            groups[(1, True, ends_turn(int(token)))].append(n + k)
        return groups

    def _run_steps(self, plan: RunPlan, output: RunOutput) -> None:
        sampled: dict[int, Sampled | Exception] = {}  # per sampled generation, filled group by group
        for key, indices in self._step_groups(plan).items():
            self._run_group(plan, key, indices, output, sampled)
        if plan.sampled:
            output.sampled = [sampled[k] for k in range(len(plan.sampled))]

    def _run_group(
        self,
        plan: RunPlan,
        key: GroupKey,
        indices: list[int],
        output: RunOutput,
        sampled: dict[int, Sampled | Exception],
    ) -> None:
        """One run over the rows `indices` (steps first, then generations: see _step_groups)."""
        steps, n = plan.steps, len(plan.steps)
        _, last, turn = key
        first_sampled = bisect.bisect_left(indices, n)  # rows before it are steps
        gens = [i - n for i in indices[first_sampled:]]  # the group's sampled generations
        src = [steps[i].src for i in indices[:first_sampled]] + [plan.sampled[k].slot for k in gens]
        dst = [steps[i].dst for i in indices[:first_sampled]] + [plan.sampled[k].slot for k in gens]
        parts = (
            [np.asarray([plan.sampled_tokens[k] for k in gens], dtype=np.int64).reshape(-1, 1)]
            if gens
            else []
        )
        if first_sampled:
            parts.insert(0, np.stack([steps[i].tokens for i in indices[:first_sampled]]))
        tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)  # [group, seq]
        given: dict[int, State] = {}
        for row, i in enumerate(indices[:first_sampled]):
            start = steps[i].start_state
            if start is not None:
                given[row] = start
        run_started = time.perf_counter()
        try:
            out = self.slots.run(tokens, src, dst, last, given, turn)
        except Exception as exc:
            log.exception("model %s failed on a run of %d rows", self.model.key, len(indices))
            for i in indices[:first_sampled]:
                output.step_outputs[i] = exc
            sampled.update({k: exc for k in gens})
            return
        self._count(len(indices), time.perf_counter() - run_started, output)
        if LAST_LOGITS in out:
            logprobs, weights = log_softmax_and_weights(out[LAST_LOGITS])  # [group, vocab] each
            out = {LAST_LOGPROBS: logprobs}
        for j, i in enumerate(indices[:first_sampled]):
            output.step_outputs[i] = {name: value[j] for name, value in out.items()}
        if gens:
            rows = slice(first_sampled, None)
            made = self._sample([plan.sampled[k] for k in gens], out[LAST_LOGPROBS][rows], weights[rows])
            sampled.update(zip(gens, made, strict=True))

    def _run_block(self, plan: RunPlan) -> BlockOutput | Exception:
        graph = plan.block_graph
        assert graph is not None
        params = [g.sampler.params for g in plan.block]
        controls = BlockControls(
            # each row's next K draws of its own stream: the same draws, in the same order, as K single
            # steps would take (so any K gives the same tokens)
            uniforms=np.stack([g.sampler.draws(graph.steps) for g in plan.block]).astype(np.float32),
            temperature=np.array([p.temperature for p in params], dtype=np.float32),
            top_k=np.array([p.top_k for p in params], dtype=np.int64),
            top_p=np.array([p.top_p for p in params], dtype=np.float32),
        )
        tokens = np.asarray(plan.block_tokens, dtype=np.int64).reshape(-1, 1)  # [block, 1]
        run_started = time.perf_counter()
        try:
            block = self.slots.run_block(graph, tokens, [g.slot for g in plan.block], controls)
        except Exception as exc:
            log.exception("model %s failed on a generation block of %d rows", self.model.key, len(tokens))
            return exc
        self.metrics.observe_run(len(tokens), time.perf_counter() - run_started)
        self.batches_run += 1
        self.steps_run += len(tokens) * graph.steps
        return block

    def _run_classify(self, groups: Sequence[ClassifyRow], output: RunOutput) -> list[np.ndarray | Exception]:
        """Every text of the plan's Classify groups (one call's, or several concurrent calls'), sorted by
        length so similar lengths pad together, in runs of at most run_rows texts. Returns each group's
        probs [texts, classes], or the error of a run that held any of its texts."""
        texts = [(g, t) for g, group in enumerate(groups) for t in range(len(group.texts))]
        texts.sort(key=lambda gt: len(groups[gt[0]].texts[gt[1]]))  # stable: a call's order kept
        size = min(group.run_rows for group in groups)
        rows: list[list[np.ndarray]] = [[np.empty(0)] * len(group.texts) for group in groups]
        failed: dict[int, Exception] = {}
        for start in range(0, len(texts), size):
            run = texts[start : start + size]
            ids = [groups[g].texts[t] for g, t in run]
            lengths = np.array([len(i) for i in ids], dtype=np.int64)  # [run]
            pad = groups[run[0][0]].pad
            tokens = np.full((len(run), int(lengths.max())), pad, dtype=np.int64)  # [run, seq]
            for row, text in enumerate(ids):
                tokens[row, : len(text)] = text
            run_started = time.perf_counter()
            try:
                outputs, _ = self.model.run(tokens, {}, lengths)  # no state: a whole text per row
            except Exception as exc:
                log.exception("model %s failed on a Classify run of %d texts", self.model.key, len(run))
                failed.update({g: exc for g, _ in run})
                continue
            self._count(len(run), time.perf_counter() - run_started, output)
            for row, (g, t) in enumerate(run):
                rows[g][t] = outputs["probs"][row]  # [classes]
        return [failed[g] if g in failed else np.stack(rows[g]) for g in range(len(groups))]

    def _count(self, rows: int, seconds: float, output: RunOutput) -> None:
        self.metrics.observe_run(rows, seconds)
        self.batches_run += 1
        self.steps_run += rows
        output.runs += 1

    @staticmethod
    def _sample(
        generations: Sequence[GeneratingRow], logprobs: np.ndarray, weights: np.ndarray
    ) -> list[Sampled | Exception]:
        """Each generation's next token from its row of logprobs [generations, vocab] (and of weights,
        its unnormalised probabilities), sampled for all at once: (its logprobs [vocab], token)."""
        samplers = [g.sampler for g in generations]
        uniforms = draw_batch(samplers)  # [generations], each from its session's own stream
        tokens = sample_batch(logprobs, [s.params for s in samplers], uniforms, weights).tolist()
        return [(logprobs[k], tokens[k]) for k in range(len(generations))]


def _plain(sampler: Sampler) -> bool:
    """No top-k/top-p cut: greedy or plain temperature sampling."""
    return sampler.params.top_k == 0 and sampler.params.top_p >= 1.0
