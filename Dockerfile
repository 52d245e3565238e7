# syntax=docker/dockerfile:1
# The FastAPI service on a GPU. The weights are not in the image: mount them at /app/weights.
#
#   docker build -t bespoke-punks .
#   docker run --gpus all -p 8000:8000 -v "$PWD/weights:/app/weights:ro" bespoke-punks
#
# /app/weights must hold what weights/README.md lists (SD1.5 + bespoke_punks.safetensors); without them the
# engine fails to load and the log names the missing files (PUNKS_ALLOW_SMOKE_MODEL=false below): the process stays
# up answering 503 on /readyz and /healthz, so the HEALTHCHECK below marks the container unhealthy.
# Any PUNKS_* setting can be passed with -e, e.g. -e PUNKS_LORA_SCALE=0.8. The server does not download weights;
# to fill a writable mount from PUNKS_WEIGHTS_URLS, run `python -m service.weights.fetch` in it first
# (weights/README.md).
#
# torch==2.13.0 (requirements/gpu.txt, generated from pyproject.toml by `make lock`) ships its own CUDA 13.0
# libraries as wheels, so the CUDA "base" flavour is enough (the "runtime" flavour would add a second copy of
# cuBLAS/cuDNN, ~2 GB). gcc and the Python headers are for PUNKS_COMPILE=true: Triton compiles a small C launcher
# per kernel at run time.
# Host: an NVIDIA driver >= 580 (CUDA 13.0) and the NVIDIA container toolkit.
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev gcc libc6-dev \
       ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv

WORKDIR /app
# Pinned dependencies first: this layer is reused as long as requirements/gpu.txt does not change.
COPY requirements/gpu.txt requirements/
RUN pip install -r requirements/gpu.txt

# Then the package itself (for the `punks` console script), without dependencies: they are all pinned above.
# Only service/ is copied: devtools/, tests/ and bench/ are development-only (Dockerfile.dockerignore too).
# setuptools comes from requirements/gpu.txt (torch needs it on Python 3.12), so nothing is resolved here.
COPY pyproject.toml ./
COPY service/ service/
RUN pip install --no-deps --no-build-isolation . && rm -rf build *.egg-info

# Non-root. It may write only the weights mount point and .cache (e.g. PUNKS_COMPILE_CACHE_DIR's default).
RUN useradd --system --uid 10001 --home-dir /home/punks --create-home punks \
    && mkdir -p /app/weights /app/.cache && chown punks /app/weights /app/.cache
USER punks

ENV PUNKS_WEIGHTS_DIR=/app/weights \
    PUNKS_ALLOW_SMOKE_MODEL=false \
    HF_HUB_OFFLINE=1

EXPOSE 8000
# Loading SD1.5 and fusing the LoRA takes a while on a cold start: the start period covers it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["python", "-m", "service", "serve", "--host", "0.0.0.0", "--port", "8000"]
