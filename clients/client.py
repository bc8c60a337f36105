"""The synchronous Python client.

A `Session` keeps one bidirectional Stream open to the server and sends every `feed` on it, so a
message costs one round trip, not a new call. If the stream fails (an error status ends a gRPC
stream), the next `feed` opens a new one: the session's state lives on the server and is unharmed.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc

from rnnserve.client.errors import RnnserveError, from_rpc_error
from rnnserve.client.requests import (
    TOKENS_PER_MESSAGE,
    channel_options,
    classify_request,
    feed_request,
    generate_request,
)
from rnnserve.client.types import (
    Classification,
    FeedOutput,
    GeneratedToken,
    GenerateMessage,
    GenerateRecord,
    ModelInfo,
    SessionInfo,
)
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

DEFAULT_URL = "localhost:50051"
_END = object()  # sentinel that ends a request iterator


class Client:
    """Connection to an rnnserve server.

    Args:
        url: host:port of the server (default: $RNNSERVE_URL, else localhost:50051).
        timeout: seconds for unary calls (None = no deadline).
        max_message_bytes: largest message sent or received.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: float | None = 30.0,
        max_message_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.url = url or os.environ.get("RNNSERVE_URL", DEFAULT_URL)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            self.url,
            options=channel_options(max_message_bytes),
        )
        self.stub = pb_grpc.RnnServeStub(self._channel)

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """True once the server accepts connections (False after `timeout` seconds)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
            return True
        except grpc.FutureTimeoutError:
            return False

    def models(self) -> list[ModelInfo]:
        """Every model version the server has loaded."""
        response = self._call(self.stub.ListModels, pb.ListModelsRequest())
        return [ModelInfo.from_pb(m) for m in response.models]

    def classify(
        self, model: str, texts: Sequence[str] | Sequence[Sequence[int]], *, version: str = ""
    ) -> list[Classification]:
        """Class probabilities for each text (or token id list), with a classifier model."""
        response = self._call(self.stub.Classify, classify_request(model, texts, version))
        return [Classification.from_pb(c, response.labels) for c in response.results]

    def session(self, model: str, *, version: str = "", ttl_seconds: int = 0) -> Session:
        """Open a session on `model` (latest version unless given). Use it as a context manager."""
        info = self._call(
            self.stub.CreateSession,
            pb.CreateSessionRequest(model=model, version=version, ttl_seconds=ttl_seconds),
        )
        return Session(self, SessionInfo.from_pb(info))

    def attach(self, session_id: str) -> Session:
        """A handle on an existing session (e.g. one opened by another process)."""
        info = self._call(self.stub.GetSession, pb.GetSessionRequest(session_id=session_id))
        return Session(self, SessionInfo.from_pb(info))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _FeedStream:
    """One open Stream call: requests go in through a queue, responses come back in order."""

    def __init__(self, stub: pb_grpc.RnnServeStub) -> None:
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._responses = stub.Stream(iter(self._requests.get, _END))

    def send(self, request: pb.StreamRequest) -> pb.StreamResponse:
        self._requests.put(request)
        return next(self._responses)

    def close(self) -> None:
        self._requests.put(_END)
        self._responses.cancel()


class Session:
    """A stateful session on the server. Closes itself when used as a context manager."""

    def __init__(self, client: Client, info: SessionInfo) -> None:
        self.client = client
        self.id = info.session_id
        self.model = info.model
        self.version = info.version
        self.position = info.position  # as last reported by the server
        self.task = info.task
        self.labels = info.labels  # classifier sessions: the order of `classification.probs`
        self._stream: _FeedStream | None = None
        self._lock = threading.Lock()
        self.closed = False

    def feed(
        self,
        data: str | Sequence[int],
        *,
        top_k: int = 5,
        token_logprobs: bool = False,
        expected_position: int | None = None,
    ) -> FeedOutput:
        """Append text or token ids; returns the model's output after them.

        A language model session returns the next-token candidates (`top`); a streaming classifier
        session returns the class probabilities of everything fed so far (`classification`).

        `expected_position` makes a retry safe: the server answers a repeat of the last message again
        without applying it twice, and refuses a message sent from a stale position.
        """
        request = feed_request(
            self.id, data, top_k=top_k, token_logprobs=token_logprobs, expected_position=expected_position
        )
        with self._lock:
            if self._stream is None:
                self._stream = _FeedStream(self.client.stub)
            try:
                response = self._stream.send(request)
            except grpc.RpcError as error:
                self._stream = None  # an error status ends the stream; the next feed opens another
                raise from_rpc_error(error) from None
            except StopIteration:
                self._stream = None
                raise RnnserveError("the server ended the stream without an answer") from None
        output = FeedOutput.from_pb(response, self.labels)
        self.position = output.position
        return output

    def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        max_tokens: int = 100,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        expected_position: int | None = None,
        max_tokens_per_message: int = TOKENS_PER_MESSAGE,
        flush_interval_ms: int | None = None,
        timeout: float | None = None,
    ) -> GenerateStream:
        """Continue the session by sampling; iterate the result to get tokens as they are made.

        temperature 0 is greedy. With a `seed`, the same session state gives the same tokens.
        `max_tokens_per_message` lets the server send tokens made meanwhile in one message under load
        (1 = one message per token); iterating the result yields one token at a time either way, and
        its `messages()` one message (`GenerateMessage`) at a time.
        `flush_interval_ms` is how long a token may wait at the server to share a message with the
        tokens after it: 0 sends every token as soon as it is made; None leaves it to the server, which
        holds tokens (20 ms by default) only while many sessions generate.
        """
        request = generate_request(
            self.id,
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            expected_position=expected_position,
            max_tokens_per_message=max_tokens_per_message,
            flush_interval_ms=flush_interval_ms,
        )
        return GenerateStream(self, self.client.stub.Generate(request, timeout=timeout))

    def info(self) -> SessionInfo:
        info = SessionInfo.from_pb(
            self.client._call(self.client.stub.GetSession, pb.GetSessionRequest(session_id=self.id))
        )
        self.position = info.position
        return info

    def close(self) -> None:
        """Close the session on the server (idempotent on this handle)."""
        if self.closed:
            return
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
        self.closed = True
        self.client._call(self.client.stub.CloseSession, pb.CloseSessionRequest(session_id=self.id))

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.close()
        except RnnserveError:
            if exc is None:
                raise


class GenerateStream(GenerateRecord):
    """Tokens of one Generate call as they arrive. An iterator and a context manager; `close()` cancels.

    Iterate it for one `GeneratedToken` at a time, or `messages()` for one `GenerateMessage` (the tokens
    the server sent together) at a time (use one of the two); either way, `tokens` holds what arrived,
    and after iteration `finish_reason` says why it ended and `text` holds the whole generated text.
    """

    def __init__(self, session: Session, call: Any) -> None:
        super().__init__()
        self._session = session
        self._call = call

    def __iter__(self) -> Iterator[GeneratedToken]:
        for message in self.messages():
            for token in message.tokens:
                self._session.position = token.position
                yield token

    def messages(self) -> Iterator[GenerateMessage]:
        """The messages of the call as they arrive (each with one token or several)."""
        try:
            for response in self._call:
                message = self.received(response)
                self._session.position = message.position
                yield message
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED and self._call.cancelled():
                return
            raise from_rpc_error(error) from None

    def close(self) -> None:
        self._call.cancel()

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
