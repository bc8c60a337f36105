"""The output processor: what a run's results do to sessions. The one place a session advances.

The scheduler hands every row that ran to these functions on the event loop, in the same synchronous
call as the run's hand-over (no await between a state change and its bookkeeping):
- a step's outputs go to its `InputUpdate` (an input applied to a session: position, next-token
  distribution or class probabilities, recent tokens, and the caller's record of the applied message);
- a generation's tokens go through `advance_by_generated` (called by generation.py, which decides
  where a generation ends and what its reader sees);
- a generation that ran K-step blocks is settled by `settle_after_generation` once the replay of its
  last block has run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from rnnserve.server.runner import LAST_LOGPROBS
from rnnserve.server.runtime import Outputs
from rnnserve.server.sampling import log_softmax
from rnnserve.server.sessions import Session

if TYPE_CHECKING:
    from rnnserve.server.scheduler import StepRequest


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


class InputUpdate:
    """What running an input changes in a session, applied to it at once by `commit`."""

    def __init__(
        self,
        session: Session,
        ids: list[int],
        want_token_logprobs: bool,
        on_commit: Callable[[InputUpdate], None] | None = None,
    ) -> None:
        self.session = session
        self.on_commit = on_commit
        self.ids = ids
        self.want_token_logprobs = want_token_logprobs
        self.next_logprobs = session.next_logprobs
        self.class_probs = session.class_probs
        self.token_logprobs: list[float] = []

    def absorb(self, chunk: np.ndarray, outputs: Outputs) -> None:
        """Take in the outputs of one chunk tokens [seq]."""
        if "probs" in outputs:  # a streaming classifier: probabilities of the text so far
            self.class_probs = outputs["probs"]  # [classes]
        elif LAST_LOGPROBS in outputs:
            self.next_logprobs = outputs[LAST_LOGPROBS]  # [vocab]
        else:
            all_logprobs = log_softmax(outputs["logits"])  # [seq, vocab]
            previous = [self.next_logprobs, *all_logprobs[:-1]]
            self.token_logprobs += [
                math.nan if p is None else float(p[t]) for p, t in zip(previous, chunk, strict=True)
            ]
            self.next_logprobs = all_logprobs[-1]

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
