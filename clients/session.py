"""A session of the synchronous client, and the stream of one Generate call (see `rnnserve.client.client`)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from rnnserve.client.channel import with_metadata
from rnnserve.client.errors import FailedPreconditionError, RnnserveError, SessionDiverged, from_rpc_error
from rnnserve.client.requests import TOKENS_PER_MESSAGE, call_metadata, session_metadata
from rnnserve.client.retry import Attempts
from rnnserve.client.session_base import SessionBase, generation_diverged
from rnnserve.client.session_log import LoggedGeneration, LoggedInput
from rnnserve.client.types import FeedOutput, GeneratedToken, GenerateMessage, GenerateRecord, SessionInfo
from rnnserve.v1 import rnnserve_pb2 as pb

if TYPE_CHECKING:
    from rnnserve.client.client import Client

_END = object()  # sentinel that ends a request iterator


class _FeedStream:
    """One open Stream call: requests go in through a queue, responses come back in order."""

    def __init__(self, client: Client, session_id: str) -> None:
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        metadata = with_metadata(client.metadata, session_metadata(session_id))
        self._responses = client.stub.Stream(iter(self._requests.get, _END), metadata=metadata)

    def send(self, request: pb.StreamRequest) -> pb.StreamResponse:
        self._requests.put(request)
        return next(self._responses)

    def close(self) -> None:
        self._requests.put(_END)
        self._responses.cancel()


class Session(SessionBase):
    """A stateful session on the server. Closes itself when used as a context manager."""

    def __init__(self, client: Client, info: SessionInfo) -> None:
        super().__init__(info)
        self.client = client
        self._stream: _FeedStream | None = None
        self._lock = threading.RLock()

    def feed(
        self,
        data: str | Sequence[int],
        *,
        top_k: int = 5,
        token_logprobs: bool = False,
        expected_position: int | None = None,
        end_turn: bool = False,
    ) -> FeedOutput:
        """Append text or token ids; returns the model's output after them.

        A language model session returns the next-token candidates (`top`); a streaming classifier
        session returns the class probabilities of everything fed so far (`classification`).

        The message carries the position this client expects (`expected_position`, by default the one
        it tracks), so retries are safe: a message whose reply was lost is sent again and the server
        answers it again without applying it twice (`replayed` is then true). If the server is behind
        (a restart lost its last messages), the client resends its recent inputs from the server's
        position, then this one; it keeps the last 256 messages / 65,536 tokens (`SessionLog`), and
        raises SessionDiverged when the loss goes back further.

        `end_turn` appends the end-of-turn token <eos> to the message (see `say`).
        """
        with self._lock:
            resync = not self._synced and expected_position is None
            if resync:
                self.info()
            request = self._feed_request(data, top_k, token_logprobs, expected_position, end_turn)
            try:
                response = self._send(request)
            except FailedPreconditionError:
                if not self._catch_up(request.expected_position):
                    if not resync:
                        raise
                    # A Generate cut short was still making its last tokens when we asked where the
                    # session was; this message waited for it to settle, so asking again is exact.
                    self.info()
                    request = self._feed_request(data, top_k, token_logprobs, None, end_turn)
                response = self._send(request)
            return self._fed(request, response)

    def say(
        self, text: str | Sequence[int] = "", *, top_k: int = 5, expected_position: int | None = None
    ) -> FeedOutput:
        """A turn of the conversation: `text` (or token ids) then the end-of-turn token <eos>, in one
        Stream message (`feed` with end_turn; retried like it). A dialogue model's context advances;
        the output's `top` are the candidates for the first token of the next turn. Empty `text` only
        closes the turn."""
        return self.feed(text, top_k=top_k, expected_position=expected_position, end_turn=True)

    def _send(self, request: pb.StreamRequest) -> pb.StreamResponse:
        """One Stream message and its answer, on a new stream for each retry."""
        attempts = Attempts(self.client.retry)
        while True:
            if self._stream is None:
                self._stream = _FeedStream(self.client, self.id)
            try:
                return self._stream.send(request)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
            except StopIteration:
                error = RnnserveError("the server ended the stream without an answer")
            self._stream = None  # an error status ends the stream; the next attempt opens another
            delay = attempts.retry_after(error)
            if delay is None:
                raise attempts.last(error)
            time.sleep(delay)

    def _catch_up(self, start: int) -> bool:
        """After FAILED_PRECONDITION: if the server is behind `start`, resend the logged messages from its
        position and return True; False if it is not behind (the refusal stands)."""
        with self._lock:
            get = pb.GetSessionRequest(session_id=self.id)
            server = self.client._call(self.client.stub.GetSession, get).position
            resend = self._log.resend_from(server, start)
            if resend is None:
                return False
            for entry in resend:
                if isinstance(entry, LoggedInput):
                    self._send(entry.request)
                    continue
                stream = GenerateStream(self, entry.request, None, restoring=entry)
                for _ in stream.messages():
                    pass
                if (why := generation_diverged(entry, stream)) is not None:
                    raise SessionDiverged(why)
            return True

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
        request_id: str = "",
        end_turn: bool = False,
    ) -> GenerateStream:
        """Continue the session by sampling; iterate the result to get tokens as they are made.

        temperature 0 is greedy. With a `seed`, the same session state gives the same tokens.
        `max_tokens_per_message` lets the server send tokens made meanwhile in one message under load
        (1 = one message per token); iterating the result yields one token at a time either way, and
        its `messages()` one message (`GenerateMessage`) at a time.
        `flush_interval_ms` is how long a token may wait at the server to share a message with the
        tokens after it: 0 sends every token as soon as it is made; None leaves it to the server, which
        holds tokens (20 ms by default) only while many sessions generate.

        Retries: the call carries a `request_id` (a new uuid4 unless given), a seed (a random one unless
        given) and the position it expects. If it fails with UNAVAILABLE or DEADLINE_EXCEEDED, it is
        made again, identical: the server sends the tokens it had made again and goes on, and the
        stream skips those already yielded (SessionDiverged if they differ), so each token comes once.

        `end_turn` closes the turn when the generation finishes (see `reply`).
        """
        with self._lock:
            resync = not self._synced and expected_position is None
            if resync:
                self.info()
            request = self._generate_request(
                prompt,
                expected_position,
                max_tokens=max_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                stop=stop,
                stop_token_ids=stop_token_ids,
                ignore_eos=ignore_eos,
                max_tokens_per_message=max_tokens_per_message,
                flush_interval_ms=flush_interval_ms,
                request_id=request_id,
                end_turn=end_turn,
            )
        return GenerateStream(self, request, timeout, resynced=resync)

    def reply(
        self,
        *,
        max_tokens: int = 100,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        **options: Any,
    ) -> GenerateStream:
        """The model's turn: a Generate with end_turn (see `generate`, retries included), so the turn
        is closed when it finishes: its last token is <eos> (sampled, or appended after max_tokens, a
        stop string or a stop token id; its text is empty). Iterate the result to stream the reply's
        tokens; its `text` is the reply. Other `generate` options pass through `options`."""
        return self.generate(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            end_turn=True,
            **options,
        )

    def info(self) -> SessionInfo:
        get = pb.GetSessionRequest(session_id=self.id)
        return self._seen(SessionInfo.from_pb(self.client._call(self.client.stub.GetSession, get)))

    def fork(self, *, ttl_seconds: int = 0) -> Session:
        """A new session starting as a copy of this one (ttl_seconds 0: this one's TTL); this one is
        left as it is. A retry after a lost reply may leave an orphan fork until its TTL."""
        request = pb.ForkSessionRequest(session_id=self.id, ttl_seconds=ttl_seconds)
        return Session(
            self.client, SessionInfo.from_pb(self.client._call(self.client.stub.ForkSession, request))
        )

    def export(self) -> bytes:
        """The session as bytes (state, position, model and version) for `Client.import_session`."""
        request = pb.ExportSessionRequest(session_id=self.id)
        response = self.client._call(self.client.stub.ExportSession, request)
        self._seen(SessionInfo.from_pb(response.session))
        return bytes(response.snapshot)

    def close(self) -> None:
        """Close the session on the server (idempotent on this handle; NOT_FOUND on a retry after an
        attempt that may have closed it counts as closed)."""
        if self.closed:
            return
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
        self.closed = True
        request = pb.CloseSessionRequest(session_id=self.id)
        self.client._call(self.client.stub.CloseSession, request, gone_is_done=True)

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
    A call cut off is made again (see `Session.generate`); the tokens come once, in order.
    """

    def __init__(
        self,
        session: Session,
        request: pb.GenerateRequest,
        timeout: float | None,
        *,
        restoring: LoggedGeneration | None = None,
        resynced: bool = False,
    ) -> None:
        super().__init__()
        self._session = session
        self._request = request
        self._timeout = timeout
        self._restoring = restoring  # a logged generation made again to restore the session
        self._resynced = resynced  # its expected position was read while a cut Generate may have settled
        self._closed = False
        self._open = restoring is None  # its call counts as open on the session (see _generate_opened)
        self._call = session.client.stub.Generate(request, timeout=timeout, metadata=self._metadata())

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        return with_metadata(self._session.client.metadata, call_metadata(self._request))

    def __iter__(self) -> Iterator[GeneratedToken]:
        for message in self.messages():
            yield from message.tokens

    def messages(self) -> Iterator[GenerateMessage]:
        """The messages of the call as they arrive (each with one token or several)."""
        try:
            yield from self._call_messages()
        except Exception:  # failed for good (a reader that leaves the loop leaves the call going on)
            self._over()
            raise

    def _over(self) -> None:
        """Its call is over for the session (once): see SessionBase._generate_opened."""
        if self._open:
            self._open = False
            self._session._generate_closed()

    def _call_messages(self) -> Iterator[GenerateMessage]:
        session, attempts = self._session, Attempts(self._session.client.retry)
        caught_up = self._restoring is not None  # restoring the session is not restored in turn
        while True:
            try:
                for response in self._call:
                    message = self.received(response)
                    if message is not None:
                        if self._restoring is None:
                            session.position = message.position
                        yield message
                break
            except grpc.RpcError as rpc_error:
                if self._closed:
                    return
                error = from_rpc_error(rpc_error)
            if self.finish_reason:  # everything arrived; only the call's end was lost
                break
            if isinstance(error, FailedPreconditionError) and not caught_up:
                caught_up = True
                if not session._catch_up(self._request.expected_position):
                    if not (self._resynced and not self.tokens):
                        raise error
                    # A Generate cut short was still making its last tokens when the position was read:
                    # nothing of this call was applied (the position is checked first), so ask again.
                    self._request.expected_position = session.info().position
            else:
                delay = attempts.retry_after(error)
                if delay is None:
                    raise attempts.last(error)
                time.sleep(delay)
            self.reissued()
            self._call = session.client.stub.Generate(
                self._request, timeout=self._timeout, metadata=self._metadata()
            )
        if self._restoring is None:
            self._over()
            session._generated(self._request, self)

    @property
    def request(self) -> pb.GenerateRequest | None:
        """The request as sent (its request_id, and the seed the client picked if none was given);
        None before an asyncio stream starts."""
        return self._request if isinstance(self._request, pb.GenerateRequest) else None

    @property
    def seed(self) -> int | None:
        """The sampler's seed of this call (the client picks one when none was given)."""
        return None if self.request is None else self.request.sampling.seed

    def close(self) -> None:
        self._closed = True
        self._call.cancel()
        self._over()

    def __del__(self) -> None:
        self._over()  # (grpc cancels a call it garbage-collects)

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
