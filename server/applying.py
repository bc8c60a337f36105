"""Applying a message's token ids to a session: the one path by which input (a Stream message, a Generate's
prompt, an end-of-turn <eos>) runs through the model and changes a session.

`InputApplier.apply` hands the ids to the session's scheduler in chunks; the session itself changes in the
output processor (`InputUpdate.commit`, output.py), in the scheduler's commit callback of the last chunk,
all at once. `position_mismatch` words the refusal of a message sent for a position the session is not at.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from rnnserve.server.errors import FailedPrecondition
from rnnserve.server.output import InputUpdate
from rnnserve.server.runtime import Outputs
from rnnserve.server.scheduler import Scheduler
from rnnserve.server.sessions import AppliedGeneration, Session
from rnnserve.server.tasks import ModelTask, finish_even_if_cancelled


class InputApplier:
    """Runs token ids through a session's model and commits the new state (the engine owns one; its
    schedulers and tasks are the engine's, by model key, and change as models are added and removed)."""

    def __init__(
        self, schedulers: Mapping[str, Scheduler], tasks: Mapping[str, ModelTask], chunk_tokens: int
    ) -> None:
        self.schedulers = schedulers
        self.tasks = tasks
        self.chunk_tokens = chunk_tokens  # a long input runs as steps of at most this many tokens

    async def apply(
        self,
        session: Session,
        ids: list[int],
        *,
        want_token_logprobs: bool = False,
        on_commit: Callable[[InputUpdate], None] | None = None,
    ) -> list[float]:
        """Run ids through the model from the session's state and commit the new state.

        The session changes all at once when the input has run (a failure leaves it as it was), in the
        scheduler's commit callback, which then calls `on_commit` (to record the message as applied).
        Returns per-token log-probabilities when asked (else []).
        """
        scheduler = self.schedulers[session.model.key]
        task = self.tasks[session.model.key]
        last = task.last_position(want_token_logprobs)
        update = InputUpdate(task, session, ids, want_token_logprobs, on_commit)
        steps = task.chunks(ids, self.chunk_tokens)
        if len(steps) == 1:
            # Written in place: the scheduler commits the session as soon as the step ran.
            await scheduler.step(
                steps[0],
                session.slot,
                session.slot,
                last=last,
                commit=lambda out: update.commit(steps[0], out),
            )
        else:
            # A long input runs to its end even if its caller is cancelled meanwhile (a deadline, a lost
            # reply): applied once, so that a retry is answered as a replay (a cost bounded by
            # --max-input-tokens). A single step not yet run when its caller is cancelled never runs
            # (Scheduler.step).
            await finish_even_if_cancelled(self._apply_chunks(session, scheduler, steps, last, update))
        return update.token_logprobs

    async def _apply_chunks(
        self,
        session: Session,
        scheduler: Scheduler,
        steps: list[np.ndarray],
        last: bool,
        update: InputUpdate,
    ) -> None:
        """A long input: chunks run into a scratch slot, which becomes the session's in the last chunk's
        commit (with the position); the slot left over (the scratch, or the session's old one) is freed."""
        slab = session.slab
        spare = [slab.allocate()]

        def commit(outputs: Outputs) -> None:
            session.slot, spare[0] = spare[0], session.slot
            update.commit(steps[-1], outputs)

        try:
            src = session.slot
            for chunk in steps[:-1]:
                update.absorb(chunk, await scheduler.step(chunk, src, spare[0], last=last))
                src = spare[0]
            await scheduler.step(steps[-1], src, spare[0], last=last, commit=commit)
        finally:
            slab.free(spare[0])


def position_mismatch(session: Session, expected: int) -> FailedPrecondition:
    """The refusal of a message that expected the session at another position (not a retry of the last
    applied input): says where the session is, and whether a Generate already ran from `expected`."""
    last = session.last_applied
    if isinstance(last, AppliedGeneration) and last.start_position == expected:
        return FailedPrecondition(
            f"session {session.id}: a Generate that expected position {expected} already ran, and the "
            f"session is now at position {session.position}, where it ended; a generation is not "
            "replayed (its tokens were sampled once): continue from the session's position"
        )
    return FailedPrecondition(
        f"session {session.id} is at position {session.position}, but the request expected "
        f"{expected}; fetch the session (GetSession) and resend from its position"
    )
