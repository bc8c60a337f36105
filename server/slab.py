"""State slabs: every session's recurrent state in one preallocated, batch-major array per state tensor.

A session holds a slot index; its state is row `slot` of each array. Gathering the states of a batch is
one fancy-index copy per tensor (`array[slots]`), scattering the new states back one indexed assignment,
instead of stacking and splitting a small array per session.

The arrays are allocated once, for every session the store may hold, with `np.zeros` (calloc): the
operating system hands out zero pages only when a row is first written, so resident memory follows the
sessions actually open, not the capacity. Freed slots are reused last-in first-out, so the rows (and
pages) already touched are the ones handed out again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np

from rnnserve.export.manifest import StateSpec
from rnnserve.server.errors import ResourceExhausted

State = dict[str, np.ndarray]  # state name -> array shaped like StateSpec.shape, e.g. [layers, batch, hidden]


class SlotError(RuntimeError):
    """A slot freed twice or never allocated: an internal invariant broken (not a client error)."""


class StateSlab:
    """Batch-major storage for the state of up to `capacity` sessions of one model version.

    Thread safety: slots are allocated and freed on the event loop while the ORT worker gathers and
    scatters rows of slots it was given; a slot is never handed out while a step on it is in flight
    (the session's lock and the scheduler see to that), so rows need no lock, only the free list does.
    """

    def __init__(self, specs: Sequence[StateSpec], capacity: int) -> None:
        self.specs = list(specs)
        self.capacity = capacity
        # name -> [capacity, *shape without the batch axis], e.g. [capacity, layers, hidden]
        self.rows: dict[str, np.ndarray] = {
            s.name: np.zeros((capacity, *self._row_shape(s)), dtype=np.float32) for s in self.specs
        }
        # Axis orders between the graph's layout and the rows' (batch first), e.g. (1, 0, 2) both ways
        # for [layers, batch, hidden]: a transpose is one C call, where np.moveaxis costs ~10 us of Python.
        self._to_graph = {s.name: self._batch_axis_order(s.batch_axis, len(s.shape)) for s in self.specs}
        self._to_rows = {
            s.name: tuple(int(i) for i in np.argsort(self._to_graph[s.name])) for s in self.specs
        }
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out slot 0 first
        self._allocated = np.zeros(capacity, dtype=bool)  # [capacity]: handed out and not freed yet
        self._lock = threading.Lock()
        # Called with a slot before the host reads or resets it (CUDA: copy device-resident state back).
        self.before_host_access: list[Callable[[Sequence[int]], None]] = []

    @staticmethod
    def _row_shape(spec: StateSpec) -> tuple[int, ...]:
        return tuple(d for i, d in enumerate(spec.shape) if i != spec.batch_axis)

    @staticmethod
    def _batch_axis_order(batch_axis: int, ndim: int) -> tuple[int, ...]:
        """Axes of a batch-first array in the order that puts its batch axis at `batch_axis`."""
        rest = list(range(1, ndim))
        return (*rest[:batch_axis], 0, *rest[batch_axis:])

    @property
    def state_bytes(self) -> int:
        """Bytes of state one session holds."""
        return sum(int(np.prod(self._row_shape(s))) * 4 for s in self.specs)

    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self) -> int:
        """A free slot, reset to the initial state."""
        with self._lock:
            if not self._free:
                raise ResourceExhausted(
                    f"no free state slot ({self.capacity} in use for this model); close sessions or retry"
                )
            slot = self._free.pop()
            self._allocated[slot] = True
        self.reset(slot)
        return slot

    def free(self, slot: int) -> None:
        """Give a slot back. Freeing a slot that is not allocated (twice, or -1: "no slot") is a bug in
        the caller that would let two sessions share a row of state: it raises instead."""
        with self._lock:
            if not 0 <= slot < self.capacity or not self._allocated[slot]:
                state = "out of range" if not 0 <= slot < self.capacity else "not allocated (freed twice?)"
                raise SlotError(f"internal error: freeing state slot {slot}, which is {state}")
            self._allocated[slot] = False
            self._free.append(slot)

    def reset(self, slot: int) -> None:
        """Put a slot back to the initial state (zeros, or e.g. -inf for a running max)."""
        self._host_access([slot])
        for s in self.specs:
            self.rows[s.name][slot] = s.initial_value

    def read(self, slot: int) -> State:
        """One session's state as batch-1 arrays in the graph's layout (copies), e.g. [layers, 1, hidden]."""
        return self.gather([slot])

    def write(self, slot: int, state: State) -> None:
        """Set one session's state from batch-1 arrays in the graph's layout."""
        self.scatter([slot], state)

    def gather(self, slots: Sequence[int]) -> State:
        """The states of `slots`, stacked on each tensor's batch axis in the graph's layout (fresh arrays)."""
        self._host_access(slots)
        index = np.asarray(slots, dtype=np.intp)
        out: State = {}
        for s in self.specs:
            rows = self.rows[s.name][index]  # [batch, *row]
            out[s.name] = (
                rows if s.batch_axis == 0 else np.ascontiguousarray(rows.transpose(self._to_graph[s.name]))
            )
        return out

    def scatter(self, slots: Sequence[int], state: State) -> None:
        """Write a batch's new states (graph layout, batch axis as in the spec) into `slots`."""
        index = np.asarray(slots, dtype=np.intp)
        for s in self.specs:
            self.rows[s.name][index] = state[s.name].transpose(self._to_rows[s.name])

    def _host_access(self, slots: Sequence[int]) -> None:
        for hook in self.before_host_access:
            hook(slots)
