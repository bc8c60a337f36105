"""The baseline a user would write by hand: a grpcio server calling the PyTorch model per request.

One session at a time (a global lock around the model), state in a dict, no batching. It speaks the
same rnnserve.v1 protocol (CreateSession, CloseSession, Stream, Generate; greedy/temperature sampling
only), so the benchmark drives it with the same real client.

    python bench/naive_server.py --checkpoint runs/x/checkpoint.pt --port 50052
"""

from __future__ import annotations

import argparse
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import torch

from rnnserve.training.train import load_checkpoint
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc


class NaiveServicer(pb_grpc.RnnServeServicer):
    def __init__(self, checkpoint: str) -> None:
        self.model, self.tokenizer, _ = load_checkpoint(checkpoint)
        self.lock = threading.Lock()
        self.sessions: dict[str, dict[str, Any]] = {}

    def _step(self, session: dict[str, Any], ids: list[int]) -> torch.Tensor:
        with self.lock, torch.inference_mode():
            logits, session["state"] = self.model(torch.tensor([ids]), session["state"])
        session["position"] += len(ids)
        session["logits"] = logits[0, -1]
        return logits[0, -1]

    def CreateSession(self, request: pb.CreateSessionRequest, context: Any) -> pb.SessionInfo:
        sid = uuid.uuid4().hex
        self.sessions[sid] = {"state": self.model.init_state(1), "position": 0, "logits": None}
        return pb.SessionInfo(session_id=sid, model=request.model, version="1")

    def CloseSession(self, request: pb.CloseSessionRequest, context: Any) -> pb.CloseSessionResponse:
        return pb.CloseSessionResponse(position=self.sessions.pop(request.session_id)["position"])

    def Stream(
        self, request_iterator: Iterator[pb.StreamRequest], context: Any
    ) -> Iterator[pb.StreamResponse]:
        sid = ""
        for request in request_iterator:
            sid = request.session_id or sid
            session = self.sessions[sid]
            ids = (
                list(request.tokens.ids) or self.tokenizer.encode(request.text, add_special_tokens=False).ids
            )
            logprobs = torch.log_softmax(self._step(session, ids), -1)
            top = torch.topk(logprobs, request.top_k or 5)
            yield pb.StreamResponse(
                session_id=sid,
                position=session["position"],
                token_ids=ids,
                top=[pb.TokenCandidate(id=int(i), logprob=float(v)) for v, i in zip(*top, strict=True)],
            )

    def Generate(self, request: pb.GenerateRequest, context: Any) -> Iterator[pb.GenerateResponse]:
        session = self.sessions[request.session_id]
        generator = torch.Generator().manual_seed(request.sampling.seed)
        for n in range(request.max_tokens):
            logits = session["logits"] if session["logits"] is not None else self._step(session, [1])
            if request.sampling.temperature > 0:
                probs = torch.softmax(logits / request.sampling.temperature, -1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            else:
                token = int(logits.argmax())
            self._step(session, [token])
            last = n == request.max_tokens - 1
            yield pb.GenerateResponse(
                token_ids=[token],
                logprobs=[0.0],  # (not computed: the benchmark reads ids only)
                text_offsets=[0],  # no text
                position=session["position"],
                finish_reason=pb.FINISH_REASON_LENGTH if last else 0,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=256))
    pb_grpc.add_RnnServeServicer_to_server(NaiveServicer(args.checkpoint), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
