"""rnnserve.server: the gRPC server on ONNX Runtime. Never imports torch.

handlers (service.py) ──► engine (engine.py) ──► session store (sessions.py)
                                           └──► scheduler (scheduler.py) ──► runtime (runtime.py)
"""
