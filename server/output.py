"""The output processor: what a run's results do to sessions. The one place a session advances.

The scheduler hands every row that ran to these functions on the event loop, in the same synchronous
call as the run's hand-over (no await between a state change and its bookkeeping):
- a step's outputs go to its `InputUpdate` (an input applied to a session: position, next-token
  distribution or class probabilities, as the model's task reads them (tasks.py), recent tokens, and the
  caller's record of the applied message);
- a whole-text Classify group's probabilities go to its caller (`deliver_classified`; no session);
- a generation's tokens go through `advance_by_generated` (called by generation.py, which decides
  where a generation ends and what its reader sees);
- a generation that ran K-step blocks is settled by `settle_after_generation` once the replay of its
  last block has run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from rnnserve.server.runner import LAST_LOGPROBS
from rnnserve.server.runtime import Outputs
from rnnserve.server.sessions import Session

if TYPE_CHECKING:
    from rnnserve.server.tasks import ModelTask
    from rnnserve.server.work import ClassifyRequest, StepRequest


def deliver_step(request: StepRequest, outputs: Outputs | Exception) -> None:
    """A step ran (or failed): commit it to its session, then wake its caller (if still there)."""
    future = request.future
    if isinstance(outputs, Exception):
        if not future.done():
            future.set_exception(outputs)
    else:
        if request.commit is not None:
            request.commit(outputs)
        if not future.done():
            future.set_result(outputs)
    request.settle()


def deliver_classified(request: ClassifyRequest, probs: np.ndarray | Exception) -> None:
    """A whole-text Classify group ran (probs [texts, classes]) or failed: wake its caller if still there."""
    if request.future.done():  # its caller went away meanwhile: nothing holds state, nothing to do
        return
    if isinstance(probs, Exception):
        request.future.set_exception(probs)
    else:
        request.future.set_result(probs)


class InputUpdate:
    """What running an input changes in a session, applied to it at once by `commit`."""

    def __init__(
        self,
        task: ModelTask,
        session: Session,
        ids: list[int],
        want_token_logprobs: bool,
        on_commit: Callable[[InputUpdate], None] | None = None,
    ) -> None:
        self.task = task
        self.session = session
        self.on_commit = on_commit
        self.ids = ids
        self.want_token_logprobs = want_token_logprobs
        self.next_logprobs = session.next_logprobs  # language model: [vocab]
        self.class_probs = session.class_probs  # classifier: [classes]
        self.token_logprobs: list[float] = []

    def absorb(self, chunk: np.ndarray, outputs: Outputs) -> None:
        """Take in the outputs of one chunk tokens [seq] (next_logprobs and token_logprobs, or
        class_probs: the task knows which)."""
        self.task.absorb(self, chunk, outputs)

    def commit(self, chunk: np.ndarray, outputs: Outputs) -> None:
        """Take in the last chunk's outputs and apply the whole input to the session, all at once (on
        the event loop, in the scheduler's hand-over: no await between the parts)."""
        self.absorb(chunk, outputs)
        s = self.session
        # Own copies: a row of a batch's array would keep the whole batch's array alive.
        s.next_logprobs = None if self.next_logprobs is None else np.array(self.next_logprobs)
        s.class_probs = None if self.class_probs is None else np.array(self.class_probs)
        s.position += len(self.ids)
        s.recent_tokens.extend(self.ids)
        s.touch()
        if self.on_commit is not None:
            self.on_commit(self)


def advance_by_generated(session: Session, tokens: Sequence[int], next_logprobs: np.ndarray | None) -> int:
    """Generated tokens were applied to the session's state: its position follows; `next_logprobs`
    [vocab] is the distribution after the last of them (None: not known until the generation settles,
    after a K-step block). Returns the new position."""
    session.position += len(tokens)
    session.recent_tokens.extend(tokens)
    if next_logprobs is not None:
        session.next_logprobs = next_logprobs  # a row of the batch's array until the generation leaves
    return session.position


def settle_after_generation(session: Session, outputs: Outputs | None) -> None:
    """The replay of a generation's last block ran (outputs of a last-position step; None: it failed):
    its state is exactly after the last kept token, and this is the distribution that follows it."""
    if outputs is not None:
        session.next_logprobs = np.array(outputs[LAST_LOGPROBS])  # [vocab], own copy


def own_copy(session: Session) -> None:
    """A generation left: the session keeps its own copy of the distribution (not a batch row)."""
    if session.next_logprobs is not None:
        session.next_logprobs = np.array(session.next_logprobs)
    session.touch()
