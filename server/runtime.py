"""ONNX Runtime: one loaded model version, run on a batch of tokens and states.

The provider is chosen by what really works, not by what is built: onnxruntime-gpu lists
CUDAExecutionProvider even on a machine with no GPU and then silently falls back to CPU, so we ask the
created session which providers it actually uses.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rnnserve.export.manifest import Manifest
from rnnserve.server.slab import State, StateSlab

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

Outputs = dict[str, np.ndarray]  # the graph's other outputs, batch first: logits [batch, seq, vocab] or probs
LAST_LOGITS = "logits_last"  # the "last" graph's output: logits of the last position, [batch, vocab]


@dataclass(frozen=True)
class RuntimeOptions:
    """How ONNX Runtime runs. `device`: "auto" (CUDA when it works), "cuda" or "cpu"."""

    device: str = "auto"
    # Threads for one ORT run (0 = ORT's default, one per core). The server passes
    # default_intra_op_threads(): the gRPC event loop (protobuf, sampling, detokenising: all Python,
    # under the GIL) needs a core of its own while ORT computes in the worker thread, or each run
    # would stall the I/O of every other session.
    intra_op_threads: int = 0


def _session_options(options: RuntimeOptions, precision: str = "fp32") -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if precision == "fp16":  # creating a CPU session for an fp16 graph at ENABLE_ALL segfaulted (ORT 1.31)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if options.intra_op_threads > 0:
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


class OnnxModel:
    """One exported model version: its manifest, its ORT session(s), and batch helpers for its state.

    A language model may have a second graph (manifest role "last") computing logits for the last
    position only, so a prompt of n tokens pays the vocabulary projection once, not n times. The
    exporter writes it as its own file (`model_last.onnx`): ONNX Runtime runs every node of a graph
    whatever outputs are fetched, so an extra output on the step graph would not save the projection
    (measured: docs/results.md, "Export speed and size").
    """

    def __init__(self, bundle_dir: Path, manifest: Manifest, options: RuntimeOptions | None = None) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        options = options or RuntimeOptions()
        step_file = manifest.graph_file("step") or manifest.model_file
        self.session = create_inference_session(bundle_dir / step_file, options, manifest.precision)
        self.provider = self.session.get_providers()[0]
        self._output_names = [o.name for o in self.session.get_outputs()]
        self._state_outputs = {s.output_name for s in manifest.state}
        self._state_output_names = [s.output_name for s in manifest.state]
        # The "last" graph: (session, output names to fetch), or None to slice the step graph's logits.
        self.last: tuple[ort.InferenceSession, list[str]] | None = None
        last_file = manifest.graph_file("last") if manifest.task == "lm" else None
        if last_file:
            last_session = (
                self.session
                if last_file == step_file
                else create_inference_session(bundle_dir / last_file, options, manifest.precision)
            )
            if LAST_LOGITS in {o.name for o in last_session.get_outputs()}:
                self.last = (last_session, [LAST_LOGITS, *self._state_output_names])
            else:
                log.warning(
                    "%s: graph %s has no %s output; using the step graph", self.key, last_file, LAST_LOGITS
                )
        log.info(
            "loaded %s v%s (%s %s, %d layers x %d%s) on %s",
            manifest.name,
            manifest.version,
            manifest.cell,
            manifest.task,
            manifest.num_layers,
            manifest.hidden_size,
            ", last-position graph" if self.last else "",
            self.provider,
        )

    @property
    def key(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"

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
        self, tokens: np.ndarray, state: State, lengths: np.ndarray | None = None
    ) -> tuple[Outputs, State]:
        """One forward pass over tokens int64 [batch, seq] from `state`.

        Returns the non-state outputs by name (logits [batch, seq, vocab] for a language model, probs
        [batch, classes] for a classifier) and the new state. `lengths` int64 [batch] is for
        whole-sequence classifiers, whose padded batches are exact.
        """
        feeds = self.feeds(tokens, state, lengths)
        by_name = dict(zip(self._output_names, self.session.run(self._output_names, feeds), strict=True))
        new_state = {s.name: by_name[s.output_name] for s in self.manifest.state}
        outputs = {k: v for k, v in by_name.items() if k not in self._state_outputs}
        return outputs, new_state

    def run_last(self, tokens: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """Like `run` for a language model, but only the last position's logits [batch, vocab]."""
        if self.last is None:
            outputs, new_state = self.run(tokens, state)
            return outputs["logits"][:, -1], new_state  # [batch, vocab]
        session, names = self.last
        logits, *states = session.run(names, self.feeds(tokens, state))
        return logits, {s.name: v for s, v in zip(self.manifest.state, states, strict=True)}


