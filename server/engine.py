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

import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, replace

import numpy as np

from rnnserve.server.caller import current_caller
from rnnserve.server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from rnnserve.server.generation import (
    MAX_AHEAD,
    Clock,
    FinishReason,
    FlushPolicy,
    GeneratedToken,
    GenerateRequest,
    Generation,
    Replay,
    request_digest,
)
from rnnserve.server.inputs import InputReader
from rnnserve.server.keeper import SessionKeeper, StoreOptions, check_model
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
    SessionTable,
    session_not_found,
)
from rnnserve.server.store import SessionStore
from rnnserve.server.tasks import (
    Classification,
    FeedResult,
    ModelTask,
    finish_even_if_cancelled,
    task_for,
)

__all__ = [
    "Classification",
    "Engine",
    "EngineLimits",
    "FeedResult",
    "FinishReason",
    "GenerateRequest",
    "GeneratedToken",
]

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 128


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
    # Generate calls one token may have in flight at once (0: no limit); a token's own limit
    # (Caller.max_generates) overrides it. Without authentication there is no token: no limit.
    max_generates_per_token: int = 0


class Engine:
    """Sessions, schedulers and models behind the RPC handlers."""

    def __init__(
        self,
        repository: ModelRepository,
        session_limits: SessionLimits | None = None,
        scheduler_options: SchedulerOptions | None = None,
        limits: EngineLimits | None = None,
        store: SessionStore | None = None,
        store_options: StoreOptions | None = None,
    ) -> None:
        self.repository = repository
        self.sessions = SessionTable(session_limits)
        self.tasks: dict[str, ModelTask] = {}
        self.keeper = SessionKeeper(repository, self.sessions, self.tasks, store, store_options)
        self.limits = limits or EngineLimits()
        self.clock: Clock = time.monotonic  # what generations' flush intervals are measured with
        # One worker thread runs ORT (which is multi-threaded itself, see RuntimeOptions.intra_op_threads);
        # the event loop stays free for gRPC I/O meanwhile. More workers would only make runs of
        # different models compete for the same cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")
        self.inputs = InputReader(self.limits)
        self._scheduler_options = scheduler_options
        self._started = False
        self._generating: dict[str, int] = {}  # Generate calls in flight, by token name
        self.schedulers: dict[str, Scheduler] = {}
        for model, _ in repository.all():
            self.add_model(model)

    def add_model(self, model: LoadedModel) -> None:
        """Serve a model version (already in the repository): its scheduler and task. A hot reload
        adds versions this way while the engine runs."""
        scheduler = Scheduler(
            model.runtime, self.sessions.slab(model), self._executor, self._scheduler_options
        )
        self.schedulers[model.key] = scheduler
        self.tasks[model.key] = task_for(model)
        if self._started:
            scheduler.start()

    async def remove_model(self, key: str) -> None:
        """Stop serving a model version (already out of the repository, with no session left on it)."""
        scheduler = self.schedulers.pop(key)
        del self.tasks[key]
        await scheduler.stop()
        self.sessions.drop_slab(key)

    def start(self) -> None:
        self._started = True
        for scheduler in self.schedulers.values():
            scheduler.start()
        self.keeper.start()

    def create_session(self, model: str, version: str = "", ttl_seconds: float = 0) -> Session:
        """A new session (see SessionKeeper.create)."""
        return self.keeper.create(model, version, ttl_seconds)

    async def stop(self) -> None:
        for scheduler in self.schedulers.values():
            await scheduler.stop()
        await self.keeper.stop()
        self._executor.shutdown(wait=True)
        self.inputs.stop()

    # -- sessions ---------------------------------------------------------------------------------

    # -- feeding tokens ---------------------------------------------------------------------------

    async def feed(
        self,
        session_id: str,
        data: str | Sequence[int] | None,
        *,
        expected_position: int | None = None,
        top_k: int = 0,
        token_logprobs: bool = False,
        end_turn: bool = False,
    ) -> FeedResult:
        """Append text or token ids to a session; returns the model's output after them.

        end_turn: append the end-of-turn token <eos> after them (then `data` may be None or empty: the
        message only closes the turn); it is one of the message's tokens, retried with it."""
        session = await self.keeper.get(session_id)
        task = self.tasks[session.model.key]
        top_k = top_k or self.limits.default_top_k
        if not 1 <= top_k <= self.limits.max_top_k:
            raise InvalidArgument(f"top_k must be in [0, {self.limits.max_top_k}] (0 = default), got {top_k}")
        if token_logprobs:
            task.check_token_logprobs()
        closing = [task.end_turn_token()] if end_turn else []
        if data is None and not closing:
            raise InvalidArgument("the message carries no input: set text or tokens (or end_turn)")
        if closing and not data:
            ids = closing  # the message only closes the turn
        else:
            assert data is not None
            ids = [*await self.inputs.resolve_input(session.model, data), *closing]
        async with self.keeper.use(session) as session:
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
        steps = task.chunks(ids, self.limits.chunk_tokens)
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

    # -- classification ---------------------------------------------------------------------------

    async def classify(
        self, model: str, version: str, texts: Sequence[str | Sequence[int]]
    ) -> tuple[LoadedModel, list[Classification]]:
        """Class probabilities for each text (or token id list), independently of any session."""
        if not model:
            raise InvalidArgument("model is required (see ListModels for what is loaded)")
        check_model(model)
        loaded = self.repository.get(model, version)
        task = self.tasks[loaded.key]
        task.check_classify()
        if not 1 <= len(texts) <= self.limits.max_classify_texts:
            raise InvalidArgument(
                f"give between 1 and {self.limits.max_classify_texts} texts to classify, got {len(texts)}"
            )
        ids = await self.inputs.resolve_inputs(loaded, texts, [f"text {i}" for i in range(len(texts))])
        self.schedulers[loaded.key].metrics.tokens_in.inc(sum(len(i) for i in ids))
        probs = await task.classify(self.schedulers[loaded.key], ids, self.limits)
        return loaded, [Classification.from_probs(p, loaded.manifest.labels) for p in probs]

    # -- generation -------------------------------------------------------------------------------

    def _validate_generate(self, session: Session, request: GenerateRequest) -> None:
        self.tasks[session.model.key].check_generate()
        if request.end_turn:
            self.tasks[session.model.key].end_turn_token()  # (raises if the model has none)
        vocab = session.model.manifest.vocab_size
        request.sampling.validate(vocab)
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgument(
                f"request_id may have at most {MAX_REQUEST_ID_CHARS} characters, got "
                f"{len(request.request_id):,}: {quote(request.request_id)}"
            )
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

        With `request.end_turn`, the last token is always <eos>: sampled, or appended once the
        generation has finished for another reason (`_close_turn`), with the finish reason.
        """
        session = await self.keeper.get(session_id)
        self._validate_generate(session, request)
        token = self._start_generate()
        try:
            async with aclosing(self._generate(session, request)) as tokens_made:
                async for tokens in tokens_made:
                    yield tokens
        finally:
            self._end_generate(token)

    def _start_generate(self) -> str:
        """Count a Generate of the caller's token; ResourceExhausted when it has its limit in flight."""
        caller = current_caller()
        if not caller.name:
            return ""
        limit = self.limits.max_generates_per_token if caller.max_generates is None else caller.max_generates
        running = self._generating.get(caller.name, 0)
        if limit and running >= limit:
            raise ResourceExhausted(
                f"token {quote(caller.name)} has its maximum of {limit} Generate calls in flight "
                "(max concurrent Generates per token); retry when a Generate ends"
            )
        self._generating[caller.name] = running + 1
        return caller.name

    def _end_generate(self, token: str) -> None:
        if token:
            left = self._generating[token] - 1
            if left:
                self._generating[token] = left
            else:
                del self._generating[token]

    async def _generate(
        self, session: Session, request: GenerateRequest
    ) -> AsyncGenerator[list[GeneratedToken], None]:
        prompt = (
            None
            if request.prompt is None
            else await self.inputs.resolve_input(session.model, request.prompt, "prompt")
        )
        eos = session.model.manifest.special_tokens.get("eos")
        digest = request_digest(request)
        if request.sampling.seed is None:  # kept with the request_id, so that a retry samples the same
            request = replace(request, sampling=replace(request.sampling, seed=secrets.randbits(63)))
        async with self.keeper.use(session) as session:
            if self.keeper.persister is not None:
                self.keeper.persister.holding_long(session)  # written as it is now, not after the call
            last = session.last_applied
            resume: Replay | None = None
            if (
                request.request_id
                and isinstance(last, AppliedGeneration)
                and last.request_id == request.request_id
            ):
                if last.digest != digest:
                    raise FailedPrecondition(
                        f"request_id {quote(request.request_id)} was used by a different Generate on session "
                        f"{session.id}; a retry must send the same request (or use a new request_id)"
                    )
                request = replace(request, sampling=replace(request.sampling, seed=last.seed))
                applied, prompt = last, None  # its prompt is applied
                if last.first_position >= 0:  # it made tokens (or was about to): hand them over again
                    resume = Replay(session.model.codec, last, request.stop)
                    made = [resume.tokens[i : i + MAX_AHEAD] for i in range(0, len(resume.tokens), MAX_AHEAD)]
                    closing = bool(made) and _turn_to_close(request, last, eos)
                    for tokens in made[:-1] if closing else made:
                        yield tokens
                    if closing:  # it finished, but its turn was not closed yet
                        yield await self._close_turn(session, last, made[-1])
                    if last.finish_reason is not None:
                        return
            else:
                expected = request.expected_position
                if expected is not None and expected != session.position:
                    raise self._position_mismatch(session, expected)
                applied = AppliedGeneration(
                    session.position, request.request_id, digest, request.sampling.seed or 0
                )
            scheduler = self.schedulers[session.model.key]
            if resume is None:
                await self._prepare_generation(session, applied, prompt, eos)
            generation = Generation(
                session, request, eos, scheduler, self._flush_policy(request), applied, self.clock, resume
            )
            session.on_close = generation.session_closed
            scheduler.add_generation(generation)
            try:
                while True:
                    tokens = await generation.take()
                    if tokens[-1].finish_reason and _turn_to_close(request, applied, eos):
                        break  # handed over with the <eos> that closes the turn, once it is applied
                    yield tokens
                    if tokens[-1].finish_reason:
                        return
            finally:
                generation.cancel()
                # No run on the session's slot is in flight any more before the session is let go,
                # even if this call is cancelled again meanwhile (else its last block would be applied
                # after the next request took the session, which would see the position move).
                await finish_even_if_cancelled(generation.gone)
            yield await self._close_turn(session, applied, tokens)

    async def _close_turn(
        self, session: Session, applied: AppliedGeneration, last: list[GeneratedToken]
    ) -> list[GeneratedToken]:
        """end_turn, after a generation that finished without sampling <eos> (and left the batch):
        apply <eos>, recorded as the Generate's last token in the same commit (so a retry under its
        request_id hands it over again and never appends it twice). Returns `last` (its last tokens)
        followed by the <eos>, which carries the finish reason."""
        if session.closed:
            raise session_not_found(session.id)
        eos = self.tasks[session.model.key].end_turn_token()
        assert session.next_logprobs is not None
        logprob = float(session.next_logprobs[eos])

        def record(_: InputUpdate) -> None:
            applied.token_ids.append(eos)
            applied.logprobs.append(logprob)
            applied.appended_eos = True

        await self._apply(session, [eos], on_commit=record)
        finish, last[-1].finish_reason = last[-1].finish_reason, None
        return [*last, GeneratedToken(eos, "", logprob, session.position, finish)]

    async def _prepare_generation(
        self, session: Session, applied: AppliedGeneration, prompt: list[int] | None, eos: int | None
    ) -> None:
        """Apply the prompt (or <eos> to an empty session), recording the Generate as applied with it."""

        def record(_: InputUpdate) -> None:
            session.last_applied = applied

        if prompt:
            await self._apply(session, prompt, on_commit=record)
            self.schedulers[session.model.key].metrics.tokens_in.inc(len(prompt))
        if session.next_logprobs is None:
            # An empty session starts a new document, as the model saw documents in training.
            if eos is None:
                raise FailedPrecondition("the session is empty and the model has no <eos>: give a prompt")
            await self._apply(session, [eos], on_commit=record)
        if session.closed:  # while its prompt ran
            raise session_not_found(session.id)

    def _flush_policy(self, request: GenerateRequest) -> FlushPolicy:
        if request.max_tokens_per_message <= 1:
            return FlushPolicy(1, 0.0)  # one token per message: nothing to wait for
        per_message = min(request.max_tokens_per_message, MAX_AHEAD)
        if request.flush_interval_ms is not None:
            return FlushPolicy(per_message, request.flush_interval_ms / 1000)
        return FlushPolicy(
            per_message, self.limits.generate_flush_ms / 1000, self.limits.generate_flush_min_sessions
        )


def _turn_to_close(request: GenerateRequest, applied: AppliedGeneration, eos: int | None) -> bool:
    """Whether an end_turn Generate that finished still needs its <eos> appended (it sampled another
    token last, and no earlier attempt of it appended one)."""
    return (
        request.end_turn
        and applied.finish_reason is not None
        and not applied.appended_eos
        and bool(applied.token_ids)
        and applied.token_ids[-1] != eos
    )
