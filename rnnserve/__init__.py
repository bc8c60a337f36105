"""rnnserve: train, export and serve recurrent sequence models with stateful gRPC sessions.

The repository keeps one top-level folder per concern; installed, they form one namespace:

    rnnserve            rnnserve/   this package: the `rnnserve` command (cli.py, __main__.py), the cell
                                    registry (cells.py) and `rnnserve demo` (demo.py)
    rnnserve.training   training/   models, tokenizers, data, the training skeleton and its tasks (torch)
    rnnserve.export     export/     ONNX export, manifest, validation, bundles (needs torch + onnx)
    rnnserve.server     server/     gRPC service, sessions, scheduler, ONNX Runtime (never torch)
    rnnserve.client     clients/    the Python client library and the client commands of the CLI
    rnnserve.v1         protos/rnnserve/v1/         the public gRPC API and its generated code
    rnnserve.inference  protos/rnnserve/inference/  Triton's KServe V2 protocol (vendored, generated)

`rnnserve/cli.py` is where every role's subcommands are registered; the client package never imports
the training, export or server roles.
"""

__version__ = "0.1.0"
