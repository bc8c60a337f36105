"""The floor under any Python gRPC server: an rnnserve.v1 server that answers without a model.

It speaks just enough of the protocol (CreateSession, CloseSession, Stream) for the benchmark to drive
it with the same real client as rnnserve, on the same grpc.aio stack, and answers each Stream message
with a reply shaped like rnnserve's (position, the token ids, one candidate). The round trip it
measures is what one streamed token costs before any model, scheduler or session work.

    python bench/grpc_echo.py --port 50053
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import AsyncIterator

from grpc import aio

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc


class EchoServicer(pb_grpc.RnnServeServicer):
    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: aio.ServicerContext
    ) -> pb.SessionInfo:
        return pb.SessionInfo(session_id=uuid.uuid4().hex, model=request.model, version="1")

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: aio.ServicerContext
    ) -> pb.CloseSessionResponse:
        return pb.CloseSessionResponse()

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        position = 0
        async for request in request_iterator:
            ids = list(request.tokens.ids)
            position += len(ids)
            yield pb.StreamResponse(
                session_id=request.session_id,
                position=position,
                token_ids=ids,
                top=[pb.TokenCandidate(id=ids[-1] if ids else 0, text="a", logprob=-1.0)],
            )


async def serve(port: int) -> None:
    server = aio.server()
    pb_grpc.add_RnnServeServicer_to_server(EchoServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
