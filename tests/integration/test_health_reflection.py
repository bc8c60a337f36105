"""Standard gRPC health checking and server reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def test_health_reports_serving(server_url: str) -> None:
    with grpc.insecure_channel(server_url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rnnserve.v1.RnnServe"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(server_url: str) -> None:
    with grpc.insecure_channel(server_url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=30))
        names = {s.name for s in response.list_services_response.service}
        assert {"rnnserve.v1.RnnServe", "grpc.health.v1.Health"} <= names
