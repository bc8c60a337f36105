"""The engine: what the RPC handlers call. Validates input, applies tokens to sessions through the
scheduler, and runs generation (generation.py). Knows nothing about protobuf. What a kind of model
allows, how its outputs are read and how it classifies is its task's (tasks.py).

A session changes in one place, the output processor (output.py), called on the event loop as soon as a
run is handed over, whether or not the caller is still there: `InputUpdate.commit` for an input,
`advance_by_generated` (through generation.py) for generated tokens, `settle_after_generation` after a
K-step block's rollback. Each records the message as the session's last applied one in the same
synchronous call, so a retry after a lost reply is always recognised.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from rnnserve.server.errors import FailedPrecondition, InvalidArgument
from rnnserve.server.generation import (
    MAX_AHEAD,
    Clock,
    FinishReason,
    FlushPolicy,
    GeneratedToken,
    GenerateRequest,
    Generation,
)
from rnnserve.server.output import InputUpdate
from rnnserve.server.quoting import quote, quote_items
from rnnserve.server.repository import LoadedModel, ModelRepository
from rnnserve.server.runtime import Outputs
from rnnserve.server.scheduler import Scheduler, SchedulerOptions
from rnnserve.server.sessions import (
    AppliedGeneration,
    AppliedInput,
    Session,
    SessionLimits,
    SessionStore,
    session_not_found,
)
from rnnserve.server.tasks import (
    Candidate,
    Classification,
    ModelTask,
    chunks,
    finish_even_if_cancelled,
    task_for,
)
from rnnserve.server.text import TextCodec

__all__ = [
    "Classification",
    "Engine",
    "EngineLimits",
    "FeedResult",
    "FinishReason",
    "GenerateRequest",
    "GeneratedToken",
]

# Texts up to this many characters in all are tokenised on the event loop (microseconds); longer ones in
# a tokenizer thread, so one big message never holds up other clients.
INLINE_TOKENIZE_CHARS = 4096


@dataclass(frozen=True)
class EngineLimits:
    max_tokens_per_input: int = 65_536  # one Stream message / prompt
    # Text longer than this is refused before it is tokenised (cheaply, whatever its size). Eight
    # characters per allowed token: no tokenizer we ship averages more than ~6 characters a token, so
    # text this long is over the token limit anyway.
    max_input_chars: int = 8 * 65_536
    max_generate_tokens: int = 4096  # one Generate call
    max_top_k: int = 100  # candidates returned per Stream reply
    default_top_k: int = 5
    chunk_tokens: int = 256  # a long input runs as steps of at most this many tokens
    max_stop_strings: int = 16
    max_stop_chars: int = 256  # characters of one stop string (stop matching costs stops x this per token)
    max_classify_texts: int = 1024  # texts in one Classify call
    classify_batch: int = 64  # texts per run of a whole-sequence classifier
    # Generate messages (see GenerateRequest.flush_interval_ms): a request that leaves the flush
    # interval unset gets `generate_flush_ms` while at least `generate_flush_min_sessions` sessions
    # generate on its model, else 0 (tokens go out as soon as they are made: lowest latency when the
    # server has room, fewer and fuller messages when it is busy and per-message cost is what limits).
    generate_flush_ms: float = 50.0
    generate_flush_min_sessions: int = 8
    max_flush_interval_ms: int = 1000


@dataclass
class FeedResult:
    session_id: str
    position: int  # after the input
    token_ids: list[int]
    token_logprobs: list[float]  # empty unless asked for; NaN where nothing predicted the token
    top: list[Candidate]  # language model: (id, text, logprob) of the next token, best first
    classification: Classification | None = None  # classifier: class probabilities of the text so far
    replayed: bool = False


class Engine:
    """Sessions, schedulers and models behind the RPC handlers."""

    def __init__(
        self,
        repository: ModelRepository,
        session_limits: SessionLimits | None = None,
        scheduler_options: SchedulerOptions | None = None,
        limits: EngineLimits | None = None,
    ) -> None:
        self.repository = repository
        self.sessions = SessionStore(session_limits)
        self.limits = limits or EngineLimits()
        self.clock: Clock = time.monotonic  # what generations' flush intervals are measured with
        # One worker thread runs ORT (which is multi-threaded itself, see RuntimeOptions.intra_op_threads);
        # the event loop stays free for gRPC I/O meanwhile. More workers would only make runs of
        # different models compete for the same cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")
        # Big texts are tokenised here, off the loop and off the ORT worker (which would delay every run).
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self.schedulers = {
            model.key: Scheduler(model.runtime, self.sessions.slab(model), self._executor, scheduler_options)
            for model, _ in repository.all()
        }
        self.tasks: dict[str, ModelTask] = {model.key: task_for(model) for model, _ in repository.all()}

    def start(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.start()

    async def stop(self) -> None:
        for scheduler in self.schedulers.values():
            await scheduler.stop()
        self._executor.shutdown(wait=True)
        self._tokenizer_pool.shutdown(wait=True)

    # -- sessions ---------------------------------------------------------------------------------

    def create_session(self, model: str, version: str = "", ttl_seconds: float = 0) -> Session:
        if not model:
            raise InvalidArgument("model is required (see ListModels for what is loaded)")
        loaded = self.repository.get(model, version)
        self.tasks[loaded.key].check_session()
        return self.sessions.create(loaded, ttl_seconds)

    # -- input: text or ids to checked token ids --------------------------------------------------

    async def resolve_input(
        self, model: LoadedModel, data: str | Sequence[int], what: str = "input"
    ) -> list[int]:
        """Token ids for text or ids, checked against the model's vocabulary and the size limits."""
        return (await self.resolve_inputs(model, [data], [what]))[0]

    async def resolve_inputs(
        self, model: LoadedModel, inputs: Sequence[str | Sequence[int]], names: Sequence[str]
    ) -> list[list[int]]:
        """Token ids for each input (named `names[i]` in errors). Sizes are checked before any text is
        tokenised; big texts are tokenised in a tokenizer thread (see INLINE_TOKENIZE_CHARS)."""
        texts = {i: data for i, data in enumerate(inputs) if isinstance(data, str)}
        for i, text in texts.items():
            self._check_text_size(text, names[i])
        ids: list[list[int] | None] = [
            None if isinstance(data, str) else self._checked_ids(model, data, names[i])
            for i, data in enumerate(inputs)
        ]
        encoded = await self._encode(model.codec, list(texts.values()))
        for (i, text), text_ids in zip(texts.items(), encoded, strict=True):
            if not text_ids:
                raise InvalidArgument(f"{names[i]} text {quote(text, 40)} encodes to no tokens")
            self._check_token_count(len(text_ids), names[i])
            ids[i] = text_ids
        return [i for i in ids if i is not None]

    def _check_text_size(self, text: str, what: str) -> None:
        if not text:
            raise InvalidArgument(f"{what} is empty")
        most = self.limits.max_input_chars
        if len(text) > most:
            raise InvalidArgument(
                f"{what} has {len(text):,} characters, more than the limit of {most:,} "
                f"(and at most {self.limits.max_tokens_per_input:,} tokens); split it into several "
                "messages (the session keeps state between them)"
            )

    def _check_token_count(self, count: int, what: str) -> None:
        if count > self.limits.max_tokens_per_input:
            raise InvalidArgument(
                f"{what} has {count:,} tokens, more than the limit of {self.limits.max_tokens_per_input:,}; "
                "split it into several messages (the session keeps state between them)"
            )

    def _checked_ids(self, model: LoadedModel, data: Sequence[int], what: str) -> list[int]:
        if not data:
            raise InvalidArgument(f"{what} has no tokens: send text or at least one token id")
        self._check_token_count(len(data), what)
        ids = np.asarray(data, dtype=np.int64)  # [tokens]
        vocab = model.manifest.vocab_size
        bad = np.flatnonzero((ids < 0) | (ids >= vocab))  # [bad tokens]
        if bad.size:
            index = int(bad[0])
            raise InvalidArgument(
                f"token id {int(ids[index])} at index {index} is out of range for model {model.key} "
                f"(vocabulary size {vocab}: ids 0..{vocab - 1}); {bad.size:,} ids out of range in all"
            )
        return [int(i) for i in ids.tolist()]

    async def _encode(self, codec: TextCodec, texts: list[str]) -> list[list[int]]:
        if sum(len(t) for t in texts) <= INLINE_TOKENIZE_CHARS:
            return [codec.encode(t) for t in texts]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_pool, self._tokenize, codec, texts)

    @staticmethod
    def _tokenize(codec: TextCodec, texts: list[str]) -> list[list[int]]:
        """In a tokenizer thread: encode_batch releases the GIL while it works (encode does not, so it
        would stall the event loop even from another thread)."""
        encodings = codec.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [list(e.ids) for e in encodings]

    # -- feeding tokens ---------------------------------------------------------------------------

    async def feed(
        self,
        session_id: str,
        data: str | Sequence[int],
        *,
        expected_position: int | None = None,
        top_k: int = 0,
        token_logprobs: bool = False,
    ) -> FeedResult:
        """Append text or token ids to a session; returns the model's output after them."""
        session = self.sessions.get(session_id)
        task = self.tasks[session.model.key]
        top_k = top_k or self.limits.default_top_k
        if not 1 <= top_k <= self.limits.max_top_k:
            raise InvalidArgument(f"top_k must be in [0, {self.limits.max_top_k}] (0 = default), got {top_k}")
        if token_logprobs:
            task.check_token_logprobs()
        ids = await self.resolve_input(session.model, data)
        async with session.use():
            replay = self._check_position(session, expected_position, ids)
            if replay is not None:
                return replay
            start = session.position
            scheduler = self.schedulers[session.model.key]

            def record(update: InputUpdate) -> None:
                """In the commit: the reply, recorded as the last applied input with the state change."""
                reply = task.reply(session, top_k)
                result = FeedResult(
                    session_id=session.id,
                    position=session.position,
                    token_ids=ids,
                    token_logprobs=update.token_logprobs,
                    top=reply.top,
                    classification=reply.classification,
                )
                session.last_applied = AppliedInput(start, tuple(ids), result)
                scheduler.metrics.tokens_in.inc(len(ids))

            await self._apply(session, ids, want_token_logprobs=token_logprobs, on_commit=record)
            assert isinstance(session.last_applied, AppliedInput)
            result: FeedResult = session.last_applied.result
            return result

    def _check_position(
        self, session: Session, expected: int | None, ids: Sequence[int]
    ) -> FeedResult | None:
        """None to go ahead; the earlier result for an exact retry; FailedPrecondition otherwise."""
        if expected is None or expected == session.position:
            return None
        last = session.last_applied
        if isinstance(last, AppliedInput) and last.start_position == expected and last.tokens == tuple(ids):
            replay: FeedResult = last.result
            return FeedResult(**{**replay.__dict__, "replayed": True})
        raise self._position_mismatch(session, expected)

    @staticmethod
    def _position_mismatch(session: Session, expected: int) -> FailedPrecondition:
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

    async def _apply(
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
        steps = chunks(ids, self.limits.chunk_tokens)
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

    # -- classification ---------------------------------------------------------------------------

    async def classify(
        self, model: str, version: str, texts: Sequence[str | Sequence[int]]
    ) -> tuple[LoadedModel, list[Classification]]:
        """Class probabilities for each text (or token id list), independently of any session."""
        loaded = self.repository.get(model, version) if model else None
        if loaded is None:
            raise InvalidArgument("model is required (see ListModels for what is loaded)")
        task = self.tasks[loaded.key]
        task.check_classify()
        if not 1 <= len(texts) <= self.limits.max_classify_texts:
            raise InvalidArgument(
                f"give between 1 and {self.limits.max_classify_texts} texts to classify, got {len(texts)}"
            )
        ids = await self.resolve_inputs(loaded, texts, [f"text {i}" for i in range(len(texts))])
        self.schedulers[loaded.key].metrics.tokens_in.inc(sum(len(i) for i in ids))
        probs = await task.classify(self.schedulers[loaded.key], ids, self.limits)
        return loaded, [Classification.from_probs(p, loaded.manifest.labels) for p in probs]

    # -- generation -------------------------------------------------------------------------------

    def _validate_generate(self, session: Session, request: GenerateRequest) -> None:
        self.tasks[session.model.key].check_generate()
        vocab = session.model.manifest.vocab_size
        request.sampling.validate(vocab)
        if not 1 <= request.max_tokens <= self.limits.max_generate_tokens:
            raise InvalidArgument(
                f"max_tokens must be in [1, {self.limits.max_generate_tokens}], got {request.max_tokens}"
            )
        if len(request.stop) > self.limits.max_stop_strings or any(not s for s in request.stop):
            raise InvalidArgument(f"stop takes at most {self.limits.max_stop_strings} non-empty strings")
        longest = self.limits.max_stop_chars
        too_long = [s for s in request.stop if len(s) > longest]
        if too_long:
            raise InvalidArgument(
                f"a stop string may have at most {longest} characters; got {len(too_long[0]):,}: "
                f"{quote(too_long[0])}"
            )
        bad = [t for t in request.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidArgument(
                f"stop_token_ids {quote_items(bad)} are out of range for vocabulary size {vocab}"
            )
        most = self.limits.max_flush_interval_ms
        if request.flush_interval_ms is not None and not 0 <= request.flush_interval_ms <= most:
            raise InvalidArgument(
                f"flush_interval_ms must be in [0, {most}] (0 = send each token at once), "
                f"got {request.flush_interval_ms}"
            )

    async def generate(
        self, session_id: str, request: GenerateRequest
    ) -> AsyncIterator[list[GeneratedToken]]:
        """Sample up to max_tokens tokens continuing the session; each is applied to its state.

        Yields the tokens in order, in lists of those ready at once (the session generates in the
        model's running batch while earlier tokens are being sent). A Generate is the session's last
        applied message from the moment its prompt (or first token) is applied: a retry of it with the
        same expected_position is refused, saying where it ended (see _position_mismatch). If the
        session is closed meanwhile, it stops at the next run; the reader gets the tokens made until
        then, then NotFound.
        """
        session = self.sessions.get(session_id)
        self._validate_generate(session, request)
        prompt = (
            None
            if request.prompt is None
            else await self.resolve_input(session.model, request.prompt, "prompt")
        )
        eos = session.model.manifest.special_tokens.get("eos")
        async with session.use():
            expected = request.expected_position
            if expected is not None and expected != session.position:
                raise self._position_mismatch(session, expected)
            applied = AppliedGeneration(session.position)

            def record(_: InputUpdate) -> None:
                session.last_applied = applied

            scheduler = self.schedulers[session.model.key]
            if prompt:
                await self._apply(session, prompt, on_commit=record)
                scheduler.metrics.tokens_in.inc(len(prompt))
            if session.next_logprobs is None:
                # An empty session starts a new document, as the model saw documents in training.
                if eos is None:
                    raise FailedPrecondition("the session is empty and the model has no <eos>: give a prompt")
                await self._apply(session, [eos], on_commit=record)
            if session.closed:  # while its prompt ran
                raise session_not_found(session.id)
            generation = Generation(
                session, request, eos, scheduler, self._flush_policy(request), applied, self.clock
            )
            session.on_close = generation.session_closed
            scheduler.add_generation(generation)
            try:
                while True:
                    tokens = await generation.take()
                    yield tokens
                    if tokens[-1].finish_reason:
                        return
            finally:
                generation.cancel()
                await generation.gone  # no run on the session's slot is in flight any more

    def _flush_policy(self, request: GenerateRequest) -> FlushPolicy:
        if request.max_tokens_per_message <= 1:
            return FlushPolicy(1, 0.0)  # one token per message: nothing to wait for
        per_message = min(request.max_tokens_per_message, MAX_AHEAD)
        if request.flush_interval_ms is not None:
            return FlushPolicy(per_message, request.flush_interval_ms / 1000)
        return FlushPolicy(
            per_message, self.limits.generate_flush_ms / 1000, self.limits.generate_flush_min_sessions
        )