class SlotRunner:
    """Runs a batch whose states live in a slab: gather rows → one ORT run → scatter rows.

    On CUDA the new states stay on the device (I/O binding) keyed by the slots they belong to; the next
    run on exactly those slots (the steady state of a generating batch) binds them as inputs, so the
    state makes no host round trip per token. Any other use of those slots first copies them back to
    the slab (the slab's `before_host_access` hook), so the host copy is never read stale.
    """

    def __init__(self, model: OnnxModel, slab: StateSlab, io_binding: bool | None = None) -> None:
        self.model = model
        self.slab = slab
        # On CUDA by default. Forced on a CPU model (tests), the same bookkeeping runs with the
        # "resident" states in host OrtValues.
        self.io_binding = model.on_cuda if io_binding is None else io_binding
        self._device = "cuda" if model.on_cuda else "cpu"
        self._resident: dict[tuple[int, ...], list[ort.OrtValue]] = {}  # dst slots -> state on device
        self._owner: dict[int, tuple[int, ...]] = {}  # slot -> key of the entry holding it
        self._lock = threading.RLock()  # the worker runs while the event loop may allocate slots
        self.resident_hits = 0  # runs whose states were already on the device
        self.host_copies = 0  # resident entries copied back to the host
        if self.io_binding:
            slab.before_host_access.append(self.flush)

    def run(self, tokens: np.ndarray, src: Sequence[int], dst: Sequence[int], last: bool) -> Outputs:
        """tokens int64 [batch, seq] from the states in slots `src`; new states go to slots `dst`.

        Returns {"logits_last": [batch, vocab]} when `last` (language models), else the graph's
        non-state outputs (logits [batch, seq, vocab] or probs [batch, classes]).
        """
        if self.io_binding:
            with self._lock:
                return self._run_bound(tokens, src, dst, last)
        state = self.slab.gather(src)  # graph layout, e.g. [layers, batch, hidden]
        if last and self.model.manifest.task == "lm":
            logits, new_state = self.model.run_last(tokens, state)
            outputs = {LAST_LOGITS: logits}
        else:
            outputs, new_state = self.model.run(tokens, state)
        self.slab.scatter(dst, new_state)
        return outputs

    def _run_bound(self, tokens: np.ndarray, src: Sequence[int], dst: Sequence[int], last: bool) -> Outputs:
        model, specs = self.model, self.model.manifest.state
        use_last = last and model.manifest.task == "lm" and model.last is not None
        session = model.last[0] if use_last and model.last else model.session
        wanted = (
            [LAST_LOGITS] if use_last else [n for n in model._output_names if n not in model._state_outputs]
        )
        binding = session.io_binding()
        binding.bind_cpu_input("tokens", tokens)
        key = tuple(src)
        resident = self._resident.get(key) if list(src) == list(dst) else None
        if resident is not None:
            self.resident_hits += 1
            for spec, value in zip(specs, resident, strict=True):
                binding.bind_ortvalue_input(spec.input_name, value)
        else:
            state = self.slab.gather(src)  # copies back any of these slots still on the device first
            self.flush(dst)
            for spec in specs:
                binding.bind_cpu_input(spec.input_name, state[spec.name])
        for name in wanted:
            binding.bind_output(name, "cpu")
        for spec in specs:
            binding.bind_output(spec.output_name, self._device)
        session.run_with_iobinding(binding)
        values = binding.get_outputs()  # in binding order: wanted outputs, then states
        outputs = {name: values[i].numpy() for i, name in enumerate(wanted)}
        self._forget(key)
        new_key = tuple(dst)
        self._resident[new_key] = list(values[len(wanted) :])
        for slot in new_key:
            self._owner[slot] = new_key
        if last and not use_last and model.manifest.task == "lm":
            outputs = {LAST_LOGITS: outputs["logits"][:, -1]}
        return outputs

    def flush(self, slots: Sequence[int]) -> None:
        """Copy device-resident states holding any of `slots` back into the slab and drop them."""
        if not self._owner:
            return
        with self._lock:
            for key in {self._owner[s] for s in slots if s in self._owner}:
                values = self._resident[key]
                state = {
                    spec.name: v.numpy() for spec, v in zip(self.model.manifest.state, values, strict=True)
                }
                self._forget(key)
                self.slab.scatter(key, state)
                self.host_copies += 1

    def _forget(self, key: tuple[int, ...]) -> None:
        if self._resident.pop(key, None) is not None:
            for slot in key:
                if self._owner.get(slot) == key:
                    del self._owner[slot]


def default_intra_op_threads() -> int:
    """Leave one core to the gRPC event loop when there are few cores (two for it and its neighbours
    on bigger machines). On 2 cores: 1 thread, ORT runs on the calling worker thread alone, measured
    faster for these small recurrent steps than 2 threads fighting the event loop for the cores."""
    cores = os.cpu_count() or 1
    return max(1, cores - 1) if cores <= 4 else cores - 2
