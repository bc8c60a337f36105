"""gRPC handlers for rnnserve.v1.RnnServe: protobuf in, engine call, protobuf out. Nothing else.

Errors are raised as `rnnserve.server.errors` exceptions and turned into statuses by the interceptor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from itertools import accumulate

from grpc import aio

from rnnserve.server.caller import current_caller
from rnnserve.server.engine import (
    Engine,
    GeneratedToken,
    GenerateRequest,
)
from rnnserve.server.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from rnnserve.server.quoting import quote
from rnnserve.server.reload import Reloader
from rnnserve.server.repository import LoadedModel
from rnnserve.server.sampling import SamplingParams
from rnnserve.server.sessions import Session
from rnnserve.server.snapshot import FINISH_REASONS, classification_pb, feed_result_pb
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc


def model_info_pb(model: LoadedModel, latest: bool) -> pb.ModelInfo:
    m = model.manifest
    return pb.ModelInfo(
        name=m.name,
        version=m.version,
        task=m.task,
        cell=m.cell,
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_directions=m.num_directions,
        vocab_size=m.vocab_size,
        tokenizer=m.tokenizer_kind,
        special_tokens=m.special_tokens,
        state=[
            pb.StateTensorInfo(
                name=s.name,
                input_name=s.input_name,
                output_name=s.output_name,
                shape=s.shape,
                batch_axis=s.batch_axis,
                dtype=s.dtype,
            )
            for s in m.state
        ],
        metrics={k: float(v) for k, v in m.metrics.items() if isinstance(v, int | float)},
        latest=latest,
        provider=model.runtime.provider,
        labels=m.labels,
        pooling=m.pooling,
        classifier_mode=m.classifier_mode,
        streams=m.streams,
    )


def session_info_pb(session: Session) -> pb.SessionInfo:
    m = session.model.manifest
    return pb.SessionInfo(
        session_id=session.id,
        model=m.name,
        version=m.version,
        position=session.position,
        created_at=session.created_at,
        expires_at=session.expires_at,
        ttl_seconds=int(session.ttl_seconds),
        task=m.task,
        labels=m.labels,
    )


def generate_response(tokens: Sequence[GeneratedToken]) -> pb.GenerateResponse:
    """One Generate message carrying `tokens` (at least one, consecutive): packed ids and logprobs, their
    texts joined once, where each text ends (code points), the position after the last."""
    texts = [t.text for t in tokens]
    last = tokens[-1]
    return pb.GenerateResponse(
        token_ids=[t.token_id for t in tokens],
        logprobs=[t.logprob for t in tokens],
        text="".join(texts),
        text_offsets=list(accumulate(map(len, texts))),
        position=last.position,
        finish_reason=FINISH_REASONS[last.finish_reason],
    )


def generate_responses(tokens: list[GeneratedToken], per_message: int) -> list[pb.GenerateResponse]:
    """Tokens ready at once (one hand-over of the engine) as messages of at most `per_message` tokens
    (0 or 1: one each)."""
    n = max(1, per_message)
    if len(tokens) <= n:
        return [generate_response(tokens)]
    return [generate_response(tokens[i : i + n]) for i in range(0, len(tokens), n)]


def stream_input(request: pb.StreamRequest) -> str | list[int] | None:
    """The text or token ids a Stream message carries, or None if neither."""
    which = request.WhichOneof("input")
    if which == "text":
        return request.text
    return list(request.tokens.ids) if which == "tokens" else None


def prompt_input(request: pb.GenerateRequest) -> str | list[int] | None:
    """The prompt text or token ids of a Generate request, or None if neither."""
    which = request.WhichOneof("prompt")
    if which == "prompt_text":
        return request.prompt_text
    return list(request.prompt_tokens.ids) if which == "prompt_tokens" else None


def sampling_params_of(request: pb.GenerateRequest) -> SamplingParams:
    s = request.sampling
    return SamplingParams(
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p if s.top_p != 0 else 1.0,
        seed=s.seed if s.HasField("seed") else None,
    )


class RnnServeServicer(pb_grpc.RnnServeServicer):
    """Thin handlers over the engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def ListModels(
        self, request: pb.ListModelsRequest, context: aio.ServicerContext
    ) -> pb.ListModelsResponse:
        caller = current_caller()  # a token sees the models it may use, no others
        return pb.ListModelsResponse(
            models=[
                model_info_pb(m, latest)
                for m, latest in self.engine.repository.all()
                if caller.may_use(m.manifest.name)
            ]
        )

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: aio.ServicerContext
    ) -> pb.SessionInfo:
        session = await self.engine.keeper.open(request.model, request.version, request.ttl_seconds)
        return session_info_pb(session)

    async def GetSession(self, request: pb.GetSessionRequest, context: aio.ServicerContext) -> pb.SessionInfo:
        if not request.session_id:
            raise InvalidArgument("session_id is required")
        return session_info_pb(await self.engine.keeper.get(request.session_id))

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: aio.ServicerContext
    ) -> pb.CloseSessionResponse:
        return pb.CloseSessionResponse(position=await self.engine.keeper.close(request.session_id))

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        bound = ""
        async for request in request_iterator:
            if request.session_id and bound and request.session_id != bound:
                raise InvalidArgument(
                    f"this stream is bound to session {quote(bound)}; open another stream for "
                    f"{quote(request.session_id)}"
                )
            bound = bound or request.session_id
            if not bound:
                raise InvalidArgument("the first message of a stream must carry session_id")
            data = stream_input(request)
            if data is None and not request.end_turn:
                raise InvalidArgument("the message carries no input: set text or tokens (or end_turn)")
            result = await self.engine.feed(
                bound,
                data,
                expected_position=request.expected_position
                if request.HasField("expected_position")
                else None,
                top_k=request.top_k,
                token_logprobs=request.return_token_logprobs,
                end_turn=request.end_turn,
            )
            yield feed_result_pb(result)

    async def Generate(
        self, request: pb.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        params = GenerateRequest(
            sampling=sampling_params_of(request),
            max_tokens=request.max_tokens,
            stop=list(request.stop),
            stop_token_ids=list(request.stop_token_ids),
            ignore_eos=request.ignore_eos,
            prompt=prompt_input(request),
            expected_position=request.expected_position if request.HasField("expected_position") else None,
            max_tokens_per_message=request.max_tokens_per_message,
            flush_interval_ms=request.flush_interval_ms if request.HasField("flush_interval_ms") else None,
            request_id=request.request_id,
            end_turn=request.end_turn,
        )
        async for tokens in self.engine.generate(request.session_id, params):
            # Tokens due together (see GenerateRequest.flush_interval_ms) go out in one message when allowed.
            for response in generate_responses(tokens, request.max_tokens_per_message):
                yield response

    async def ForkSession(
        self, request: pb.ForkSessionRequest, context: aio.ServicerContext
    ) -> pb.SessionInfo:
        if not request.session_id:
            raise InvalidArgument("session_id is required")
        return session_info_pb(await self.engine.keeper.fork(request.session_id, request.ttl_seconds))

    async def ExportSession(
        self, request: pb.ExportSessionRequest, context: aio.ServicerContext
    ) -> pb.ExportSessionResponse:
        if not request.session_id:
            raise InvalidArgument("session_id is required")
        session, snapshot = await self.engine.keeper.export(request.session_id)
        return pb.ExportSessionResponse(snapshot=snapshot, session=session_info_pb(session))

    async def ImportSession(
        self, request: pb.ImportSessionRequest, context: aio.ServicerContext
    ) -> pb.SessionInfo:
        if not request.snapshot:
            raise InvalidArgument("snapshot is required: the bytes ExportSession returned")
        return session_info_pb(await self.engine.keeper.import_(request.snapshot, request.ttl_seconds))

    async def Classify(
        self, request: pb.ClassifyRequest, context: aio.ServicerContext
    ) -> pb.ClassifyResponse:
        if request.texts and request.token_lists:
            raise InvalidArgument("set texts or token_lists, not both")
        inputs: list[str | list[int]] = (
            list(request.texts) if request.texts else [list(t.ids) for t in request.token_lists]
        )
        model, results = await self.engine.classify(request.model, request.version, inputs)
        return pb.ClassifyResponse(
            model=model.manifest.name,
            version=model.manifest.version,
            labels=model.manifest.labels,
            results=[classification_pb(c) for c in results],
        )

    # -- hot reload: `reloader` is set by the server (app.py); see reload.py for the rules -------------

    reloader: Reloader | None = None

    async def ReloadModels(
        self, request: pb.ReloadModelsRequest, context: aio.ServicerContext
    ) -> pb.ReloadModelsResponse:
        if self.reloader is None:
            raise FailedPrecondition("this server does not reload models")
        caller = current_caller()
        if caller.models is not None:
            raise PermissionDenied(
                f"token {quote(caller.name)} may not reload models: that takes a token allowed every "
                'model (models = ["*"])'
            )
        result = await self.reloader.reload()
        latest = {m.key: is_latest for m, is_latest in self.engine.repository.all()}
        return pb.ReloadModelsResponse(
            loaded=[model_info_pb(m, latest.get(m.key, False)) for m in result.loaded],
            refused=[pb.RefusedModel(path=str(path), reason=reason) for path, reason in result.refused],
            unloaded=result.unloaded,
        )
