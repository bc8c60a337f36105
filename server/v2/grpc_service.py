"""Triton's `inference.GRPCInferenceService` (the KServe V2 gRPC protocol plus ModelConfig and the
bidirectional ModelStreamInfer) over the engine, through mapping.V2Engine.

Errors are raised as `rnnserve.server.errors` exceptions and turned into statuses by the interceptor,
as for RnnServe; on ModelStreamInfer an error answers its request with `error_message` and the stream
goes on (as Triton does), so that one bad request does not end a client's stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from grpc import aio

from rnnserve.inference import grpc_service_pb2 as pb
from rnnserve.inference import grpc_service_pb2_grpc as pb_grpc
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

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

# The typed-contents field of each datatype in InferTensorContents.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class Unimplemented(ServingError):
    code = grpc.StatusCode.UNIMPLEMENTED


def unimplemented(method: str) -> Unimplemented:
    return Unimplemented(f"rnnserve does not implement {method} (see the README's KServe V2 section)")


def param_value(p: pb.InferParameter) -> ParamValue:
    which = p.WhichOneof("parameter_choice")
    if which is None:
        raise InvalidArgument("a request parameter has no value")
    value: ParamValue = getattr(p, which)
    return value


def request_of(request: pb.ModelInferRequest) -> InferRequest:
    """The protocol-neutral request: raw_input_contents (one per input, in order) or typed contents."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: give one per input, or none"
        )
    inputs: list[Tensor] = []
    for i, t in enumerate(request.inputs):
        shape = [int(d) for d in t.shape]
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"input {t.name}: shape {shape} has a negative dimension")
        if raw:
            inputs.append(tensor_from_raw(t.name, t.datatype, shape, raw[i]))
            continue
        field = CONTENTS_FIELD.get(t.datatype)
        if field is None:
            raise InvalidArgument(
                f"input {t.name}: datatype {t.datatype!r} has no typed contents; send it raw"
            )
        inputs.append(tensor_from_values(t.name, t.datatype, shape, list(getattr(t.contents, field))))
    return InferRequest(
        model=request.model_name,
        version=request.model_version,
        id=request.id,
        inputs=inputs,
        parameters={k: param_value(v) for k, v in request.parameters.items()},
        outputs=[o.name for o in request.outputs],
    )


def set_param(target: pb.InferParameter, value: ParamValue) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = value


def response_pb(response: InferResponse) -> pb.ModelInferResponse:
    """Outputs as raw_output_contents (as Triton answers)."""
    out = pb.ModelInferResponse(model_name=response.model, model_version=response.version, id=response.id)
    for t in response.outputs:
        out.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        out.raw_output_contents.append(tensor_raw(t))
    for k, v in response.parameters.items():
        set_param(out.parameters[k], v)
    return out


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The V2 handlers; what they do not implement answers UNIMPLEMENTED (the generated base class)."""

    def __init__(self, engine: Engine, v2: V2Engine | None = None) -> None:
        self.v2 = v2 or v2_for(engine)
        self.ready = True  # set False by the server while it drains

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.ready and self.v2.model_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model = self.v2.model(request.name, request.version)
        inputs, outputs = tensor_specs(model)
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.manifest.name,
            versions=self.v2.versions(model.manifest.name),
            platform=PLATFORM,
            inputs=[tm(name=s.name, datatype=s.datatype, shape=s.shape) for s in inputs],
            outputs=[tm(name=s.name, datatype=s.datatype, shape=s.shape) for s in outputs],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=model_config_pb(self.v2.model(request.name, request.version)))

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return response_pb(await self.v2.infer(request_of(request)))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Requests are answered in order, one at a time (a sequence's requests depend on each other).
        async for request in request_iterator:
            try:
                async for response in self.v2.stream(request_of(request)):
                    yield pb.ModelStreamInferResponse(infer_response=response_pb(response))
            except ServingError as e:
                yield pb.ModelStreamInferResponse(
                    error_message=str(e),
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name, model_version=request.model_version, id=request.id
                    ),
                )

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        caller = current_caller()
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                index(name=m.manifest.name, version=m.manifest.version, state="READY")
                for m, _ in self.v2.engine.repository.all()
                if caller.may_use(m.manifest.name)
            ]
        )

    # -- Triton's extensions rnnserve does not serve: UNIMPLEMENTED, saying so ----------------------

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        raise unimplemented("ModelStatistics")

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        raise unimplemented("RepositoryModelLoad")

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        raise unimplemented("RepositoryModelUnload")

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: aio.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        raise unimplemented("SystemSharedMemoryStatus")

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: aio.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        raise unimplemented("SystemSharedMemoryRegister")

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        raise unimplemented("SystemSharedMemoryUnregister")

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: aio.ServicerContext
    ) -> pb.CudaSharedMemoryStatusResponse:
        raise unimplemented("CudaSharedMemoryStatus")

    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: aio.ServicerContext
    ) -> pb.CudaSharedMemoryRegisterResponse:
        raise unimplemented("CudaSharedMemoryRegister")

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: aio.ServicerContext
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        raise unimplemented("CudaSharedMemoryUnregister")

    async def TraceSetting(
        self, request: pb.TraceSettingRequest, context: aio.ServicerContext
    ) -> pb.TraceSettingResponse:
        raise unimplemented("TraceSetting")

    async def LogSettings(
        self, request: pb.LogSettingsRequest, context: aio.ServicerContext
    ) -> pb.LogSettingsResponse:
        raise unimplemented("LogSettings")
