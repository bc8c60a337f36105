"""Where the model runner's states live between runs: rows of the slab, or (I/O binding) the device.

`SlotRunner` runs one ORT graph over a batch whose states are rows ("slots") of a `StateSlab`: gather the
rows → one run → scatter the new rows. It runs the step graphs (tokens [batch, seq] → logits or probs; a
bundle's turn graph for a batch whose rows all end a turn, `OnnxModel.ends_turn`) and
the K-step generation graphs (x0 [batch, 1] → ids [batch, K]), and keeps what a generation needs to be
rolled back: the states the block started from (`BlockOutput.before`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from rnnserve.server.runtime import LAST_LOGITS, GenerateGraphRuntime, OnnxModel, Outputs
from rnnserve.server.slab import State, StateSlab


@dataclass(frozen=True)
class BlockControls:
    """Per-row inputs of a generation graph besides x0 and the state."""

    uniforms: np.ndarray  # float32 [batch, K]: each session's next K draws from its own stream
    temperature: np.ndarray  # float32 [batch], 0 = greedy
    top_k: np.ndarray  # int64 [batch], 0 = off
    top_p: np.ndarray  # float32 [batch], 1 = off


@dataclass
class BlockOutput:
    """What a K-step generation run made for its rows."""

    ids: np.ndarray  # int64 [batch, K]: x1..xK
    logprobs: np.ndarray  # float32 [batch, K]: each id's log-probability under the unmodified model
    # The states the block started from, for rolling back a row that stopped inside it: host arrays in
    # the graph's layout, or the device values the run read (copied to the host only if needed).
    before: State | list[ort.OrtValue]

    def before_row(self, model: OnnxModel, row: int) -> State:
        """Row `row`'s start state as batch-1 arrays in the graph's layout (own copies)."""
        specs = model.manifest.state
        if isinstance(self.before, dict):
            arrays = self.before
        else:
            arrays = {s.name: v.numpy() for s, v in zip(specs, self.before, strict=True)}
            self.before = arrays  # once per block, whatever number of rows need it
        return {s.name: np.take(arrays[s.name], [row], axis=s.batch_axis) for s in specs}


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

    def _start_states(self, src: Sequence[int], given: Mapping[int, State] | None) -> State:
        """The batch's start states (graph layout): the rows of `src`, except rows given explicitly
        (batch-1 arrays: a rollback replays from a block's start state, which no slot holds)."""
        state = self.slab.gather(src)
        for row, row_state in (given or {}).items():
            for s in self.model.manifest.state:
                index = [slice(None)] * state[s.name].ndim
                index[s.batch_axis] = slice(row, row + 1)
                state[s.name][tuple(index)] = row_state[s.name]
        return state

    def run(
        self,
        tokens: np.ndarray,
        src: Sequence[int],
        dst: Sequence[int],
        last: bool,
        given: Mapping[int, State] | None = None,
        turn: bool = False,
    ) -> Outputs:
        """tokens int64 [batch, seq] from the states in slots `src` (or `given` for some rows); new
        states go to slots `dst`. `turn`: every row ends a turn, run the turn graph (see OnnxModel).

        Returns {"logits_last": [batch, vocab]} when `last` (asked only for a language model: see
        tasks.LanguageModelTask.last_position), else the graph's non-state outputs (logits [batch,
        seq, vocab] or probs [batch, classes]).
        """
        if self.io_binding:
            with self._lock:
                return self._run_bound_step(tokens, src, dst, last, given, turn)
        state = self._start_states(src, given)  # graph layout, e.g. [layers, batch, hidden]
        if last:
            logits, new_state = self.model.run_last(tokens, state, turn=turn)
            outputs = {LAST_LOGITS: logits}
        else:
            outputs, new_state = self.model.run(tokens, state, turn=turn)
        self.slab.scatter(dst, new_state)
        return outputs

    def run_block(
        self, graph: GenerateGraphRuntime, tokens: np.ndarray, slots: Sequence[int], controls: BlockControls
    ) -> BlockOutput:
        """K generation steps for the sessions in `slots` from x0 = tokens int64 [batch, 1]; their
        states become those after x0..x_{K-1}."""
        given = {
            "tokens": tokens,
            "uniforms": controls.uniforms,
            "temperature": controls.temperature,
            "top_k": controls.top_k,
            "top_p": controls.top_p,
        }
        feeds = {name: value for name, value in given.items() if name in graph.input_names}  # plain: no cut
        if self.io_binding:
            with self._lock:
                (ids, logprobs), before = self._run_bound(
                    graph.session, feeds, slots, slots, None, ["ids", "logprobs"]
                )
            return BlockOutput(ids, logprobs, before)
        state = self.slab.gather(slots)
        feeds.update({s.input_name: state[s.name] for s in self.model.manifest.state})
        names = ["ids", "logprobs", *(s.output_name for s in self.model.manifest.state)]
        ids, logprobs, *states = graph.session.run(names, feeds)
        self.slab.scatter(slots, {s.name: v for s, v in zip(self.model.manifest.state, states, strict=True)})
        return BlockOutput(ids, logprobs, state)

    def _run_bound_step(
        self,
        tokens: np.ndarray,
        src: Sequence[int],
        dst: Sequence[int],
        last: bool,
        given: Mapping[int, State] | None,
        turn: bool,
    ) -> Outputs:
        model = self.model
        graph = model.step_graph(turn)
        use_last = last and graph.last is not None
        session = graph.last[0] if use_last and graph.last else graph.session
        wanted = (
            [LAST_LOGITS] if use_last else [n for n in graph.output_names if n not in model.state_outputs]
        )
        values, _ = self._run_bound(session, {"tokens": tokens}, src, dst, given, wanted)
        outputs = dict(zip(wanted, values, strict=True))
        if last and not use_last:  # no "last" graph: the step graph's logits, sliced
            outputs = {LAST_LOGITS: outputs["logits"][:, -1]}
        return outputs

    def _run_bound(
        self,
        session: ort.InferenceSession,
        feeds: dict[str, np.ndarray],
        src: Sequence[int],
        dst: Sequence[int],
        given: Mapping[int, State] | None,
        wanted: list[str],
    ) -> tuple[list[np.ndarray], State | list[ort.OrtValue]]:
        """One run through I/O binding: host `feeds`, the states bound where they are (the device if
        resident), `wanted` outputs to the host, new states kept on the device for `dst`.
        Returns the wanted outputs (numpy) and, last, the state values the run started from."""
        specs = self.model.manifest.state
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        key = tuple(src)
        resident = self._resident.get(key) if list(src) == list(dst) and not given else None
        before: State | list[ort.OrtValue]
        if resident is not None:
            self.resident_hits += 1
            for spec, value in zip(specs, resident, strict=True):
                binding.bind_ortvalue_input(spec.input_name, value)
            before = resident
        else:
            state = self._start_states(src, given)  # copies back any of these slots still on the device
            self.flush(dst)
            for spec in specs:
                binding.bind_cpu_input(spec.input_name, state[spec.name])
            before = state
        for name in wanted:
            binding.bind_output(name, "cpu")
        for spec in specs:
            binding.bind_output(spec.output_name, self._device)
        session.run_with_iobinding(binding)
        values = binding.get_outputs()  # in binding order: wanted outputs, then states
        self._forget(key)
        new_key = tuple(dst)
        self._resident[new_key] = list(values[len(wanted) :])
        for slot in new_key:
            self._owner[slot] = new_key
        return [values[i].numpy() for i in range(len(wanted))], before

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
