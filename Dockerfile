# The pipeline's image: CUDA runtime, Python 3.11, the project and its pinned dependencies
# (constraints.txt), the flow's tools (prefect, dvc, mlflow, git) on PATH, run as a non-root
# user. The Kubernetes and Docker work pools of deploy/prefect-cluster.yaml run flow runs in
# it; their pull step clones the deployed commit, so the code baked in here is a fallback
# and the dependencies are what matter. Build from the repository root:
#   docker build -t REGISTRY/milora:$(git rev-parse --short HEAD) .
# Build arguments: TORCH_VERSION (as the Makefile's), TORCH_PIP_ARGS (e.g. --index-url of a
# PyTorch wheel index for another CUDA), EXTRA_PACKAGES (e.g. "dvc-s3 prefect-aws" for
# object storage: a DVC remote and Prefect results on S3).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_PIP_ARGS=""
ARG EXTRA_PACKAGES=""

# Nothing calls out: every tool's telemetry off, the model hub offline (milora/offline.py,
# the Makefile's exports). A run's environment (the pools' env job variable) can override.
ENV HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TRANSFORMERS_OFFLINE=1 \
    DO_NOT_TRACK=true \
    MLFLOW_DISABLE_TELEMETRY=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DVC_NO_ANALYTICS=1 \
    GX_ANALYTICS_ENABLED=false \
    TOKENIZERS_PARALLELISM=false \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && pip install --upgrade pip \
    && useradd --create-home --uid 1000 --shell /bin/bash milora

# torch first and by version, as the Makefile does (PyPI's build for Linux carries CUDA): a
# layer of its own, kept while the project's code changes.
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_PIP_ARGS}

WORKDIR /opt/milora
COPY . .
RUN pip install -c constraints.txt -e ".[pipeline,cluster]" ${EXTRA_PACKAGES} \
    && pip check \
    && chown -R milora:milora /opt/milora \
    && mkdir -p /home/milora/work && chown milora:milora /home/milora/work

USER milora
# Flow runs start here: the pull step clones the deployed commit into this folder.
WORKDIR /home/milora/work
CMD ["prefect", "version"]
