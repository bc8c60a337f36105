"""Request builders shared by the sync and asyncio clients (one place that knows the wire format)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from rnnserve.client.types import input_fields
from rnnserve.v1 import rnnserve_pb2 as pb

# What the clients ask for by default: the server may pack up to this many tokens made meanwhile into
# one Generate message (GenerateMessage unpacks them; iteration yields one token at a time anyway).
TOKENS_PER_MESSAGE = 64

# Every call on a session carries its id in this header, so that a balancer in front of several replicas
# can send all of a session's calls to one of them (nginx: `hash $http_x_rnnserve_session consistent`;
# deploy/nginx.conf). Calls that name no session (CreateSession, ListModels, ...) carry none.
SESSION_HEADER: Final = "x-rnnserve-session"

Metadata = tuple[tuple[str, str], ...]


def session_metadata(session_id: str) -> Metadata:
    """The call metadata of a call on session `session_id` (its routing header)."""
    return ((SESSION_HEADER, session_id),)


def call_metadata(request: Any) -> Metadata | None:
    """The call metadata of a call whose request is `request`: the session header when the request
    names a session (its `session_id` field), else none."""
    session_id = getattr(request, "session_id", "")
    return session_metadata(session_id) if session_id else None


def feed_request(
    session_id: str,
    data: str | Sequence[int] | None,
    *,
    top_k: int,
    token_logprobs: bool,
    expected_position: int | None,
    end_turn: bool = False,
) -> pb.StreamRequest:
    """A Stream message; `data` may be empty (or None) when `end_turn` closes the turn alone."""
    request = pb.StreamRequest(
        session_id=session_id,
        top_k=top_k,
        return_token_logprobs=token_logprobs,
        end_turn=end_turn,
        **({} if not data and end_turn else input_fields("" if data is None else data, "text", "tokens")),
    )
    if expected_position is not None:
        request.expected_position = expected_position
    return request


def generate_request(
    session_id: str,
    prompt: str | Sequence[int] | None,
    *,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    stop: Sequence[str],
    stop_token_ids: Sequence[int],
    ignore_eos: bool,
    expected_position: int | None,
    max_tokens_per_message: int = 1,
    flush_interval_ms: int | None = None,
    request_id: str = "",
    end_turn: bool = False,
) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    if seed is not None:
        sampling.seed = seed
    request = pb.GenerateRequest(
        session_id=session_id,
        sampling=sampling,
        max_tokens=max_tokens,
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
        max_tokens_per_message=max_tokens_per_message,
        request_id=request_id,
        end_turn=end_turn,
        **({} if prompt is None else input_fields(prompt, "prompt_text", "prompt_tokens")),
    )
    if expected_position is not None:
        request.expected_position = expected_position
    if flush_interval_ms is not None:
        request.flush_interval_ms = flush_interval_ms
    return request


def classify_request(
    model: str, texts: Sequence[str] | Sequence[Sequence[int]], version: str
) -> pb.ClassifyRequest:
    if all(isinstance(t, str) for t in texts):
        return pb.ClassifyRequest(model=model, version=version, texts=[str(t) for t in texts])
    lists = [pb.TokenIds(ids=[int(i) for i in t]) for t in texts]
    return pb.ClassifyRequest(model=model, version=version, token_lists=lists)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
