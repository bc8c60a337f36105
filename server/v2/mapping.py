"""V2 tensors and parameters <-> engine calls, for both transports (gRPC and REST), protocol-neutral.

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
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rnnserve.export.manifest import LOGITS_TASKS
from rnnserve.inference import model_config_pb2 as mc
from rnnserve.server.caller import current_caller
from rnnserve.server.engine import Engine, FeedResult, GeneratedToken, GenerateRequest
from rnnserve.server.errors import InvalidArgument, NotFound, ServingError
from rnnserve.server.keeper import check_model
from rnnserve.server.quoting import quote
from rnnserve.server.repository import LoadedModel
from rnnserve.server.sampling import SamplingParams

ParamValue = bool | int | float | str
Data = np.ndarray | list[bytes]

SERVER_NAME = "rnnserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["classification", "sequence", "model_configuration", "binary_tensor_data"]
PLATFORM = "onnxruntime_onnx"

# V2 datatype <-> numpy dtype (BYTES: lists of bytes).
NUMPY_TYPES: dict[str, type[np.generic]] = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
CONFIG_TYPES = {"INT64": mc.TYPE_INT64, "INT32": mc.TYPE_INT32, "FP32": mc.TYPE_FP32, "BYTES": mc.TYPE_STRING}
INTEGER_TYPES = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
GENERATION_PARAMETERS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "ignore_eos")


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: Data  # numpy array (flat or shaped) or, for BYTES, the elements in order

    def count(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass
class InferRequest:
    model: str
    version: str = ""
    id: str = ""
    inputs: list[Tensor] = field(default_factory=list)
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)  # requested output names; empty: all


@dataclass
class InferResponse:
    model: str
    version: str
    id: str
    outputs: list[Tensor]
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]


def is_lm(model: LoadedModel) -> bool:
    """A language model (a dialogue model too: it is served as an LM over its conversation's stream)."""
    return model.manifest.task in LOGITS_TASKS


def tensor_specs(model: LoadedModel) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A model's inputs and outputs as V2 tensors (-1: any size)."""
    m = model.manifest
    if is_lm(model):
        return (
            [
                TensorSpec("INPUT_IDS", "INT64", [1, -1]),
                TensorSpec("TEXT", "BYTES", [1]),
                TensorSpec("MAX_TOKENS", "INT64", [1]),
            ],
            [
                TensorSpec("LOGPROBS", "FP32", [1, m.vocab_size]),
                TensorSpec("TOKEN_IDS", "INT64", [1, -1]),
                TensorSpec("POSITION", "INT64", [1]),
                TensorSpec("TEXT", "BYTES", [1]),
                TensorSpec("TOKEN_LOGPROBS", "FP32", [1, -1]),
            ],
        )
    return (
        [TensorSpec("TEXT", "BYTES", [-1]), TensorSpec("INPUT_IDS", "INT64", [-1, -1])],
        [TensorSpec("PROBS", "FP32", [-1, len(m.labels)]), TensorSpec("LABEL", "BYTES", [-1])],
    )


def model_config_pb(model: LoadedModel) -> mc.ModelConfig:
    """Triton's ModelConfig for a model: enough for tritonclient (and people) to see what it takes."""
    m = model.manifest
    inputs, outputs = tensor_specs(model)
    config = mc.ModelConfig(
        name=m.name,
        platform=PLATFORM,
        backend="rnnserve",
        max_batch_size=0,
        input=[
            mc.ModelInput(name=s.name, data_type=CONFIG_TYPES[s.datatype], dims=s.shape, optional=True)
            for s in inputs
        ],
        output=[
            mc.ModelOutput(name=s.name, data_type=CONFIG_TYPES[s.datatype], dims=s.shape) for s in outputs
        ],
    )
    if m.streams:
        config.sequence_batching.SetInParent()  # sequences map onto sessions
    if is_lm(model):
        config.model_transaction_policy.decoupled = True  # generation: several responses per request
    if m.labels:
        config.parameters["labels"].string_value = ",".join(m.labels)
    config.parameters["task"].string_value = m.task
    return config


def _param(params: Mapping[str, ParamValue], name: str, kind: type, default: Any) -> Any:
    value = params.get(name)
    if value is None:
        return default
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise InvalidArgument(f"parameter {name} must be {kind.__name__}, got {quote(str(value))}")


def sequence_key(params: Mapping[str, ParamValue]) -> str | None:
    """The request's sequence id as a key ("u:<n>" / "s:<text>"), or None outside a sequence (0 or "")."""
    value = params.get("sequence_id")
    if value is None or value == 0 or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidArgument(f"sequence_id must be an unsigned integer or a string, got {quote(str(value))}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgument(f"sequence_id must be an unsigned integer or a string, got {value}")
        return f"u:{value}"
    return f"s:{value}"


def _bytes_elements(tensor: Tensor) -> list[bytes]:
    if tensor.datatype != "BYTES" or not isinstance(tensor.data, list):
        raise InvalidArgument(f"input {tensor.name} must be BYTES, got {tensor.datatype}")
    return tensor.data


def _texts(tensor: Tensor) -> list[str]:
    out = []
    for i, b in enumerate(_bytes_elements(tensor)):
        try:
            out.append(b.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"input {tensor.name} element {i} is not UTF-8: {e}") from None
    return out


def _int_array(tensor: Tensor) -> np.ndarray:
    if tensor.datatype not in INTEGER_TYPES or not isinstance(tensor.data, np.ndarray):
        raise InvalidArgument(
            f"input {tensor.name} must be INT64 (or another integer type), got {tensor.datatype}"
        )
    return tensor.data.reshape(tensor.shape) if tensor.shape else tensor.data


def _single_row(tensor: Tensor, what: str) -> None:
    if tensor.shape and (len(tensor.shape) > 2 or tensor.shape[0] != 1):
        raise InvalidArgument(
            f"input {tensor.name} must have shape {what} (one sequence per request), got {tensor.shape}"
        )


def _inputs_by_name(request: InferRequest, allowed: Sequence[str]) -> dict[str, Tensor]:
    by_name: dict[str, Tensor] = {}
    for t in request.inputs:
        if t.name not in allowed:
            raise InvalidArgument(
                f"model {quote(request.model)} has no input {quote(t.name)} (inputs: {', '.join(allowed)})"
            )
        if t.name in by_name:
            raise InvalidArgument(f"input {t.name} is given twice")
        by_name[t.name] = t
    return by_name


def _one_input(by_name: Mapping[str, Tensor], model: str, required: bool) -> Tensor | None:
    given = [by_name[n] for n in ("INPUT_IDS", "TEXT") if n in by_name]
    if len(given) > 1:
        raise InvalidArgument("give INPUT_IDS or TEXT, not both")
    if not given and required:
        raise InvalidArgument(f"model {quote(model)} needs an input: INPUT_IDS (INT64) or TEXT (BYTES)")
    return given[0] if given else None


def _lm_input(tensor: Tensor | None) -> str | list[int] | None:
    if tensor is None:
        return None
    if tensor.name == "TEXT":
        _single_row(tensor, "[1]")
        texts = _texts(tensor)
        if len(texts) != 1:
            raise InvalidArgument(f"input TEXT must hold one element, got {len(texts)}")
        return texts[0]
    _single_row(tensor, "[1, n]")
    return [int(i) for i in _int_array(tensor).reshape(-1)]


def _batch_inputs(tensor: Tensor) -> list[str | list[int]]:
    if tensor.name == "TEXT":
        if len(tensor.shape) > 2 or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise InvalidArgument(f"input TEXT must have shape [n] or [n, 1], got {tensor.shape}")
        return list(_texts(tensor))
    ids = _int_array(tensor)
    rows = ids.reshape(1, -1) if ids.ndim < 2 else ids.reshape(ids.shape[0], -1)
    return [[int(i) for i in row] for row in rows]


def _fp32(name: str, values: Any, shape: list[int]) -> Tensor:
    return Tensor(name, "FP32", shape, np.asarray(values, dtype=np.float32).reshape(shape))


def _int64(name: str, values: Any, shape: list[int]) -> Tensor:
    return Tensor(name, "INT64", shape, np.asarray(values, dtype=np.int64).reshape(shape))


def _bytes(name: str, texts: Sequence[str]) -> Tensor:
    return Tensor(name, "BYTES", [len(texts)], [t.encode("utf-8") for t in texts])


def _select(outputs: list[Tensor], requested: Sequence[str], allowed: Sequence[str]) -> list[Tensor]:
    if not requested:
        return outputs
    unknown = [n for n in requested if n not in allowed]
    if unknown:
        raise InvalidArgument(f"unknown output {quote(unknown[0])} (outputs: {', '.join(allowed)})")
    return [t for t in outputs if t.name in requested]


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
        start = _param(params, "sequence_start", bool, False)
        end = _param(params, "sequence_end", bool, False)
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
        by_name = _inputs_by_name(request, [s.name for s in inputs])
        data = _lm_input(_one_input(by_name, request.model, required=True))
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
            _fp32("LOGPROBS", logprobs, [1, vocab]),
            _int64("TOKEN_IDS", result.token_ids, [1, len(result.token_ids)]),
            _int64("POSITION", [result.position], [1]),
        ]
        names = [s.name for s in outputs]
        return self._response(request, loaded, _select(tensors, request.outputs, names))

    def _generate_request(self, request: InferRequest, prompt: str | list[int] | None) -> GenerateRequest:
        p = request.parameters
        max_tokens = _param(p, "max_tokens", int, 0)
        for t in request.inputs:
            if t.name == "MAX_TOKENS":
                values = _int_array(t).reshape(-1)
                if values.size != 1:
                    raise InvalidArgument(f"input MAX_TOKENS must hold one element, got {values.size}")
                max_tokens = int(values[0])
        stop = p.get("stop")
        stops: list[str] = []
        if isinstance(stop, str):
            stops = [stop]
        elif stop is not None:
            raise InvalidArgument(f"parameter stop must be a string, got {quote(str(stop))}")
        top_p = _param(p, "top_p", float, 1.0)
        seed = _param(p, "seed", int, None)
        return GenerateRequest(
            sampling=SamplingParams(
                temperature=_param(p, "temperature", float, 0.0),
                top_k=_param(p, "top_k", int, 0),
                top_p=top_p if top_p != 0 else 1.0,
                seed=seed,
            ),
            max_tokens=max_tokens,
            stop=stops,
            ignore_eos=_param(p, "ignore_eos", bool, False),
            prompt=prompt,
        )

    async def _generate(
        self, request: InferRequest
    ) -> AsyncIterator[tuple[LoadedModel, list[GeneratedToken]]]:
        loaded = self.model(request.model, request.version)
        inputs, _ = tensor_specs(loaded)
        by_name = _inputs_by_name(request, [s.name for s in inputs])
        prompt = _lm_input(_one_input(by_name, request.model, required=False))
        params = self._generate_request(request, prompt)
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
            _int64("TOKEN_IDS", [t.token_id for t in tokens], [1, len(tokens)]),
            _bytes("TEXT", ["".join(t.text for t in tokens)]),
            _fp32("TOKEN_LOGPROBS", [t.logprob for t in tokens], [1, len(tokens)]),
        ]
        if tokens:
            params["position"] = tokens[-1].position
            if tokens[-1].finish_reason:
                params["finish_reason"] = tokens[-1].finish_reason
        names = ["TOKEN_IDS", "TEXT", "TOKEN_LOGPROBS"]
        return self._response(request, loaded, _select(tensors, request.outputs, names), params)

    # -- classifiers ------------------------------------------------------------------------------

    async def _classify(self, request: InferRequest, loaded: LoadedModel) -> InferResponse:
        inputs, outputs = tensor_specs(loaded)
        by_name = _inputs_by_name(request, [s.name for s in inputs])
        tensor = _one_input(by_name, request.model, required=True)
        assert tensor is not None
        labels = loaded.manifest.labels
        if sequence_key(request.parameters) is None:
            model, results = await self.engine.classify(
                loaded.manifest.name, loaded.manifest.version, _batch_inputs(tensor)
            )
            loaded = model
            probs = [c.probs for c in results]
            names = [c.label for c in results]
        else:
            data = _lm_input(tensor)
            assert data is not None
            session_id, close = await self._session(request, loaded)
            async with self._running(session_id, close):
                result: FeedResult = await self.engine.feed(session_id, data)
            assert result.classification is not None
            probs = [result.classification.probs]
            names = [result.classification.label]
        tensors = [_fp32("PROBS", probs, [len(probs), len(labels)]), _bytes("LABEL", names)]
        return self._response(request, loaded, _select(tensors, request.outputs, [s.name for s in outputs]))

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


