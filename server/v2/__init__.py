"""The Open Inference Protocol (KServe V2) with Triton's extensions, over gRPC (grpc_service.py) and
HTTP/REST (rest.py), both mapped onto the engine by mapping.py (a request read and checked by
parsing.py, its tensors tensors.py's, a model's V2 metadata metadata.py's). See the README's "Open
Inference Protocol (KServe V2)" section for the tensors and parameters."""
