"""The KServe V2 HTTP/REST routes (with Triton's binary tensor extension and model configuration), over
the same engine and sequences as the gRPC service (mapping.V2Engine); server/http.py builds the
application and calls `add_routes`.

    GET  /v2/health/live, /v2/health/ready         200 when live / ready
    GET  /v2                                       server metadata
    GET  /v2/models/{name}[/versions/{v}]          model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready    200 when ready, 400 otherwise
    GET  /v2/models/{name}[/versions/{v}]/config   Triton's model configuration (JSON)
    POST /v2/models/{name}[/versions/{v}]/infer    inference (JSON, or JSON + binary tensors)
    POST /v2/repository/index                      the models (Triton's repository extension)

Errors are `{"error": "<message>"}` (what tritonclient reads) with the HTTP status of the engine's code
(server/http.py's table), the message as the native API words it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from google.protobuf import json_format

from rnnserve.server.caller import current_caller
from rnnserve.server.engine import Engine
from rnnserve.server.errors import InvalidArgument, ServingError
from rnnserve.server.v2.mapping import V2Engine, v2_for
from rnnserve.server.v2.metadata import (
    EXTENSIONS,
    PLATFORM,
    SERVER_NAME,
    SERVER_VERSION,
    model_config_pb,
    tensor_specs,
)
from rnnserve.server.v2.tensors import (
    InferRequest,
    InferResponse,
    ParamValue,
    Tensor,
    tensor_from_raw,
    tensor_from_values,
    tensor_raw,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(exc: ServingError) -> web.Response:
    from rnnserve.server.http import http_status  # the one table of HTTP statuses

    return web.json_response({"error": str(exc)}, status=http_status(exc))


def _v2_errors(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ServingError as exc:
            return _error(exc)

    return wrapped


def _names(request: web.Request) -> tuple[str, str]:
    return request.match_info["name"], request.match_info.get("version", "")


def _parameters(raw: Any, where: str) -> dict[str, ParamValue]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where} parameters must be a JSON object")
    out: dict[str, ParamValue] = {}
    for k, v in raw.items():
        if not isinstance(v, bool | int | float | str):
            raise InvalidArgument(f"parameter {k} must be a boolean, number or string")
        out[k] = v
    return out


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [x for item in data for x in _flatten(item)]
    return [data]


def parse_infer(
    body: bytes, header_length: str | None, name: str, version: str
) -> tuple[InferRequest, bool, set[str]]:
    """The request; whether all outputs are wanted binary; and which outputs are asked binary."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidArgument(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise InvalidArgument(f"{HEADER_LENGTH} {n} is beyond the body of {len(body)} bytes")
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"the request is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("the request must be a JSON object")
    inputs: list[Tensor] = []
    offset = 0
    for i, t in enumerate(doc.get("inputs") or []):
        if not isinstance(t, dict) or not all(k in t for k in ("name", "datatype", "shape")):
            raise InvalidArgument(f"input {i} needs name, datatype and shape")
        tname, datatype = str(t["name"]), str(t["datatype"])
        shape = t["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InvalidArgument(f"input {tname}: shape must be a list of non-negative integers")
        params = _parameters(t.get("parameters"), f"input {tname}")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidArgument(f"input {tname}: binary_data_size {size} is beyond the binary data")
            inputs.append(tensor_from_raw(tname, datatype, shape, binary[offset : offset + size]))
            offset += size
        else:
            if "data" not in t:
                raise InvalidArgument(f"input {tname} has no data")
            inputs.append(tensor_from_values(tname, datatype, shape, _flatten(t["data"])))
    parameters = _parameters(doc.get("parameters"), "request")
    binary_all = bool(parameters.pop("binary_data_output", False))
    outputs: list[str] = []
    binary_outputs: set[str] = set()
    for o in doc.get("outputs") or []:
        if not isinstance(o, dict) or "name" not in o:
            raise InvalidArgument("each requested output needs a name")
        outputs.append(str(o["name"]))
        if _parameters(o.get("parameters"), f"output {o['name']}").get("binary_data"):
            binary_outputs.add(str(o["name"]))
    request = InferRequest(
        model=name,
        version=version,
        id=str(doc.get("id", "")),
        inputs=inputs,
        parameters=parameters,
        outputs=outputs,
    )
    return request, binary_all and not outputs, binary_outputs


def infer_answer(response: InferResponse, binary_all: bool, binary_outputs: set[str]) -> web.Response:
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for t in response.outputs:
        out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if binary_all or t.name in binary_outputs:
            raw = tensor_raw(t)
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif isinstance(t.data, list):
            out["data"] = [b.decode("utf-8", errors="replace") for b in t.data]
        else:
            out["data"] = t.data.reshape(-1).tolist()
        outputs.append(out)
    doc: dict[str, Any] = {
        "model_name": response.model,
        "model_version": response.version,
        "outputs": outputs,
    }
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    head = json.dumps(doc).encode()
    if not chunks:
        return web.Response(body=head, content_type="application/json")
    answer = web.Response(body=head + b"".join(chunks), content_type="application/octet-stream")
    answer.headers[HEADER_LENGTH] = str(len(head))
    return answer


class Routes:
    def __init__(self, v2: V2Engine) -> None:
        self.v2 = v2

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})

    async def model_ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.v2.model_ready(*_names(request)) else 400)

    async def model_metadata(self, request: web.Request) -> web.Response:
        model = self.v2.model(*_names(request))
        inputs, outputs = tensor_specs(model)
        return web.json_response(
            {
                "name": model.manifest.name,
                "versions": self.v2.versions(model.manifest.name),
                "platform": PLATFORM,
                "inputs": [{"name": s.name, "datatype": s.datatype, "shape": s.shape} for s in inputs],
                "outputs": [{"name": s.name, "datatype": s.datatype, "shape": s.shape} for s in outputs],
            }
        )

    async def model_config(self, request: web.Request) -> web.Response:
        config = model_config_pb(self.v2.model(*_names(request)))
        return web.json_response(json_format.MessageToDict(config, preserving_proto_field_name=True))

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _names(request)
        if request.headers.get("Content-Encoding"):
            raise InvalidArgument("compressed requests are not supported: send the body uncompressed")
        parsed, binary_all, binary_outputs = parse_infer(
            await request.read(), request.headers.get(HEADER_LENGTH), name, version
        )
        return infer_answer(await self.v2.infer(parsed), binary_all, binary_outputs)

    async def repository_index(self, request: web.Request) -> web.Response:
        caller = current_caller()
        return web.json_response(
            [
                {"name": m.manifest.name, "version": m.manifest.version, "state": "READY"}
                for m, _ in self.v2.engine.repository.all()
                if caller.may_use(m.manifest.name)
            ]
        )


def add_routes(app: web.Application, engine: Engine) -> None:
    """Add the `/v2` routes to `app`, over `engine` (sharing its sequences with the gRPC service)."""
    r = Routes(v2_for(engine))
    add = app.router
    add.add_get("/v2/health/live", _v2_errors(r.live))
    add.add_get("/v2/health/ready", _v2_errors(r.ready))
    add.add_get("/v2", _v2_errors(r.server_metadata))
    add.add_post("/v2/repository/index", _v2_errors(r.repository_index))
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        add.add_get(base, _v2_errors(r.model_metadata))
        add.add_get(base + "/ready", _v2_errors(r.model_ready))
        add.add_get(base + "/config", _v2_errors(r.model_config))
        add.add_post(base + "/infer", _v2_errors(r.infer))
