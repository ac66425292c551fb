# syntax=docker/dockerfile:1
# loftq-service GPU worker image: Celery worker running the LoftQ engine on CUDA.
#
# Build from the repository root (the build context must be the repo root):
#   docker build -f deploy/worker.Dockerfile -t loftq-service-worker .
# Another CUDA / torch combination (the torch wheel bundles its own CUDA libraries; the base
# image's CUDA version only has to be one the host driver supports):
#   docker build -f deploy/worker.Dockerfile \
#     --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#     --build-arg TORCH_VERSION=2.7.1 -t loftq-service-worker .
#
# ONE GPU PER CONTAINER. The worker runs one Celery process with --concurrency=1: one job at a
# time on one device. For N GPUs run N containers (pods), each given one GPU (Kubernetes:
# nvidia.com/gpu: 1; Docker: a device reservation with one device id, or
# CUDA_VISIBLE_DEVICES=<i>). Never raise --concurrency to share a GPU.
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
ARG TORCH_VERSION=2.6.0

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 22.04 ships python3.11 (universe); the project lives in a venv built from it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && pip install --upgrade pip

# torch from the CUDA wheel index, in its own layer (the largest one; reused across code changes).
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The project with the service and bitsandbytes extras; torch is already satisfied.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY loftq ./loftq
COPY service ./service
COPY api ./api
COPY worker ./worker
RUN pip install ".[service,bnb]" \
    && cd / && rm -rf /src

# Non-root user; scratch space (LOFTQ_WORK_DIR) and the Hugging Face cache are owned by it, so a
# named volume mounted there starts out writable.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/loftq loftq \
    && mkdir -p /var/lib/loftq/work /var/lib/loftq/hf-cache /app \
    && chown -R 10001:10001 /var/lib/loftq /app
# MALLOC_ARENA_MAX: two malloc arenas, so that a CPU worker's per-job memory limit (address
# space, worker/limits.py) is not spent on arenas reserved per core.
ENV LOFTQ_WORK_DIR=/var/lib/loftq/work \
    HF_HOME=/var/lib/loftq/hf-cache \
    MALLOC_ARENA_MAX=2
WORKDIR /app
USER 10001:10001

# --concurrency=1 with the prefork pool: one job per container, one container per GPU.
# The queue after -Q must equal LOFTQ_QUEUE (default "loftq").
CMD ["celery", "-A", "worker.celery_app:celery_app", "worker", "--loglevel=INFO", "--concurrency=1", "--pool=prefork", "-Q", "loftq"]
