# The rnnserve trainer: trains a model and exports it into the model repository, as a one-shot job.
#
#   docker compose --profile train run --rm trainer          # see docker/train.sh and README "Deploy"
#   docker build -f docker/trainer.Dockerfile -t rnnserve-trainer .
#
# PyTorch is the CPU build, never PyPI's default Linux wheel (a CUDA build that pulls GBs of NVIDIA
# libraries): `torch==X+cpu` exists only on PyTorch's CPU index (TORCH_INDEX_URL) or as a wheel you put in
# docker/wheels/ (for builds that can't reach that index); if neither has it, the build fails rather
# than take the CUDA build.
FROM python:3.11-slim AS trainer
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV VIRTUAL_ENV=/opt/rnnserve PATH=/opt/rnnserve/bin:$PATH ORT_DISABLE_TELEMETRY=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv "$VIRTUAL_ENV"
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=bind,source=docker/wheels,target=/wheels \
    set -eu; index=""; \
    if ! ls /wheels/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1; then \
      index="--extra-index-url $TORCH_INDEX_URL"; \
    fi; \
    pip install --find-links /wheels $index "torch==$TORCH_VERSION+cpu" \
 && python -c "import torch; assert torch.version.cuda is None, torch.__version__"
# The `train` extra (its torch==X is satisfied by X+cpu) and ONNX Runtime, which export validates with.
COPY pyproject.toml docker/requirements.py /src/
RUN --mount=type=cache,target=/root/.cache/pip \
    python /src/requirements.py train serve-cpu > /src/requirements.txt \
 && pip install -r /src/requirements.txt \
 && python -c "import torch; assert torch.version.cuda is None, torch.__version__"
COPY README.md /src/
COPY rnnserve /src/rnnserve
COPY protos /src/protos
COPY server /src/server
COPY clients /src/clients
COPY training /src/training
COPY export /src/export
RUN --mount=type=cache,target=/root/.cache/pip pip install --no-deps /src && rm -rf /src
COPY docker/train.sh /usr/local/bin/rnnserve-train
RUN useradd --system --uid 10001 --user-group --create-home --shell /usr/sbin/nologin rnnserve \
 && mkdir /models && chown rnnserve:rnnserve /models
USER rnnserve
WORKDIR /home/rnnserve
ENV RNNSERVE_REPO=/models RNNSERVE_MODEL_NAME=py RNNSERVE_TRAIN_ARGS=""
ENTRYPOINT ["rnnserve-train"]