# -- BYTES tensors in raw form: each element as a 4-byte little-endian length and its bytes ----------


def encode_bytes(elements: Sequence[bytes]) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def decode_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    out: list[bytes] = []
    i = 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InvalidArgument(f"input {name}: truncated BYTES element length at byte {i}")
        n = int.from_bytes(raw[i : i + 4], "little")
        i += 4
        if i + n > len(raw):
            raise InvalidArgument(f"input {name}: BYTES element of {n} bytes runs past the end of the data")
        out.append(raw[i : i + n])
        i += n
    if len(out) != count:
        raise InvalidArgument(f"input {name}: {len(out)} BYTES elements for shape of {count} elements")
    return out


def tensor_from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> Tensor:
    """A tensor from its raw bytes (gRPC raw_input_contents, REST binary data)."""
    count = int(np.prod(shape)) if shape else 1
    if datatype == "BYTES":
        return Tensor(name, datatype, shape, decode_bytes(raw, count, name))
    dtype = NUMPY_TYPES.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"input {name}: unsupported datatype {quote(datatype)}")
    size = np.dtype(dtype).itemsize * count
    if len(raw) != size:
        raise InvalidArgument(
            f"input {name}: {len(raw)} bytes of data for shape {shape} of {datatype} (expected {size})"
        )
    return Tensor(name, datatype, shape, np.frombuffer(raw, dtype=dtype).reshape(shape))


def tensor_from_values(name: str, datatype: str, shape: list[int], values: Sequence[Any]) -> Tensor:
    """A tensor from a flat list of values (gRPC typed contents, REST JSON data)."""
    count = int(np.prod(shape)) if shape else 1
    if len(values) != count:
        raise InvalidArgument(f"input {name}: {len(values)} values for shape {shape} ({count} elements)")
    if datatype == "BYTES":
        return Tensor(
            name, datatype, shape, [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
        )
    dtype = NUMPY_TYPES.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"input {name}: unsupported datatype {quote(datatype)}")
    try:
        array = np.asarray(values, dtype=dtype).reshape(shape)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidArgument(f"input {name}: values are not {datatype}: {e}") from None
    return Tensor(name, datatype, shape, array)


def tensor_raw(tensor: Tensor) -> bytes:
    if isinstance(tensor.data, list):
        return encode_bytes(tensor.data)
    return np.ascontiguousarray(tensor.data, dtype=NUMPY_TYPES[tensor.datatype]).tobytes()
