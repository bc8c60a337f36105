"""The Open Inference Protocol's work is refused while the server drains for shutdown, as rnnserve.v1's
is (UNAVAILABLE, "server is shutting down"), while its readiness turns false. The drain is begun
directly on the server's call tracker (what SIGTERM does first), so the test needs no held call."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from rnnserve.inference import grpc_service_pb2 as v2
from rnnserve.inference import grpc_service_pb2_grpc as v2_grpc
from rnnserve.server.app import background_server
from rnnserve.server.config import ServerConfig
from rnnserve.server.errors import SHUTTING_DOWN


def test_v2_inference_is_refused_while_draining(lm_repo: Path) -> None:
    with background_server(ServerConfig(repo=lm_repo, port=0)) as server:
        assert server.loop is not None
        request = v2.ModelInferRequest(model_name="tiny")
        request.inputs.add(name="INPUT_IDS", datatype="INT64", shape=[1, 1])
        request.raw_input_contents.append(np.array([[3]], dtype=np.int64).tobytes())
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ModelInfer(request, timeout=60).outputs  # served before the drain

            async def drain() -> None:
                server.calls.begin_drain()
                server.v2_servicer.ready = False  # what RnnServeServer._stop does with it

            asyncio.run_coroutine_threadsafe(drain(), server.loop).result(30)
            try:
                with pytest.raises(grpc.RpcError) as info:
                    stub.ModelInfer(request, timeout=60)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert SHUTTING_DOWN in (info.value.details() or "")
                assert not stub.ServerReady(v2.ServerReadyRequest(), timeout=30).ready
            finally:
                server.calls.draining = False
