"""The Generate call, from request to tokens: validation, the per-token count of calls in flight, a retry
under a request_id (its tokens handed over again, never sampled twice), the prompt, the generation in its
model's running batch (generation.py), and, with end_turn, the closing <eos>.

The engine owns one `GenerateCalls` (Engine.generate delegates to it). A session changes here only
through the input path (`InputApplier.apply`: the prompt, an empty session's <eos>, the closing <eos>) and
through the generation's output processor (`advance_by_generated`, called from generation.py).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import replace
from typing import Protocol

from rnnserve.server.applying import InputApplier, position_mismatch
from rnnserve.server.caller import current_caller
from rnnserve.server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from rnnserve.server.generation import (
    MAX_AHEAD,
    Clock,
    FlushPolicy,
    GeneratedToken,
    GenerateRequest,
    Generation,
    Replay,
    request_digest,
)
from rnnserve.server.inputs import InputReader
from rnnserve.server.keeper import SessionKeeper
from rnnserve.server.output import InputUpdate
from rnnserve.server.quoting import quote, quote_items
from rnnserve.server.scheduler import Scheduler
from rnnserve.server.sessions import AppliedGeneration, Session, session_not_found
from rnnserve.server.tasks import ModelTask, finish_even_if_cancelled

MAX_REQUEST_ID_CHARS = 128


class GenerateLimits(Protocol):
    """The engine limits a Generate runs under (EngineLimits, which says what each means)."""

    @property
    def max_generate_tokens(self) -> int: ...

    @property
    def max_stop_strings(self) -> int: ...

    @property
    def max_stop_chars(self) -> int: ...

    @property
    def max_flush_interval_ms(self) -> int: ...

    @property
    def generate_flush_ms(self) -> float: ...

    @property
    def generate_flush_min_sessions(self) -> int: ...

    @property
    def max_generates_per_token(self) -> int: ...


class GenerateCalls:
    """Runs the engine's Generate calls (see `generate`); counts those in flight per token."""

    def __init__(
        self,
        keeper: SessionKeeper,
        schedulers: Mapping[str, Scheduler],
        tasks: Mapping[str, ModelTask],
        inputs: InputReader,
        applier: InputApplier,
        limits: GenerateLimits,
    ) -> None:
        self.keeper = keeper
        self.schedulers = schedulers  # the engine's, by model key
        self.tasks = tasks  # the engine's, by model key
        self.inputs = inputs
        self.applier = applier
        self.limits = limits
        self.clock: Clock = time.monotonic  # what generations' flush intervals are measured with
        self.in_flight: dict[str, int] = {}  # Generate calls in flight, by token name

    async def generate(
        self, session_id: str, request: GenerateRequest
    ) -> AsyncIterator[list[GeneratedToken]]:
        """Sample up to max_tokens tokens continuing the session; each is applied to its state.

        Yields the tokens in order, in lists of those ready at once (the session generates in the
        model's running batch while earlier tokens are being sent). A Generate is the session's last
        applied message from the moment its prompt (or first token) is applied: a retry of it with the
        same expected_position is refused, saying where it ended (see position_mismatch). If the
        session is closed meanwhile, it stops at the next run; the reader gets the tokens made until
        then, then NotFound.

        With `request.end_turn`, the last token is always <eos>: sampled, or appended once the
        generation has finished for another reason (`_close_turn`), with the finish reason.
        """
        session = await self.keeper.get(session_id)
        self._validate(session, request)
        token = self._start_generate()
        try:
            async with aclosing(self._generate(session, request)) as tokens_made:
                async for tokens in tokens_made:
                    yield tokens
        finally:
            self._end_generate(token)

    def _validate(self, session: Session, request: GenerateRequest) -> None:
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

    def _start_generate(self) -> str:
        """Count a Generate of the caller's token; ResourceExhausted when it has its limit in flight."""
        caller = current_caller()
        if not caller.name:
            return ""
        limit = self.limits.max_generates_per_token if caller.max_generates is None else caller.max_generates
        running = self.in_flight.get(caller.name, 0)
        if limit and running >= limit:
            raise ResourceExhausted(
                f"token {quote(caller.name)} has its maximum of {limit} Generate calls in flight "
                "(max concurrent Generates per token); retry when a Generate ends"
            )
        self.in_flight[caller.name] = running + 1
        return caller.name

    def _end_generate(self, token: str) -> None:
        if token:
            left = self.in_flight[token] - 1
            if left:
                self.in_flight[token] = left
            else:
                del self.in_flight[token]

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
                    raise position_mismatch(session, expected)
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

        await self.applier.apply(session, [eos], on_commit=record)
        finish, last[-1].finish_reason = last[-1].finish_reason, None
        return [*last, GeneratedToken(eos, "", logprob, session.position, finish)]

    async def _prepare_generation(
        self, session: Session, applied: AppliedGeneration, prompt: list[int] | None, eos: int | None
    ) -> None:
        """Apply the prompt (or <eos> to an empty session), recording the Generate as applied with it."""

        def record(_: InputUpdate) -> None:
            session.last_applied = applied

        if prompt:
            await self.applier.apply(session, prompt, on_commit=record)
            self.schedulers[session.model.key].metrics.tokens_in.inc(len(prompt))
        if session.next_logprobs is None:
            # An empty session starts a new document, as the model saw documents in training.
            if eos is None:
                raise FailedPrecondition("the session is empty and the model has no <eos>: give a prompt")
            await self.applier.apply(session, [eos], on_commit=record)
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
