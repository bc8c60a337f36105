"""ONNX Runtime: one loaded model version, run on a batch of tokens and states.

The provider is chosen by what really works, not by what is built: onnxruntime-gpu lists
CUDAExecutionProvider even on a machine with no GPU and then silently falls back to CPU, so we ask the
created session which providers it actually uses.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rnnserve.export.manifest import Manifest

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

State = dict[str, np.ndarray]  # state name -> array shaped like StateSpec.shape, e.g. [layers, batch, hidden]
Outputs = dict[str, np.ndarray]  # the graph's other outputs, batch first: logits [batch, seq, vocab] or probs


@dataclass(frozen=True)
class RuntimeOptions:
    """How ONNX Runtime runs. `device`: "auto" (CUDA when it works), "cuda" or "cpu"."""

    device: str = "auto"
    # Threads for one ORT run. On a small CPU the gRPC event loop needs a core too; 0 = ORT's default.
    intra_op_threads: int = 0


def _session_options(options: RuntimeOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if options.intra_op_threads > 0:
        so.intra_op_num_threads = options.intra_op_threads
    so.log_severity_level = 3  # errors only; the provider choice is logged by us
    return so


def nvidia_driver_present() -> bool:
    """True if the NVIDIA driver library loads. Without it, asking ORT for CUDA only prints a red error."""
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def create_inference_session(model_path: Path, options: RuntimeOptions) -> ort.InferenceSession:
    """Create an ORT session on CUDA when asked for and working, else on CPU."""
    want_cuda = (
        options.device in ("auto", "cuda")
        and CUDA in ort.get_available_providers()
        and (options.device == "cuda" or nvidia_driver_present())
    )
    providers = [CUDA, CPU] if want_cuda else [CPU]
    session = ort.InferenceSession(str(model_path), _session_options(options), providers=providers)
    in_use = session.get_providers()
    if options.device == "cuda" and CUDA not in in_use:
        raise RuntimeError(
            f"--device cuda was asked for but CUDA does not work here (ORT uses {in_use}); "
            "check the NVIDIA driver, CUDA 13 and cuDNN 9, or use --device auto/cpu"
        )
    return session


class OnnxModel:
    """One exported model version: its manifest, its ORT session, and batch helpers for its state."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, options: RuntimeOptions | None = None) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.session = create_inference_session(bundle_dir / manifest.model_file, options or RuntimeOptions())
        self.provider = self.session.get_providers()[0]
        self._output_names = [o.name for o in self.session.get_outputs()]
        self._state_outputs = {s.output_name for s in manifest.state}
        log.info(
            "loaded %s v%s (%s %s, %d layers x %d) on %s",
            manifest.name,
            manifest.version,
            manifest.cell,
            manifest.task,
            manifest.num_layers,
            manifest.hidden_size,
            self.provider,
        )

    @property
    def key(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"

    def initial_state(self, batch: int = 1) -> State:
        """Every state tensor at its initial value (zeros, or e.g. -inf for a running max), for `batch`."""
        return {
            s.name: np.full(s.shape_for_batch(batch), s.initial_value, dtype=np.float32)
            for s in self.manifest.state
        }

    def concat_states(self, states: list[State]) -> State:
        """Stack per-session states (batch 1 each) along each tensor's batch axis."""
        if len(states) == 1:
            return states[0]  # ORT only reads its inputs
        return {
            s.name: np.concatenate([st[s.name] for st in states], axis=s.batch_axis)
            for s in self.manifest.state
        }

    def split_state(self, state: State, batch: int) -> list[State]:
        """Inverse of concat_states: one batch-1 state per session (copies, so sessions never alias)."""
        if batch == 1:
            return [state]  # ORT's outputs are fresh arrays, owned by nobody else
        parts: list[State] = [{} for _ in range(batch)]
        for s in self.manifest.state:
            for i, piece in enumerate(np.split(state[s.name], batch, axis=s.batch_axis)):
                parts[i][s.name] = np.ascontiguousarray(piece)
        return parts

    def run(
        self, tokens: np.ndarray, state: State, lengths: np.ndarray | None = None
    ) -> tuple[Outputs, State]:
        """One forward pass over tokens int64 [batch, seq] from `state`.

        Returns the non-state outputs by name (logits [batch, seq, vocab] for a language model, probs
        [batch, classes] for a classifier) and the new state. `lengths` int64 [batch] is for
        whole-sequence classifiers, whose padded batches are exact.
        """
        feeds: dict[str, np.ndarray] = {"tokens": tokens}
        if lengths is not None:
            feeds["lengths"] = lengths
        for s in self.manifest.state:
            feeds[s.input_name] = state[s.name]
        by_name = dict(zip(self._output_names, self.session.run(self._output_names, feeds), strict=True))
        new_state = {s.name: by_name[s.output_name] for s in self.manifest.state}
        outputs = {k: v for k, v in by_name.items() if k not in self._state_outputs}
        return outputs, new_state


def default_intra_op_threads() -> int:
    """Leave one core to the gRPC event loop when there are few cores."""
    cores = os.cpu_count() or 1
    return max(1, cores - 1) if cores <= 4 else cores - 2
