"""The engine: what the RPC handlers call, and the facade over what serves them. Owns the models'
schedulers and tasks, the sessions (through the keeper), feeding input to a session and classifying.
Generate calls are `GenerateCalls`' (generate_call.py); running input through a model is `InputApplier`'s
(applying.py). Knows nothing about protobuf. What a kind of model allows, how its outputs are read and how
it classifies is its task's (tasks.py).

A session changes in one place, the output processor (output.py), called on the event loop as soon as a
run is handed over, whether or not the caller is still there: `InputUpdate.commit` for an input,
`advance_by_generated` (through generation.py) for generated tokens, `settle_after_generation` after a
K-step block's rollback. Each records the message as the session's last applied one in the same
synchronous call, so a retry after a lost reply is always recognised.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rnnserve.server.applying import InputApplier, position_mismatch
from rnnserve.server.errors import InvalidArgument
from rnnserve.server.generate_call import GenerateCalls
from rnnserve.server.generation import Clock, FinishReason, GeneratedToken, GenerateRequest
from rnnserve.server.inputs import InputReader
from rnnserve.server.keeper import SessionKeeper, StoreOptions, check_model
from rnnserve.server.output import InputUpdate
from rnnserve.server.repository import LoadedModel, ModelRepository
from rnnserve.server.scheduler import Scheduler, SchedulerOptions
from rnnserve.server.sessions import AppliedInput, Session, SessionLimits, SessionTable
from rnnserve.server.store import SessionStore
from rnnserve.server.tasks import Classification, FeedResult, ModelTask, task_for

__all__ = [
    "Classification",
    "Engine",
    "EngineLimits",
    "FeedResult",
    "FinishReason",
    "GenerateRequest",
    "GeneratedToken",
    "StoreOptions",
]


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
        # One worker thread runs ORT (which is multi-threaded itself, see RuntimeOptions.intra_op_threads);
        # the event loop stays free for gRPC I/O meanwhile. More workers would only make runs of
        # different models compete for the same cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")
        self.inputs = InputReader(self.limits)
        self._scheduler_options = scheduler_options
        self._started = False
        self.schedulers: dict[str, Scheduler] = {}
        self.applier = InputApplier(self.schedulers, self.tasks, self.limits.chunk_tokens)
        self.generates = GenerateCalls(
            self.keeper, self.schedulers, self.tasks, self.inputs, self.applier, self.limits
        )
        for model, _ in repository.all():
            self.add_model(model)

    @property
    def clock(self) -> Clock:
        """What generations' flush intervals are measured with (time.monotonic; tests stop it)."""
        return self.generates.clock

    @clock.setter
    def clock(self, clock: Clock) -> None:
        self.generates.clock = clock

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

            await self.applier.apply(session, ids, want_token_logprobs=token_logprobs, on_commit=record)
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
        raise position_mismatch(session, expected)

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

    def generate(self, session_id: str, request: GenerateRequest) -> AsyncIterator[list[GeneratedToken]]:
        """Sample up to max_tokens tokens continuing the session, each applied to its state, yielded in
        lists of those ready at once (see GenerateCalls.generate: retries under a request_id, end_turn)."""
        return self.generates.generate(session_id, request)
