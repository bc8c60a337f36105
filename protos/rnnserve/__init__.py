"""rnnserve: train, export and serve recurrent sequence models with stateful gRPC sessions.

The repository keeps one top-level folder per concern; installed, they form one namespace:

    rnnserve.training   training/   models, tokenizers, data, the training loop (needs torch)
    rnnserve.export     export/     ONNX export, manifest, validation, bundles (needs torch + onnx)
    rnnserve.server     server/     gRPC service, sessions, scheduler, ONNX Runtime (never torch)
    rnnserve.client     clients/    Python client library and the `rnnserve` CLI
    rnnserve.v1         protos/rnnserve/v1/   the public gRPC API and its generated code
"""

__version__ = "0.1.0"
