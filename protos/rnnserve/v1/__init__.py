"""The rnnserve v1 gRPC API: `rnnserve.proto` and the Python code generated from it."""
