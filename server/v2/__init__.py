"""The Open Inference Protocol (KServe V2) with Triton's extensions, over gRPC (grpc_service.py) and
HTTP/REST (rest.py), both mapped onto the engine by mapping.py. See the README's "Open Inference Protocol
(KServe V2)" section for the tensors and parameters."""
