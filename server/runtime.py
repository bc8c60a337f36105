"""ONNX Runtime: one loaded model version, run on a batch of tokens and states.

The provider is chosen by what really works, not by what is built: onnxruntime-gpu lists
CUDAExecutionProvider even on a machine with no GPU and then silently falls back to CPU, so we ask the
created session which providers it actually uses.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rnnserve.cells import cell_spec
from rnnserve.export.manifest import LOGITS_TASKS, Manifest
from rnnserve.server.config import GENERATE_GRAPH_CHOICES
from rnnserve.server.slab import State

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

Outputs = dict[str, np.ndarray]  # the graph's other outputs, batch first: logits [batch, seq, vocab] or probs
LAST_LOGITS = "logits_last"  # the "last" graph's output: logits of the last position, [batch, vocab]
LastGraph = tuple[ort.InferenceSession, list[str]]  # a last-position graph and the outputs it fetches


@dataclass(frozen=True)
class RuntimeOptions:
    """How ONNX Runtime runs. `device`: "auto" (CUDA when it works), "cuda" or "cpu"."""

    device: str = "auto"
    # Threads for one ORT run; 0 = default_intra_op_threads(manifest), per model: the gRPC event loop
    # (protobuf, sampling, detokenising: all Python, under the GIL) needs a core of its own while ORT
    # computes in the worker thread, unless the model's runs are long enough to leave it gaps.
    intra_op_threads: int = 0
    # K-step generation graphs (the bundle's `generate[]`). "auto": on CUDA every graph (the logits never
    # leave the device); on a CPU only the plain ones (rows without a top-k/top-p cut), which beat the
    # host's sampler between single steps there, while the cut graphs lose to it (docs/results.md,
    # "Generation graphs"). "on": every graph; "off": none (the host path for every row).
    generate_graphs: str = "auto"
    generate_steps: int = 0  # K of the generation graph used (0: the bundle's default, graphs["generate"])


def _session_options(options: RuntimeOptions, precision: str = "fp32") -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if precision == "fp16":  # creating a CPU session for an fp16 graph at ENABLE_ALL segfaulted (ORT 1.31)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.intra_op_num_threads = options.intra_op_threads
    # The recurrent graphs are a chain of dependent nodes: nothing to run in parallel between nodes,
    # so no inter-op pool (its threads would only compete for the cores).
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # errors only; the provider choice is logged by us
    return so


def nvidia_driver_present() -> bool:
    """True if the NVIDIA driver library loads. Without it, asking ORT for CUDA only prints a red error."""
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def create_inference_session(
    model_path: Path, options: RuntimeOptions, precision: str = "fp32"
) -> ort.InferenceSession:
    """Create an ORT session on CUDA when asked for and working, else on CPU (`precision`: the manifest's)."""
    want_cuda = (
        options.device in ("auto", "cuda")
        and CUDA in ort.get_available_providers()
        and (options.device == "cuda" or nvidia_driver_present())
    )
    providers = [CUDA, CPU] if want_cuda else [CPU]
    session = ort.InferenceSession(str(model_path), _session_options(options, precision), providers=providers)
    in_use = session.get_providers()
    if options.device == "cuda" and CUDA not in in_use:
        raise RuntimeError(
            f"--device cuda was asked for but CUDA does not work here (ORT uses {in_use}); "
            "check the NVIDIA driver, CUDA 13 and cuDNN 9, or use --device auto/cpu"
        )
    return session


@dataclass(frozen=True)
class GenerateGraphRuntime:
    """A loaded K-step generation graph (contract: export/generate_graph.py): x0 [batch, 1] + state +
    uniforms [batch, K] + temperature/top_k/top_p [batch] -> ids [batch, K], logprobs [batch, K] and
    the state after x0..x_{K-1}."""

    session: ort.InferenceSession
    steps: int  # K
    top_k_max: int  # the largest top_k it honours; 0: a plain graph (rows without a cut only)
    input_names: frozenset[str]

    @property
    def plain(self) -> bool:
        return self.top_k_max == 0

    def expresses(self, top_k: int, top_p: float, vocab_size: int) -> bool:
        """Whether its in-graph sampler honours these settings exactly (else the host path samples)."""
        if self.plain:
            return top_k == 0 and top_p >= 1.0
        if top_k > self.top_k_max:
            return False
        return top_p >= 1.0 or top_k > 0 or vocab_size <= self.top_k_max


def _loads_generate_graph(options: RuntimeOptions, provider: str, plain: bool) -> bool:
    """Whether a generation graph (plain or cut) is loaded under options.generate_graphs."""
    if options.generate_graphs not in GENERATE_GRAPH_CHOICES:
        raise ValueError(
            f"generate_graphs must be one of {', '.join(GENERATE_GRAPH_CHOICES)}, "
            f"got {options.generate_graphs!r}"
        )
    if options.generate_graphs == "auto":
        return provider == CUDA or plain
    return options.generate_graphs == "on"


@dataclass(frozen=True)
class StepGraph:
    """A step graph (tokens [batch, seq] + state -> outputs + state) and its last-position twin."""

    session: ort.InferenceSession
    output_names: list[str]
    last: LastGraph | None  # None: slice the step graph's logits


class OnnxModel:
    """One exported model version: its manifest, its ORT session(s), and batch helpers for its state.

    A language model may have a second graph (manifest role "last") computing logits for the last
    position only, so a prompt of n tokens pays the vocabulary projection once, not n times. The
    exporter writes it as its own file (`model_last.onnx`): ONNX Runtime runs every node of a graph
    whatever outputs are fetched, so an extra output on the step graph would not save the projection
    (measured: docs/results.md, "Export speed and size").

    A bundle may also carry a turn graph (roles "turn", "turn_last": the step graph's inputs and
    outputs) for the rows whose last token is its end-of-turn token (the manifest's "eos"): a dialogue
    model's context advances there, so its step graph stays the cheap within-turn step. `ends_turn`
    says which graph a row needs; `run` and `run_last` take that choice (`turn`) for a whole batch.
    """

    def __init__(self, bundle_dir: Path, manifest: Manifest, options: RuntimeOptions | None = None) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        options = options or RuntimeOptions()
        if not options.intra_op_threads:
            options = dataclasses.replace(options, intra_op_threads=default_intra_op_threads(manifest))
        self.intra_op_threads = options.intra_op_threads
        self.state_outputs = {s.output_name for s in manifest.state}
        self.state_output_names = [s.output_name for s in manifest.state]
        step = self._load_step_graph(options, "step", "last")
        self.session, self.output_names = step.session, step.output_names
        self.provider = self.session.get_providers()[0]
        self.last = step.last  # the "last" graph (session, output names to fetch), or None
        # The turn graph, and the token whose rows need it (None: every row runs the step graph).
        self.turn: StepGraph | None = None
        self.end_of_turn: int | None = None
        if manifest.graph_file("turn"):
            self.turn = self._load_step_graph(options, "turn", "turn_last")
            self.end_of_turn = manifest.special_tokens["eos"]  # a dialogue manifest has it (validated)
        self._graphs = {False: step, True: self.turn}
        # (K, plain) -> the K-step generation graph (language models whose bundle has them, as chosen
        # by RuntimeOptions.generate_graphs).
        self.generate: dict[tuple[int, bool], GenerateGraphRuntime] = {}
        self._generate_steps = options.generate_steps
        # (A dialogue model has none: <eos> may only end a step, which a K-step block cannot promise.)
        for g in manifest.generate if manifest.task == "lm" else []:
            if _loads_generate_graph(options, self.provider, g.plain):
                session = create_inference_session(bundle_dir / g.file, options, manifest.precision)
                names = frozenset(i.name for i in session.get_inputs())
                self.generate[(g.steps, g.plain)] = GenerateGraphRuntime(session, g.steps, g.top_k_max, names)
        if options.generate_steps and self.generate and options.generate_steps not in self.generate_steps:
            raise ValueError(
                f"{self.key}: no generation graph of {options.generate_steps} steps "
                f"(the bundle has K in {sorted(self.generate_steps)})"
            )
        log.info(
            "loaded %s v%s (%s %s, %d layers x %d%s%s%s) on %s, %d ORT thread(s)",
            manifest.name,
            manifest.version,
            manifest.cell,
            manifest.task,
            manifest.num_layers,
            manifest.hidden_size,
            ", last-position graph" if self.last else "",
            ", turn graph" if self.turn else "",
            f", generation graphs {sorted(g.file for g in manifest.generate)}" if self.generate else "",
            self.provider,
            self.intra_op_threads,
        )

    def _load_step_graph(self, options: RuntimeOptions, role: str, last_role: str) -> StepGraph:
        """The graph playing `role` ("step" or "turn") and, for a next-token model, its last-position
        twin `last_role` when the bundle has it (sharing the session when it is the same file)."""
        manifest = self.manifest
        file = manifest.graph_file(role) or manifest.model_file
        session = create_inference_session(self.bundle_dir / file, options, manifest.precision)
        last: LastGraph | None = None
        last_file = manifest.graph_file(last_role) if manifest.task in LOGITS_TASKS else None
        if last_file:
            last_session = (
                session
                if last_file == file
                else create_inference_session(self.bundle_dir / last_file, options, manifest.precision)
            )
            if LAST_LOGITS in {o.name for o in last_session.get_outputs()}:
                last = (last_session, [LAST_LOGITS, *self.state_output_names])
            else:
                log.warning("%s: graph %s has no %s output; using %s", self.key, last_file, LAST_LOGITS, file)
        return StepGraph(session, [o.name for o in session.get_outputs()], last)

    @property
    def key(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"

    def ends_turn(self, last_token: int) -> bool:
        """Whether a row whose last token is `last_token` runs the turn graph (else the step graph)."""
        return self.end_of_turn is not None and last_token == self.end_of_turn

    def step_graph(self, turn: bool = False) -> StepGraph:
        """The step graph, or with `turn` the turn graph (raises ValueError if the bundle has none)."""
        graph = self._graphs[turn]
        if graph is None:
            raise ValueError(f"{self.key} has no turn graph (its rows all run the step graph)")
        return graph

    @property
    def generate_steps(self) -> set[int]:
        """The K of the generation graphs loaded."""
        return {steps for steps, _ in self.generate}

    @property
    def default_generate_steps(self) -> int:
        """K of the generation graphs blocks run on (RuntimeOptions.generate_steps, else the bundle's
        default, graphs["generate"], else the largest loaded); 0 if none is loaded."""
        if not self.generate:
            return 0
        if self._generate_steps in self.generate_steps:
            return self._generate_steps
        default = self.manifest.generate_graph()
        return (
            default.steps
            if default is not None and default.steps in self.generate_steps
            else max(self.generate_steps)
        )

    def generate_graph(self, plain: bool) -> GenerateGraphRuntime | None:
        """The graph a block runs on: of the default K, plain when every row is plain and a plain graph
        is loaded, else the cut graph (None if that is not loaded)."""
        steps = self.default_generate_steps
        return (self.generate.get((steps, True)) if plain else None) or self.generate.get((steps, False))

    @property
    def on_cuda(self) -> bool:
        return self.provider == CUDA

    def initial_state(self, batch: int = 1) -> State:
        """Every state tensor at its initial value (zeros, or e.g. -inf for a running max), for `batch`."""
        return {
            s.name: np.full(s.shape_for_batch(batch), s.initial_value, dtype=np.float32)
            for s in self.manifest.state
        }

    def feeds(
        self, tokens: np.ndarray, state: State, lengths: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """The graph's inputs by name for tokens int64 [batch, seq] and a batch state."""
        feeds: dict[str, np.ndarray] = {"tokens": tokens}
        if lengths is not None:
            feeds["lengths"] = lengths
        for s in self.manifest.state:
            feeds[s.input_name] = state[s.name]
        return feeds

    def run(
        self, tokens: np.ndarray, state: State, lengths: np.ndarray | None = None, *, turn: bool = False
    ) -> tuple[Outputs, State]:
        """One forward pass over tokens int64 [batch, seq] from `state`.

        Returns the non-state outputs by name (logits [batch, seq, vocab] for a language model, probs
        [batch, classes] for a classifier) and the new state. `lengths` int64 [batch] is for
        whole-sequence classifiers, whose padded batches are exact. `turn`: every row ends a turn
        (`ends_turn` of its last token): run the turn graph.
        """
        graph = self.step_graph(turn)
        feeds = self.feeds(tokens, state, lengths)
        by_name = dict(zip(graph.output_names, graph.session.run(graph.output_names, feeds), strict=True))
        new_state = {s.name: by_name[s.output_name] for s in self.manifest.state}
        outputs = {k: v for k, v in by_name.items() if k not in self.state_outputs}
        return outputs, new_state

    def run_last(self, tokens: np.ndarray, state: State, *, turn: bool = False) -> tuple[np.ndarray, State]:
        """Like `run` for a language model, but only the last position's logits [batch, vocab]."""
        last = self.step_graph(turn).last
        if last is None:
            outputs, new_state = self.run(tokens, state, turn=turn)
            return outputs["logits"][:, -1], new_state  # [batch, vocab]
        session, names = last
        logits, *states = session.run(names, self.feeds(tokens, state))
        return logits, {s.name: v for s, v in zip(self.manifest.state, states, strict=True)}


# A model whose token costs at least this many floating-point operations gets every core for ORT on a
# small machine: its runs are long enough that the event loop's work fits in the gaps. Measured on 2
# cores, 64 sessions generating through gRPC: the design LM (2x512 LSTM, vocab 10k, ~17.5 MFLOP a token)
# served 13,507 tokens/s with 2 threads against 8,533 with 1; the demo LM (2x256, vocab 96, ~1.9 MFLOP)
# 46,421 with 2 against 57,440 with 1 (docs/results.md).
HEAVY_TOKEN_FLOPS = 6e6


def token_flops(manifest: Manifest) -> float:
    """Multiply-adds x 2 of one token through the recurrent layers and (LMs) the vocabulary projection."""
    gates = cell_spec(manifest.cell).gates
    hidden, directions = manifest.hidden_size, manifest.num_directions
    flops, inputs = 0.0, manifest.embedding_size
    for _ in range(manifest.num_layers):
        flops += directions * gates * 2 * hidden * (inputs + hidden)
        inputs = hidden * directions
    if manifest.task in LOGITS_TASKS:
        flops += 2 * inputs * manifest.vocab_size
    return flops


def default_intra_op_threads(manifest: Manifest | None = None) -> int:
    """ORT threads per run when none are configured. Leave one core to the gRPC event loop when there
    are few cores (two on bigger machines): on 2 cores, 1 thread, measured faster for small recurrent
    steps than 2 threads fighting the event loop for the cores. A heavy model (HEAVY_TOKEN_FLOPS) takes
    every core of a small machine (all but one on a bigger one)."""
    cores = os.cpu_count() or 1
    if manifest is not None and token_flops(manifest) >= HEAVY_TOKEN_FLOPS:
        return cores if cores <= 4 else cores - 1
    return max(1, cores - 1) if cores <= 4 else cores - 2
