"""What the sync and asyncio sessions share: the position the client tracks, the log of recent inputs,
and the requests built from them (so that every message can be retried safely)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from typing import Any

from rnnserve.client.requests import feed_request, generate_request
from rnnserve.client.session_log import LoggedGeneration, LoggedInput, SessionLog
from rnnserve.client.types import FeedOutput, GenerateRecord, SessionInfo
from rnnserve.v1 import rnnserve_pb2 as pb


class SessionBase:
    """A session's identity and the client's view of it.

    `position` is the session's position as this client last saw it. Every message carries it as its
    expected_position, so that the server applies a retried message once and refuses one sent from a
    stale position. After a Generate that did not run to its end (closed early, failed), the client no
    longer knows where the session is: the next message asks the server first (GetSession).
    """

    def __init__(self, info: SessionInfo) -> None:
        self.id = info.session_id
        self.model = info.model
        self.version = info.version
        self.position = info.position
        self.task = info.task
        self.labels = info.labels  # classifier sessions: the order of `classification.probs`
        self.closed = False
        self._log = SessionLog(info.position)
        self._synced = True  # whether `position` is certainly the server's
        self._generates_open = 0  # Generate calls sent and not over: while one is, the server may move on

    def _seen(self, info: SessionInfo) -> SessionInfo:
        """The server says where the session is: the log starts again from there if the client lost track."""
        self.position = info.position
        if not self._synced or self._log.end != info.position:
            self._log.reset(info.position)
            self._synced = not self._generates_open  # (a position read mid-Generate is not final)
        return info

    def _feed_request(
        self,
        data: str | Sequence[int] | None,
        top_k: int,
        token_logprobs: bool,
        expected_position: int | None,
        end_turn: bool = False,
    ) -> pb.StreamRequest:
        return feed_request(
            self.id,
            data,
            top_k=top_k,
            token_logprobs=token_logprobs,
            expected_position=self.position if expected_position is None else expected_position,
            end_turn=end_turn,
        )

    def _fed(self, request: pb.StreamRequest, response: pb.StreamResponse) -> FeedOutput:
        output = FeedOutput.from_pb(response, self.labels)
        self._log.add(LoggedInput(request.expected_position, output.position, request))
        self.position = output.position
        return output

    def _generate_request(
        self, prompt: str | Sequence[int] | None, expected_position: int | None, **kwargs: Any
    ) -> pb.GenerateRequest:
        """The request of a Generate call, complete enough to be reissued: a request_id (uuid4 unless
        given), a seed (random unless given: a generation the server lost is made again identically
        only with the same seed), and the position it expects."""
        seed = kwargs.pop("seed")
        request_id = kwargs.pop("request_id")
        request = generate_request(
            self.id,
            prompt,
            seed=secrets.randbits(63) if seed is None else seed,
            request_id=request_id or uuid.uuid4().hex,
            expected_position=self.position if expected_position is None else expected_position,
            **kwargs,
        )
        self._generate_opened()
        return request

    def _generate_opened(self) -> None:
        """A Generate call of this session is sent: until it is over, the server may be ahead of what this
        client received, and stays ahead if the stream is closed early (the tokens made before the cancel
        reached the server are applied, a K-step block before any of its tokens is sent). So a position
        read while a Generate is open (by `info`, or to send the call again after a refusal) does not
        make the session synced: only the call's end, or a read once no Generate is open. Its stream
        calls `_generate_closed` once, whichever way it ends."""
        self._generates_open += 1
        self._synced = False

    def _generate_closed(self) -> None:
        """A Generate call opened by `_generate_opened` is over (ended, failed, or closed early)."""
        self._generates_open -= 1

    def _generated(self, request: pb.GenerateRequest, record: GenerateRecord) -> None:
        """A Generate ran to its end: log it (so that it can be made again) and move on."""
        tokens = record.tokens
        end = tokens[-1].position if tokens else request.expected_position
        ids = tuple(t.id for t in tokens)
        self._log.add(LoggedGeneration(request.expected_position, end, request, ids))
        self.position = end
        self._synced = not self._generates_open  # (its stream closed it first)


def generation_diverged(entry: LoggedGeneration, record: GenerateRecord) -> str | None:
    """Why a generation made again to restore a session does not match the one logged (None: it does)."""
    ids = tuple(t.id for t in record.tokens)
    if ids == entry.token_ids:
        return None
    return (
        f"the generation resent to restore the session from position {entry.start} made {len(ids)} "
        f"tokens {list(ids[:8])}..., not the {len(entry.token_ids)} tokens {list(entry.token_ids[:8])}... "
        "it made first: the session cannot be restored"
    )
