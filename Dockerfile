# syntax=docker/dockerfile:1
# UDG CTR images, one multi-stage file. Build one target at a time:
#   docker build --target serve-cpu -t udg-ctr:serve-cpu .   # FastAPI + onnxruntime (CPU) + OTLP traces, no torch
#   docker build --target serve-gpu -t udg-ctr:serve-gpu .   # the same on CUDA: onnxruntime-gpu
#   docker build --target trainer   -t udg-ctr:trainer .     # torch (CPU wheel): train -> export -> publish
#   docker build --target loadtest  -t udg-ctr:loadtest .    # locust + loadtest/locustfile.py
# docker-compose.yml wires them together; tests/deploy/test_containers.py validates this file (hadolint + structure).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------
# python-base: the slim interpreter, a non-root user and the environment every CPU stage shares.
FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    UDG_MODEL_REPO=/models \
    UDG_CACHE_DIR=/cache
RUN groupadd --system --gid 10001 udg \
    && useradd --system --uid 10001 --gid udg --create-home --home-dir /home/udg --shell /usr/sbin/nologin udg \
    && mkdir -p /models /cache \
    && chown udg:udg /models /cache
WORKDIR /home/udg

# ---------------------------------------------------------------------------------------------------------
# source: the project tree (what .dockerignore lets through), shared by the stages that install it.
FROM python-base AS source
WORKDIR /src
COPY pyproject.toml README.md udg_cli.py ./
COPY model ./model
COPY export ./export
COPY repository ./repository
COPY dataset ./dataset
COPY pipeline ./pipeline
COPY service ./service
COPY loadtest ./loadtest
COPY warmup ./warmup

# serve-build: the serving virtualenv, built apart so the runtime image holds no source tree or build cache.
# The otel extra (OpenTelemetry SDK + OTLP/HTTP exporter, no torch) is installed so that setting
# UDG_OTLP_ENDPOINT turns tracing on without another image; unset, nothing of it is imported.
FROM source AS serve-build
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir "/src[serve,otel]"

# ---------------------------------------------------------------------------------------------------------
# serve-cpu: `udg serve` on onnxruntime (CPU). No torch anywhere in this image.
FROM python-base AS serve-cpu
COPY --from=serve-build /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/udg/healthcheck.py
# The service listens on every interface inside the container; publish the port on the host as you see fit.
# Size workers x onnxruntime threads to the CPUs given to the container (see README "Containers").
ENV UDG_HOST=0.0.0.0 \
    UDG_PORT=8000 \
    UDG_WORKERS=1 \
    UDG_ORT_THREADS=1
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "/opt/udg/healthcheck.py"]
CMD ["udg", "serve"]

# ---------------------------------------------------------------------------------------------------------
# serve-gpu: the same service on a CUDA runtime. onnxruntime-gpu's PyPI wheels link CUDA 13 (1.31.1:
# libcublas.so.13, libcudart.so.13) and load cuDNN 9: the image must match, or the CUDA provider fails to
# load and the service falls back to CPU (it logs so).
# Run with `--gpus all` (compose: `deploy.resources.reservations.devices`). Ubuntu 24.04's python is 3.12.
FROM ${CUDA_IMAGE} AS serve-gpu
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    UDG_MODEL_REPO=/models
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 udg \
    && useradd --system --uid 10001 --gid udg --create-home --home-dir /home/udg --shell /usr/sbin/nologin udg \
    && mkdir -p /models \
    && chown udg:udg /models
COPY --from=source /src /src
WORKDIR /src
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir "/src[gpu,otel]" \
    && rm -rf /src/build /src/*.egg-info
COPY docker/healthcheck.py /opt/udg/healthcheck.py
WORKDIR /home/udg
ENV UDG_HOST=0.0.0.0 \
    UDG_PORT=8000 \
    UDG_WORKERS=1 \
    UDG_ORT_THREADS=1 \
    UDG_ORT_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=90s --retries=3 \
    CMD ["python", "/opt/udg/healthcheck.py"]
CMD ["udg", "serve"]

# ---------------------------------------------------------------------------------------------------------
# trainer: torch from the PyTorch CPU index (no multi-GB CUDA wheels), then the project with train + serve
# extras. One shot: docker/trainer.sh trains, exports MODEL_REPO/VERSION and publishes it to REDIS_URL.
FROM source AS trainer
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir "/src[train,serve]" \
    && rm -rf /src/build /src/*.egg-info
COPY docker/trainer.sh /usr/local/bin/udg-trainer
WORKDIR /home/udg
ENV UDG_MODEL_VERSION=v1 \
    UDG_WORK_DIR=/home/udg/runs
USER 10001:10001
ENTRYPOINT ["udg-trainer"]

# ---------------------------------------------------------------------------------------------------------
# loadtest: locust with the project's locustfile; it reads user ids and items from the mounted model repository.
FROM source AS loadtest-build
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir "/src[loadtest]"

FROM python-base AS loadtest
COPY --from=loadtest-build /opt/venv /opt/venv
COPY loadtest/locustfile.py /opt/udg/locustfile.py
USER 10001:10001
EXPOSE 8089
ENTRYPOINT ["locust", "-f", "/opt/udg/locustfile.py"]
