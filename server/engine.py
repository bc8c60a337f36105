"""The engine: what the RPC handlers call. Validates input, applies tokens to sessions through the
scheduler, and runs generation. Knows nothing about protobuf.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from rnnserve.server.errors import FailedPrecondition, InvalidArgument
from rnnserve.server.repository import LoadedModel, ModelRepository
from rnnserve.server.runtime import Outputs
from rnnserve.server.sampling import Sampler, SamplingParams, log_softmax, top_candidates
from rnnserve.server.scheduler import LAST_LOGPROBS, Scheduler, SchedulerOptions
from rnnserve.server.sessions import AppliedInput, Session, SessionLimits, SessionStore
from rnnserve.server.text import IncrementalDecoder

T = TypeVar("T")
# A generation runs ahead of its reader by at most this many tokens, then sits out runs until the
# reader catches up (the tokens it makes are applied to the session whether or not anyone reads them).
MAX_AHEAD = 64
_GOLDEN_RATIO = 0.6180339887498949  # k * it mod 1 spreads any run of integers k evenly over [0, 1)


@dataclass(frozen=True)
class EngineLimits:
    max_tokens_per_input: int = 65_536  # one Stream message / prompt
    max_generate_tokens: int = 4096  # one Generate call
    max_top_k: int = 100  # candidates returned per Stream reply
    default_top_k: int = 5
    chunk_tokens: int = 256  # a long input runs as steps of at most this many tokens
    max_stop_strings: int = 16
    max_classify_texts: int = 1024  # texts in one Classify call
    classify_batch: int = 64  # texts per run of a whole-sequence classifier
    # Generate messages (see GenerateRequest.flush_interval_ms): a request that leaves the flush
    # interval unset gets `generate_flush_ms` while at least `generate_flush_min_sessions` sessions
    # generate on its model, else 0 (tokens go out as soon as they are made: lowest latency when the
    # server has room, fewer and fuller messages when it is busy and per-message cost is what limits).
    generate_flush_ms: float = 50.0
    generate_flush_min_sessions: int = 8
    max_flush_interval_ms: int = 1000


@dataclass(frozen=True)
class Classification:
    """Class probabilities for a text (or a session's text so far)."""

    label: str
    label_id: int
    probs: list[float]

    @classmethod
    def from_probs(cls, probs: np.ndarray, labels: Sequence[str]) -> Classification:
        best = int(np.argmax(probs))
        return cls(labels[best], best, [float(p) for p in probs])


@dataclass
class FeedResult:
    session_id: str
    position: int  # after the input
    token_ids: list[int]
    token_logprobs: list[float]  # empty unless asked for; NaN where nothing predicted the token
    top: list[tuple[int, str, float]]  # language model: (id, text, logprob) of the next token, best first
    classification: Classification | None = None  # classifier: class probabilities of the text so far
    replayed: bool = False


class FinishReason:
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"


@dataclass(slots=True)
class GeneratedToken:
    token_id: int
    text: str  # text made visible by this token (stop strings held back / never sent)
    logprob: float
    position: int
    finish_reason: str | None = None


@dataclass(frozen=True)
class GenerateRequest:
    sampling: SamplingParams
    max_tokens: int
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    prompt: str | list[int] | None = None
    expected_position: int | None = None
    max_tokens_per_message: int = 1  # tokens one hand-over to the reader may carry
    flush_interval_ms: float | None = None  # how long a token may wait for company; None: the default


@dataclass
class _StopMatcher:
    """Finds stop strings in generated text and holds back text that may be the start of one."""

    stops: Sequence[str]
    text: str = ""
    sent: int = field(default=0)

    def push(self, delta: str) -> tuple[str, bool]:
        """Add delta; returns (text safe to send now, whether a stop string was found)."""
        if not self.stops:
            return delta, False  # nothing to find or hold back (the common case, once per token)
        self.text += delta
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        if hits:
            out, self.sent = self.text[self.sent : min(hits)], len(self.text)
            return out, True
        held = max((self._partial_len(s) for s in self.stops), default=0)
        safe_end = max(self.sent, len(self.text) - held)
        out, self.sent = self.text[self.sent : safe_end], safe_end
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out

    def _partial_len(self, stop: str) -> int:
        """Length of the longest suffix of the text that is a proper prefix of `stop`."""
        for n in range(min(len(stop) - 1, len(self.text)), 0, -1):
            if self.text.endswith(stop[:n]):
                return n
        return 0


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
        # One worker thread runs ORT (which is multi-threaded itself, see RuntimeOptions.intra_op_threads);
        # the event loop stays free for gRPC I/O meanwhile. More workers would only make runs of
        # different models compete for the same cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")
        self.schedulers = {
            model.key: Scheduler(model.runtime, self.sessions.slab(model), self._executor, scheduler_options)
            for model, _ in repository.all()
        }

    def start(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.start()

    async def stop(self) -> None:
        for scheduler in self.schedulers.values():
            await scheduler.stop()
        self._executor.shutdown(wait=True)

    # -- sessions ---------------------------------------------------------------------------------

    def create_session(self, model: str, version: str = "", ttl_seconds: float = 0) -> Session:
        if not model:
            raise InvalidArgument("model is required (see ListModels for what is loaded)")
        loaded = self.repository.get(model, version)
        if not loaded.manifest.streams:
            raise FailedPrecondition(
                f"model {loaded.key} is a bidirectional classifier: it reads each text from both ends, so it "
                "needs the whole text at once and cannot follow a stream; use Classify, or a unidirectional "
                "(streaming) classifier for live sentiment"
            )
        return self.sessions.create(loaded, ttl_seconds)

    # -- feeding tokens ---------------------------------------------------------------------------

    def resolve_input(self, model: LoadedModel, data: str | Sequence[int], what: str = "input") -> list[int]:
        """Token ids for text or ids, checked against the model's vocabulary and the size limit."""
        if isinstance(data, str):
            if not data:
                raise InvalidArgument(f"{what} is empty")
            ids = model.codec.encode(data)
            if not ids:
                raise InvalidArgument(f"{what} text {data[:40]!r} encodes to no tokens")
        else:
            ids = [int(i) for i in data]
            if not ids:
                raise InvalidArgument(f"{what} has no tokens: send text or at least one token id")
            vocab = model.manifest.vocab_size
            for index, token in enumerate(ids):
                if not 0 <= token < vocab:
                    raise InvalidArgument(
                        f"token id {token} at index {index} is out of range for model {model.key} "
                        f"(vocabulary size {vocab}: ids 0..{vocab - 1})"
                    )
        if len(ids) > self.limits.max_tokens_per_input:
            raise InvalidArgument(
                f"{what} has {len(ids)} tokens, more than the limit of {self.limits.max_tokens_per_input}; "
                "split it into several messages (the session keeps state between them)"
            )
        return ids

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
        is_lm = session.model.manifest.task == "lm"
        top_k = top_k or self.limits.default_top_k
        if not 1 <= top_k <= self.limits.max_top_k:
            raise InvalidArgument(f"top_k must be in [0, {self.limits.max_top_k}] (0 = default), got {top_k}")
        if token_logprobs and not is_lm:
            raise InvalidArgument(
                f"return_token_logprobs needs a language model; {session.model.key} is a classifier"
            )
        ids = self.resolve_input(session.model, data)
        async with session.use():
            replay = self._check_position(session, expected_position, ids)
            if replay is not None:
                return replay
            start = session.position
            logprobs = await self._apply(session, ids, want_token_logprobs=token_logprobs)
            self.schedulers[session.model.key].metrics.tokens_in.inc(len(ids))
            result = FeedResult(
                session_id=session.id,
                position=session.position,
                token_ids=ids,
                token_logprobs=logprobs,
                top=self._top(session, top_k) if is_lm else [],
                classification=None if is_lm else self._classification(session),
            )
            session.last_applied = AppliedInput(start, tuple(ids), result)
            return result

    @staticmethod
    def _top(session: Session, k: int) -> list[tuple[int, str, float]]:
        assert session.next_logprobs is not None
        codec = session.model.codec
        return [(i, codec.token_text(i), lp) for i, lp in top_candidates(session.next_logprobs, k)]

    @staticmethod
    def _classification(session: Session) -> Classification:
        assert session.class_probs is not None
        return Classification.from_probs(session.class_probs, session.model.manifest.labels)

    def _check_position(
        self, session: Session, expected: int | None, ids: Sequence[int]
    ) -> FeedResult | None:
        """None to go ahead; the earlier result for an exact retry; FailedPrecondition otherwise."""
        if expected is None or expected == session.position:
            return None
        last = session.last_applied
        if last is not None and last.start_position == expected and last.tokens == tuple(ids):
            replay: FeedResult = last.result
            return FeedResult(**{**replay.__dict__, "replayed": True})
        raise FailedPrecondition(
            f"session {session.id} is at position {session.position}, but the request expected "
            f"{expected}; fetch the session (GetSession) and resend from its position"
        )

    def _chunks(self, ids: Sequence[int]) -> list[np.ndarray]:
        """ids as steps of at most chunk_tokens tokens, each int64 [seq]."""
        n = self.limits.chunk_tokens
        return [np.asarray(ids[i : i + n], dtype=np.int64) for i in range(0, len(ids), n)]

    async def _apply(
        self, session: Session, ids: list[int], *, want_token_logprobs: bool = False
    ) -> list[float]:
        """Run ids through the model from the session's state and commit the new state.

        The session changes all at once when the input has run (a failure leaves it as it was).
        Returns per-token log-probabilities when asked (else []).
        """
        scheduler = self.schedulers[session.model.key]
        # Only the last position's distribution is needed unless per-token log-probabilities are:
        # the "last" graph then skips the vocabulary projection of every other position.
        last = session.model.manifest.task == "lm" and not want_token_logprobs
        update = _Update(session, ids, want_token_logprobs)
        chunks = self._chunks(ids)
        if len(chunks) == 1:
            # Written in place: the scheduler commits the session as soon as the step ran.
            await scheduler.step(
                chunks[0],
                session.slot,
                session.slot,
                last=last,
                commit=lambda out: update.commit(chunks[0], out),
            )
        else:
            await _finish_even_if_cancelled(self._apply_chunks(session, scheduler, chunks, last, update))
        return update.token_logprobs

    async def _apply_chunks(
        self, session: Session, scheduler: Scheduler, chunks: list[np.ndarray], last: bool, update: _Update
    ) -> None:
        """A long input: chunks run into a scratch slot, which becomes the session's once all have run."""
        slab = session.slab
        scratch = slab.allocate()
        try:
            src = session.slot
            for k, chunk in enumerate(chunks):
                outputs = await scheduler.step(chunk, src, scratch, last=last)
                src = scratch
                if k < len(chunks) - 1:
                    update.absorb(chunk, outputs)
                else:
                    update.commit(chunk, outputs)
            session.slot, scratch = scratch, session.slot  # the old slot is freed below
        finally:
            slab.free(scratch)

    # -- classification ---------------------------------------------------------------------------

    async def classify(
        self, model: str, version: str, texts: Sequence[str | Sequence[int]]
    ) -> tuple[LoadedModel, list[Classification]]:
        """Class probabilities for each text (or token id list), independently of any session."""
        loaded = self.repository.get(model, version) if model else None
        if loaded is None:
            raise InvalidArgument("model is required (see ListModels for what is loaded)")
        if loaded.manifest.task != "classifier":
            raise FailedPrecondition(f"model {loaded.key} is a language model; Classify needs a classifier")
        if not 1 <= len(texts) <= self.limits.max_classify_texts:
            raise InvalidArgument(
                f"give between 1 and {self.limits.max_classify_texts} texts to classify, got {len(texts)}"
            )
        ids = [self.resolve_input(loaded, text, f"text {i}") for i, text in enumerate(texts)]
        self.schedulers[loaded.key].metrics.tokens_in.inc(sum(len(i) for i in ids))
        if loaded.manifest.classifier_mode == "whole":
            loop = asyncio.get_running_loop()
            probs = await loop.run_in_executor(self._executor, self._classify_whole, loaded, ids)
        else:
            probs = list(await asyncio.gather(*(self._classify_streaming(loaded, i) for i in ids)))
        return loaded, [Classification.from_probs(p, loaded.manifest.labels) for p in probs]

    async def _classify_streaming(self, model: LoadedModel, ids: list[int]) -> np.ndarray:
        """One text through a streaming classifier from a fresh state (a scratch slot); probs [classes]."""
        scheduler = self.schedulers[model.key]

        async def run() -> np.ndarray:
            slot = scheduler.slab.allocate()
            try:
                probs = None
                for chunk in self._chunks(ids):
                    probs = (await scheduler.step(chunk, slot, slot))["probs"]
                assert probs is not None
                return probs
            finally:
                scheduler.slab.free(slot)

        return await _finish_even_if_cancelled(run())

    def _classify_whole(self, model: LoadedModel, ids: list[list[int]]) -> list[np.ndarray]:
        """Worker thread: padded batches (similar lengths together) through a whole-sequence graph."""
        pad = model.manifest.special_tokens["pad"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        probs: list[np.ndarray | None] = [None] * len(ids)
        for start in range(0, len(order), self.limits.classify_batch):
            group = order[start : start + self.limits.classify_batch]
            lengths = np.array([len(ids[i]) for i in group], dtype=np.int64)  # [batch]
            tokens = np.full((len(group), int(lengths.max())), pad, dtype=np.int64)  # [batch, seq]
            for row, i in enumerate(group):
                tokens[row, : lengths[row]] = ids[i]
            outputs, _ = model.runtime.run(tokens, {}, lengths)
            for row, i in enumerate(group):
                probs[i] = outputs["probs"][row]  # [classes]
        return [p for p in probs if p is not None]

    # -- generation -------------------------------------------------------------------------------

    def _validate_generate(self, session: Session, request: GenerateRequest) -> None:
        if session.model.manifest.task != "lm":
            raise FailedPrecondition(
                f"model {session.model.key} is a classifier; Generate needs a language model "
                "(a classifier session returns class probabilities from Stream)"
            )
        vocab = session.model.manifest.vocab_size
        request.sampling.validate(vocab)
        if not 1 <= request.max_tokens <= self.limits.max_generate_tokens:
            raise InvalidArgument(
                f"max_tokens must be in [1, {self.limits.max_generate_tokens}], got {request.max_tokens}"
            )
        if len(request.stop) > self.limits.max_stop_strings or any(not s for s in request.stop):
            raise InvalidArgument(f"stop takes at most {self.limits.max_stop_strings} non-empty strings")
        bad = [t for t in request.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidArgument(f"stop_token_ids {bad} are out of range for vocabulary size {vocab}")
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
        model's running batch while earlier tokens are being sent).
        """
        session = self.sessions.get(session_id)
        self._validate_generate(session, request)
        prompt = (
            None if request.prompt is None else self.resolve_input(session.model, request.prompt, "prompt")
        )
        eos = session.model.manifest.special_tokens.get("eos")
        async with session.use():
            if request.expected_position is not None and request.expected_position != session.position:
                raise FailedPrecondition(
                    f"session {session.id} is at position {session.position}, but the request expected "
                    f"{request.expected_position}"
                )
            if prompt:
                await self._apply(session, prompt)
                self.schedulers[session.model.key].metrics.tokens_in.inc(len(prompt))
            if session.next_logprobs is None:
                # An empty session starts a new document, as the model saw documents in training.
                if eos is None:
                    raise FailedPrecondition("the session is empty and the model has no <eos>: give a prompt")
                await self._apply(session, [eos])
            scheduler = self.schedulers[session.model.key]
            generation = _Generation(session, request, eos, scheduler, self._flush_policy(request))
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

    def _flush_policy(self, request: GenerateRequest) -> _FlushPolicy:
        if request.max_tokens_per_message <= 1:
            return _FlushPolicy(1, 0.0)  # one token per message: nothing to wait for
        per_message = min(request.max_tokens_per_message, MAX_AHEAD)
        if request.flush_interval_ms is not None:
            return _FlushPolicy(per_message, request.flush_interval_ms / 1000)
        return _FlushPolicy(
            per_message, self.limits.generate_flush_ms / 1000, self.limits.generate_flush_min_sessions
        )


async def _finish_even_if_cancelled(work: Awaitable[T]) -> T:
    """Await work; if the caller is cancelled meanwhile, let it finish before passing the cancel on.

    Steps already queued write their state slots; cutting them short could free a slot a step is about
    to write, or leave a session's position behind its state.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            await asyncio.wait([task])
        raise


class _Update:
    """What running an input changes in a session, applied to it at once by `commit`."""

    def __init__(self, session: Session, ids: list[int], want_token_logprobs: bool) -> None:
        self.session = session
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
        """Take in the last chunk's outputs and apply the whole input to the session."""
        self.absorb(chunk, outputs)
        s = self.session
        # Own copies: a row of a batch's array would keep the whole batch's array alive.
        s.next_logprobs = None if self.next_logprobs is None else np.array(self.next_logprobs)
        s.class_probs = None if self.class_probs is None else np.array(self.class_probs)
        s.position += len(self.ids)
        s.recent_tokens.extend(self.ids)
        s.touch()


@dataclass(frozen=True)
class _FlushPolicy:
    """When a generation hands its tokens to the reader (one message each hand-over, when allowed)."""

    per_message: int  # as soon as this many are ready
    interval_s: float  # or once the oldest has waited this long (0: at once)
    min_sessions: int = 0  # the interval applies only while this many sessions generate on the model

    def interval(self, generating: int, phase: float) -> float:
        """The wait for a generation whose phase is in [0, 1): spread over [interval/2, interval], so
        that the sessions of a batch, which get their tokens in the same runs, do not all become due
        in the same run (64 messages at once would hold the event loop, and so the next run, for
        milliseconds)."""
        if generating < self.min_sessions:
            return 0.0
        return self.interval_s * (0.5 + 0.5 * phase)


class _Generation:
    """One Generate call in the model's running batch (implements scheduler.Generation).

    The scheduler feeds `token` and calls `stepped` with what follows it; this applies the token to the
    session and queues it for the reader, who is woken when the flush policy says the tokens should go
    out. Whether a token ends the generation (stop strings and ids, <eos>, max_tokens) is decided when
    it is sampled (`_sampled_next`), a run before it is applied, which lets the scheduler start the next
    run before handing this one over.

    `stepped` runs for every session of the batch between two model runs, so it does as little as it
    can: without stop strings, turning tokens into text waits for the reader (`take`), which runs while
    the next batch is in ONNX Runtime.
    """

    def __init__(
        self,
        session: Session,
        request: GenerateRequest,
        eos: int | None,
        scheduler: Scheduler,
        flush: _FlushPolicy,
    ) -> None:
        assert session.next_logprobs is not None
        self.session = session
        self.slot = session.slot
        self._request = request
        self._eos = eos
        self._scheduler = scheduler
        self.sampler = Sampler(request.sampling)
        self._decoder = IncrementalDecoder(session.model.codec, list(session.recent_tokens))
        self._stops = _StopMatcher(request.stop)
        self._stop_ids = set(request.stop_token_ids)
        self._decode_late = not request.stop  # no stop strings: text is made by the reader (see take)
        self._sampled = 0  # tokens sampled
        self._count = 0  # tokens generated (sampled and applied to the session)
        self._counted = 0  # of them, counted in the metric
        self._ready: list[GeneratedToken] = []
        self._first_ready_at = 0.0  # time.monotonic() when the oldest of _ready was made
        self._handed_over = 0  # tokens taken by the reader so far
        self._flush = flush
        self._flush_phase = (session.slot * _GOLDEN_RATIO) % 1.0  # evenly spread over the slots in use
        self._wakeup = asyncio.Event()
        self._finished = False
        self._cancelled = False
        self._tokens_out = scheduler.metrics.tokens_out
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ready_at = time.monotonic()
        first = self.sampler.choose(session.next_logprobs)
        self._sampled_next(first, float(session.next_logprobs[first]))

    @property
    def active(self) -> bool:
        return not (self._finished or self._cancelled)

    @property
    def runnable(self) -> bool:
        return len(self._ready) < MAX_AHEAD

    def continues_after_run(self) -> bool:
        return self.active and self._token_finish is None and len(self._ready) + 1 < MAX_AHEAD

    def _sampled_next(self, token: int, logprob: float) -> None:
        """`token` was sampled: the next run feeds it. Whether it ends the generation (a stop string
        or id, <eos>, max_tokens) is decided now, so that the scheduler can start that next run
        before this one's results are handed over (see Scheduler._loop)."""
        self.token, self._logprob = token, logprob
        self._sampled += 1
        finish: str | None = None
        text = ""
        if not self._decode_late:
            text, stopped = self._stops.push(self._decoder.push(token))
            finish = FinishReason.STOP if stopped else None
        if finish is None:
            if token in self._stop_ids:
                finish = FinishReason.STOP
            elif token == self._eos and not self._request.ignore_eos:
                finish = FinishReason.EOS
            elif self._sampled == self._request.max_tokens:
                finish = FinishReason.LENGTH
            if finish and not self._decode_late:
                text += self._stops.flush()
        self._token_text, self._token_finish = text, finish

    def stepped(self, logprobs: np.ndarray, next_token: int) -> None:
        session, token, finish = self.session, self.token, self._token_finish
        session.position += 1
        session.recent_tokens.append(token)
        session.next_logprobs = logprobs  # [vocab]; a row of the batch's array until we leave (see left)
        self._count += 1
        now = time.monotonic()
        if not self._ready:
            self._first_ready_at = now
        self._ready.append(GeneratedToken(token, self._token_text, self._logprob, session.position, finish))
        self.ready_at = now
        if finish:
            self._finished = True
        else:
            self._sampled_next(next_token, float(logprobs[next_token]))
        if self._due(now):
            self._wakeup.set()

    def _due(self, now: float) -> bool:
        """Whether the ready tokens should go to the reader now."""
        ready = len(self._ready)
        if not ready:
            return False
        if ready >= self._flush.per_message or ready >= MAX_AHEAD or not self.active or self.gone.done():
            return True
        if not self._handed_over:
            return True  # the first token never waits: time to first token is what a reader feels most
        return now - self._first_ready_at >= self._flush.interval(
            self._scheduler.generating, self._flush_phase
        )

    def _count_out(self) -> None:
        """The tokens-out metric, updated per hand-over to the reader rather than per token."""
        if self._count > self._counted:
            self._tokens_out.inc(self._count - self._counted)
            self._counted = self._count

    def left(self) -> None:
        if self.gone.done():
            return  # released already (see cancel)
        self._count_out()
        if self.session.next_logprobs is not None:
            self.session.next_logprobs = np.array(self.session.next_logprobs)  # own copy (see stepped)
        self.session.touch()
        self.gone.set_result(None)
        self._wakeup.set()

    def cancel(self) -> None:
        """The reader went away: leave the batch at the next run."""
        if self._finished:
            # Its last run was handed over and no run since included it (a finished token is known
            # when sampled): nothing is in flight on its slot, so the session is free now, a run
            # earlier than the scheduler would notice.
            self.left()
            return
        if self.active:
            self._cancelled = True
        self._scheduler.wake()

    async def take(self) -> list[GeneratedToken]:
        """The tokens generated since the last call (at least one, in order), once they are due."""
        while not self._due(time.monotonic()):
            if self.gone.done() and not self._ready:
                raise RuntimeError(
                    f"generation on session {self.session.id} stopped: the model failed (see the server log)"
                )
            self._wakeup.clear()
            await self._wakeup.wait()
        tokens, self._ready = self._ready, []
        self._handed_over += len(tokens)
        if self._decode_late:
            for t in tokens:
                t.text = self._decoder.push(t.token_id)
        self._count_out()
        if len(tokens) >= MAX_AHEAD:
            self._scheduler.wake()  # it was sitting out runs
        return tokens
