# The rnnserve server image: ONNX Runtime, gRPC and tokenizers; no PyTorch. Runs as a non-root user and
# serves the model repository mounted (read-only) at /models.
#
#   docker build -t rnnserve-server .                               # CPU: python:3.11-slim + onnxruntime
#   docker build -t rnnserve-server:gpu --build-arg VARIANT=gpu .   # GPU: CUDA 13 + cuDNN 9 + onnxruntime-gpu
#   docker run -p 50051:50051 -p 9464:9464 -v "$PWD/model_repo:/models:ro" rnnserve-server
#
# Configuration is by environment variables that mirror the `rnnserve serve` flags (RNNSERVE_PORT,
# RNNSERVE_MAX_BATCH, RNNSERVE_DEVICE, ...; see `rnnserve serve --help`). The health check asks the gRPC
# health service (`rnnserve health`). Build with BuildKit (`docker compose build`, or `docker build` on
# Docker 23+): the pip cache mounts keep rebuilds fast, and the dependency layer is reused until
# pyproject.toml changes.
ARG VARIANT=cpu
# ONNX Runtime 1.31's GPU build wants CUDA 13 and cuDNN 9.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# -- the two bases: a Python 3 that can make a venv, and which extra of pyproject.toml to install --------
FROM python:3.11-slim AS base-cpu
ENV RNNSERVE_EXTRA=serve-cpu RNNSERVE_DEVICE=cpu

FROM ${CUDA_IMAGE} AS base-gpu
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && ln -sf /usr/bin/python3 /usr/local/bin/python
# `serve` takes onnxruntime-gpu on Linux x86_64; `auto` uses CUDA when a session really runs on it.
ENV RNNSERVE_EXTRA=serve RNNSERVE_DEVICE=auto

FROM base-${VARIANT} AS base
# ORT_DISABLE_TELEMETRY: ONNX Runtime's own usage telemetry (on by default since 1.29) stays off in here.
ENV VIRTUAL_ENV=/opt/rnnserve PATH=/opt/rnnserve/bin:$PATH ORT_DISABLE_TELEMETRY=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# -- build: dependencies first (a layer reused until pyproject.toml changes), then the package ----------
FROM base AS build
RUN python -m venv "$VIRTUAL_ENV"
COPY pyproject.toml docker/requirements.py /src/
RUN --mount=type=cache,target=/root/.cache/pip \
    python /src/requirements.py "$RNNSERVE_EXTRA" > /src/requirements.txt \
 && pip install -r /src/requirements.txt
COPY README.md /src/
COPY rnnserve /src/rnnserve
COPY protos /src/protos
COPY server /src/server
COPY clients /src/clients
COPY training /src/training
COPY export /src/export
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps /src \
 && python -c "import rnnserve.server.app, sys; assert 'torch' not in sys.modules" \
 && python -m pip uninstall -q -y pip

# -- the image --------------------------------------------------------------------------------------------
FROM base AS server
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin rnnserve \
 && mkdir /models && chown rnnserve:rnnserve /models
COPY --from=build /opt/rnnserve /opt/rnnserve
USER rnnserve
ENV RNNSERVE_REPO=/models RNNSERVE_HOST=0.0.0.0 RNNSERVE_PORT=50051 RNNSERVE_METRICS_PORT=9464 \
    RNNSERVE_GRACE=20
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["rnnserve", "health"]
# SIGTERM drains: NOT_SERVING, new work refused, calls in flight finish within RNNSERVE_GRACE seconds.
STOPSIGNAL SIGTERM
CMD ["rnnserve", "serve"]
