"""V2 requests onto engine calls, for both transports (gRPC and REST), protocol-neutral: which call a
request means, the session it runs on (sequences), and the response tensors built from the answer.
The tensors are tensors.py's, a request is read and checked by parsing.py, a model's V2 metadata is
metadata.py's.

A request is an `InferRequest` (named tensors as numpy arrays, BYTES as lists of bytes, and scalar
parameters); `V2Engine` answers it with `InferResponse`s. What each model takes and returns:

- a language model: `INPUT_IDS` (INT64 [1, n]) or `TEXT` (BYTES [1]) in; `LOGPROBS` (FP32 [1, vocab]: the
  next token's log-probabilities after the input), `TOKEN_IDS` (INT64 [1, n]: the ids applied) and
  `POSITION` (INT64 [1]) out. A request with parameter `generate: true` or an input `MAX_TOKENS` (INT32 or
  INT64 [1]) generates instead: the input is the prompt (optional), the parameters `max_tokens`,
  `temperature`, `top_k`, `top_p`, `seed`, `stop` and `ignore_eos` mean what they mean in the native
  Generate; out come `TOKEN_IDS` (INT64 [1, k]), `TEXT` (BYTES [1]) and `TOKEN_LOGPROBS` (FP32 [1, k]), one
  response per token on ModelStreamInfer (a decoupled model), all tokens in one response on ModelInfer.
- a classifier: `TEXT` (BYTES [n]) or `INPUT_IDS` (INT64 [n, L]) in, a batch classified independently
  (whole texts); `PROBS` (FP32 [n, classes]) and `LABEL` (BYTES [n]) out. In a sequence (streaming
  classifiers only) one text at a time ([1]), classified as the text so far.

Sequences (Triton's sequence batcher): parameters `sequence_id` (uint64, or a string), `sequence_start`
and `sequence_end`. Start opens a session (an id already open is closed first, as in Triton), end closes
it after the answer, an id never started is refused. Without a sequence_id a request runs on a session of
its own, opened and closed around it.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress

from rnnserve.server.caller import current_caller
from rnnserve.server.engine import Engine, FeedResult, GeneratedToken
from rnnserve.server.errors import InvalidArgument, NotFound, ServingError
from rnnserve.server.keeper import check_model
from rnnserve.server.quoting import quote
from rnnserve.server.repository import LoadedModel
from rnnserve.server.v2.metadata import is_lm, tensor_specs
from rnnserve.server.v2.parsing import (
    batch_inputs,
    generate_request,
    inputs_by_name,
    lm_input,
    one_input,
    param,
    select_outputs,
    sequence_key,
)
from rnnserve.server.v2.tensors import (
    InferRequest,
    InferResponse,
    ParamValue,
    Tensor,
    bytes_tensor,
    fp32_tensor,
    int64_tensor,
)


class V2Engine:
    """The V2 protocol's view of the engine, shared by the gRPC servicer and the REST routes of a
    server (one sequence table: a sequence may start on one transport and go on on the other)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sequences: dict[tuple[str, str, str], str] = {}  # (token, model, sequence key) -> session id

    # -- health and metadata ----------------------------------------------------------------------

    def model(self, name: str, version: str = "") -> LoadedModel:
        if not name:
            raise InvalidArgument("model name is required")
        check_model(name)
        return self.engine.repository.get(name, version)

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.model(name, version)
        except NotFound:
            return False
        return True

    def versions(self, name: str) -> list[str]:
        return [m.manifest.version for m, _ in self.engine.repository.all() if m.manifest.name == name]

    # -- inference --------------------------------------------------------------------------------

    @staticmethod
    def wants_generation(request: InferRequest) -> bool:
        return bool(request.parameters.get("generate")) or any(t.name == "MAX_TOKENS" for t in request.inputs)

    async def infer(self, request: InferRequest) -> InferResponse:
        """ModelInfer: one response (a generation's tokens all in it)."""
        if self.wants_generation(request):
            tokens: list[GeneratedToken] = []
            model: LoadedModel | None = None
            async for loaded, made in self._generate(request):
                model = loaded
                tokens.extend(made)
            assert model is not None
            return self._generated_response(request, model, tokens, {})
        loaded = self.model(request.model, request.version)
        if is_lm(loaded):
            return await self._feed_lm(request, loaded)
        return await self._classify(request, loaded)

    async def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        """ModelStreamInfer: a generation as one response per token (Triton's decoupled models: the
        last is marked `triton_final_response`, or an empty final response follows when the request
        asks for one with `triton_enable_empty_final_response`); anything else as ModelInfer."""
        if not self.wants_generation(request):
            response = await self.infer(request)
            response.parameters["triton_final_response"] = True
            yield response
            return
        empty_final = bool(request.parameters.get("triton_enable_empty_final_response"))
        last_model: LoadedModel | None = None
        async for loaded, made in self._generate(request):
            last_model = loaded
            for token in made:
                final = token.finish_reason is not None and not empty_final
                params: dict[str, ParamValue] = {"triton_final_response": final}
                yield self._generated_response(request, loaded, [token], params)
        if empty_final and last_model is not None:
            yield InferResponse(
                last_model.manifest.name,
                last_model.manifest.version,
                request.id,
                [],
                {"triton_final_response": True},
            )

    # -- sequences --------------------------------------------------------------------------------

    async def _session(self, request: InferRequest, loaded: LoadedModel) -> tuple[str, bool]:
        """The session a request runs on, and whether to close it after the answer."""
        params = request.parameters
        key = sequence_key(params)
        start = param(params, "sequence_start", bool, False)
        end = param(params, "sequence_end", bool, False)
        if key is None:
            if start or end:
                raise InvalidArgument(
                    f"inference request to model {quote(loaded.manifest.name)} must specify a non-zero "
                    "or non-empty correlation ID (sequence_id) with sequence_start or sequence_end"
                )
            session = await self.engine.keeper.open(loaded.manifest.name, loaded.manifest.version)
            return session.id, True
        seq = (current_caller().name, loaded.manifest.name, key)
        if start:
            old = self.sequences.pop(seq, None)
            if old is not None:
                await self._close(old)
            session = await self.engine.keeper.open(loaded.manifest.name, loaded.manifest.version)
            self.sequences[seq] = session.id
        elif seq not in self.sequences:
            raise InvalidArgument(
                f"inference request for sequence {key[2:]} to model {quote(loaded.manifest.name)} must "
                "specify the START flag on the first request of the sequence"
            )
        session_id = self.sequences[seq]
        if end:
            del self.sequences[seq]
        return session_id, end

    @asynccontextmanager
    async def _running(self, session_id: str, close: bool) -> AsyncIterator[None]:
        """Around a request's engine calls: a session gone (expired, closed natively) takes its sequence
        with it; the request's own session (or its sequence's, at its end) is closed after it."""
        try:
            yield
        except NotFound:
            for seq in [k for k, v in self.sequences.items() if v == session_id]:
                del self.sequences[seq]
            raise
        finally:
            if close:
                await self._close(session_id)

    async def _close(self, session_id: str) -> None:
        with suppress(NotFound):  # expired, or closed with the native API meanwhile
            await self.engine.keeper.close(session_id)

    # -- language models --------------------------------------------------------------------------

    async def _feed_lm(self, request: InferRequest, loaded: LoadedModel) -> InferResponse:
        inputs, outputs = tensor_specs(loaded)
        by_name = inputs_by_name(request, [s.name for s in inputs])
        data = lm_input(one_input(by_name, request.model, required=True))
        assert data is not None
        session_id, close = await self._session(request, loaded)
        async with self._running(session_id, close):
            result = await self.engine.feed(session_id, data)
            # The distribution after the input, read once it is applied: a sequence's requests come one at
            # a time (one sent while a native Generate runs on the same session may see a later one).
            session = await self.engine.keeper.get(session_id)
            logprobs = session.next_logprobs
        assert logprobs is not None
        vocab = loaded.manifest.vocab_size
        tensors = [
            fp32_tensor("LOGPROBS", logprobs, [1, vocab]),
            int64_tensor("TOKEN_IDS", result.token_ids, [1, len(result.token_ids)]),
            int64_tensor("POSITION", [result.position], [1]),
        ]
        names = [s.name for s in outputs]
        return self._response(request, loaded, select_outputs(tensors, request.outputs, names))

    async def _generate(
        self, request: InferRequest
    ) -> AsyncIterator[tuple[LoadedModel, list[GeneratedToken]]]:
        loaded = self.model(request.model, request.version)
        inputs, _ = tensor_specs(loaded)
        by_name = inputs_by_name(request, [s.name for s in inputs])
        prompt = lm_input(one_input(by_name, request.model, required=False))
        params = generate_request(request, prompt)
        if not is_lm(loaded):
            self.engine.tasks[loaded.key].check_generate()  # the native message
        session_id, close = await self._session(request, loaded)
        async with self._running(session_id, close):
            async for tokens in self.engine.generate(session_id, params):
                yield loaded, tokens

    def _generated_response(
        self,
        request: InferRequest,
        loaded: LoadedModel,
        tokens: Sequence[GeneratedToken],
        params: dict[str, ParamValue],
    ) -> InferResponse:
        tensors = [
            int64_tensor("TOKEN_IDS", [t.token_id for t in tokens], [1, len(tokens)]),
            bytes_tensor("TEXT", ["".join(t.text for t in tokens)]),
            fp32_tensor("TOKEN_LOGPROBS", [t.logprob for t in tokens], [1, len(tokens)]),
        ]
        if tokens:
            params["position"] = tokens[-1].position
            if tokens[-1].finish_reason:
                params["finish_reason"] = tokens[-1].finish_reason
        names = ["TOKEN_IDS", "TEXT", "TOKEN_LOGPROBS"]
        return self._response(request, loaded, select_outputs(tensors, request.outputs, names), params)

    # -- classifiers ------------------------------------------------------------------------------

    async def _classify(self, request: InferRequest, loaded: LoadedModel) -> InferResponse:
        inputs, outputs = tensor_specs(loaded)
        by_name = inputs_by_name(request, [s.name for s in inputs])
        tensor = one_input(by_name, request.model, required=True)
        assert tensor is not None
        labels = loaded.manifest.labels
        if sequence_key(request.parameters) is None:
            model, results = await self.engine.classify(
                loaded.manifest.name, loaded.manifest.version, batch_inputs(tensor)
            )
            loaded = model
            probs = [c.probs for c in results]
            names = [c.label for c in results]
        else:
            data = lm_input(tensor)
            assert data is not None
            session_id, close = await self._session(request, loaded)
            async with self._running(session_id, close):
                result: FeedResult = await self.engine.feed(session_id, data)
            assert result.classification is not None
            probs = [result.classification.probs]
            names = [result.classification.label]
        tensors = [fp32_tensor("PROBS", probs, [len(probs), len(labels)]), bytes_tensor("LABEL", names)]
        return self._response(
            request, loaded, select_outputs(tensors, request.outputs, [s.name for s in outputs])
        )

    @staticmethod
    def _response(
        request: InferRequest,
        loaded: LoadedModel,
        outputs: list[Tensor],
        params: dict[str, ParamValue] | None = None,
    ) -> InferResponse:
        return InferResponse(loaded.manifest.name, loaded.manifest.version, request.id, outputs, params or {})


_BY_ENGINE: weakref.WeakKeyDictionary[Engine, V2Engine] = weakref.WeakKeyDictionary()


def v2_for(engine: Engine) -> V2Engine:
    """The engine's one V2Engine: gRPC and REST share its sequences (a sequence started on one transport
    goes on on the other)."""
    v2 = _BY_ENGINE.get(engine)
    if v2 is None:
        v2 = _BY_ENGINE[engine] = V2Engine(engine)
    return v2


def error_text(exc: BaseException) -> str:
    """The message of a serving error (as the native API words it)."""
    if isinstance(exc, ServingError):
        return str(exc)
    return f"internal error: {type(exc).__name__}"
