# headswap inference server image: CPU by default, CUDA with a build argument.
#   docker build -t headswap:0.1.0-cpu .
#   docker build --build-arg VARIANT=cuda -t headswap:0.1.0-cuda .
#   docker run --rm -p 8000:8000 --read-only --tmpfs /tmp --tmpfs /var/run/headswap/metrics \
#     --tmpfs /var/lib/headswap/state -v "$PWD/demo:/var/lib/headswap/checkpoints:ro" \
#     headswap:0.1.0-cpu --checkpoint /var/lib/headswap/checkpoints/demo.safetensors
# Runs as UID/GID 10001 with nothing writable but /tmp, PROMETHEUS_MULTIPROC_DIR and the state
# dir, which are volumes or tmpfs mounts (docs/deploy.md).
ARG VARIANT=cpu

# ---- runtime bases: OS, Python and tini; TORCH_INDEX_URL names the matching torch wheels ----
FROM python:3.11-slim-bookworm AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Unpinned Debian packages on purpose: a pinned version disappears from the mirror with the next
# security update and the build breaks.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

# The "base" flavour carries only the CUDA runtime core: the torch wheels bring their own
# cuBLAS/cuDNN, so the larger "runtime" flavour would ship them twice. The host's NVIDIA
# container toolkit provides the driver.
FROM nvidia/cuda:12.6.3-base-ubuntu24.04 AS base-cuda
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# `base-${VARIANT}` is one of the two stages above, not an image from a registry.
# checkov:skip=CKV_DOCKER_7:base-${VARIANT} names a build stage of this file (base-cpu or base-cuda), whose images are pinned above
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---- build: dependencies in their own layer, rebuilt only when pyproject.toml changes --------
FROM base AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv --upgrade-deps /opt/venv
WORKDIR /src
COPY pyproject.toml ./
# pyproject's dependencies, split: torch and torchvision from the variant's wheel index in one
# pip call (installed apart, pip may pair them wrongly), then the rest from PyPI.
RUN python -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; torch = lambda d: re.match(r'[A-Za-z0-9_.-]+', d).group().lower() in ('torch', 'torchvision'); open('/tmp/torch.txt', 'w').write('\n'.join(filter(torch, deps)) + '\n'); open('/tmp/rest.txt', 'w').write('\n'.join(d for d in deps if not torch(d)) + '\n')" \
 && pip install --index-url "$TORCH_INDEX_URL" -r /tmp/torch.txt \
 && pip install -r /tmp/rest.txt
# Then the code: editing models/ or service/ rebuilds only from here.
COPY README.md ./
COPY models/ models/
COPY service/ service/
RUN pip install --no-deps . \
 && python -m pip uninstall -y pip

# ---- final image: the runtime base plus the virtual environment, nothing else ----------------
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="headswap" \
      org.opencontainers.image.description="Inference server for fine-tuned torchvision image classifiers (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 headswap \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin headswap \
 && mkdir -p /var/run/headswap/metrics /var/lib/headswap/state /var/lib/headswap/checkpoints \
 && chown -R 10001:10001 /var/run/headswap /var/lib/headswap
COPY --from=build /opt/venv /opt/venv
ENV HEADSWAP_HOST=0.0.0.0 \
    HEADSWAP_PORT=8000 \
    HEADSWAP_CHECKPOINT_DIR=/var/lib/headswap/checkpoints \
    HEADSWAP_STATE_DIR=/var/lib/headswap/state \
    PROMETHEUS_MULTIPROC_DIR=/var/run/headswap/metrics \
    XDG_CACHE_HOME=/tmp/.cache
WORKDIR /var/lib/headswap
USER 10001:10001
# 8000: HTTP (always); 8081: gRPC, when serve is given --grpc-port 8081 (HEADSWAP_GRPC_PORT).
EXPOSE 8000 8081
# Liveness only (the process answers); readiness is GET /ready. slim images have no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HEADSWAP_PORT', '8000') + '/health', timeout=4)"]
# tini is PID 1: it forwards SIGTERM to the server (which drains, then exits 0) and reaps zombies.
ENTRYPOINT ["tini", "--", "headswap", "serve"]
