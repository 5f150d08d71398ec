# cg3d BIDS-App image: docker run --gpus all -v /data:/data:ro -v /out:/out cg3d/cg3d:0.1.0 /data /out group
#
# Stages: deps (venv + PyPI torch with its bundled CUDA runtime + dependencies) -> weights (encoder
# weights from the Hugging Face hub, sha256-checked) and build (the cg3d wheel) -> runtime (slim
# base, the venv and the weights copied in, the wheel installed, non-root, read-only-rootfs
# friendly, no network needed at run time).
# Usage, build arguments and the offline smoke build: docs/containers.md.
#
# BASE_IMAGE is pinned by digest. The digest below is the python:3.11-slim-bookworm manifest list
# published on Docker Hub (as recorded by a public project on 2026-08-24; it could not be checked
# from the registry-less CI machine). To move to a newer one:
#   docker buildx imagetools inspect python:3.11-slim-bookworm   (first "Digest:" line)
#   or: skopeo inspect --raw docker://python:3.11-slim-bookworm | sha256sum
# Any Debian-12-like base with python3 >= 3.10 and "python3 -m venv" works, e.g. the local one that
# scripts/make_debian_base.sh makes: --build-arg BASE_IMAGE=localhost/debian-python:12
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

# ------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS deps
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# "python3" is /usr/local/bin/python3 in the official image and /usr/bin/python3 on Debian.
ARG PYTHON=python3
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# Empty: torch/torchvision from PyPI (CUDA build, bundles the CUDA runtime, ~5.5 GB installed).
# https://download.pytorch.org/whl/cpu: CPU-only build (~1 GB), for CI images without a GPU.
ARG TORCH_INDEX=""
ARG BIDS_VALIDATOR_VERSION=3.0.2
# pip reads these from the environment; set them to use a local mirror or wheel folder of the
# build machine (scripts/container_smoke.sh does). Stage-local: they do not reach the runtime image.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PYTHONDONTWRITEBYTECODE=1
RUN "${PYTHON}" -m venv /opt/venv \
    && printf 'torch==%s\ntorchvision==%s\n' "${TORCH_VERSION}" "${TORCHVISION_VERSION}" > /opt/venv/cg3d-constraints.txt
ENV PATH="/opt/venv/bin:${PATH}"
# An optional CA bundle for pip (TLS-intercepting proxies): --secret id=pip_cert,src=/path/ca.pem
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && if [ -n "${TORCH_INDEX}" ]; then export PIP_INDEX_URL="${TORCH_INDEX}"; fi \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
# Dependencies only (a stub package with the real pyproject), so that source edits keep this layer.
COPY pyproject.toml /src/pyproject.toml
COPY cg3d_bids/__init__.py /src/cg3d_bids/__init__.py
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && touch /src/README.md \
    && pip install --no-cache-dir --constraint /opt/venv/cg3d-constraints.txt \
        "/src[skullstrip]" "bids-validator-deno==${BIDS_VALIDATOR_VERSION}" \
    && pip uninstall --yes cg3d-bids \
    && rm -rf /src

# ------------------------------------------------------------------------------------------------
FROM deps AS weights
# 1: download the ENCODER weights from the HF hub at build time (needs network now, never at run
# time); 0: no weights (offline smoke builds; run with --encoder test-tiny-vit or --weights FILE).
ARG BAKE_WEIGHTS=1
# One or more of dinov2_vits14 dinov2_vitb14 dinov2_vitl14 dinov2_vitg14 clip_vitl14 (space-separated).
ARG ENCODER=dinov2_vitl14
# Expected sha256 of model.safetensors (one per encoder, same order); the hub's LFS sha256 is always checked.
ARG WEIGHTS_SHA256=""
# Hub revision (branch, tag or commit) of the timm/<model> repositories.
ARG WEIGHTS_REVISION=main
# A Hugging Face hub mirror, if the build machine must use one (huggingface_hub reads HF_ENDPOINT).
ARG HF_ENDPOINT
COPY scripts/bake_weights.py /opt/cg3d/bake_weights.py
RUN python /opt/cg3d/bake_weights.py --dest /opt/cg3d/models --bake "${BAKE_WEIGHTS}" \
        --revision "${WEIGHTS_REVISION}" --sha256 "${WEIGHTS_SHA256}" --encoders "${ENCODER}" \
    && rm /opt/cg3d/bake_weights.py

# ------------------------------------------------------------------------------------------------
FROM deps AS build
# cg3d itself as a wheel: the runtime stage installs it on top of the unchanged deps venv, so a
# source change rebuilds (and a registry pull downloads) a small layer, not the 5 GB venv.
COPY . /src
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels /src \
    && rm -rf /src

# ------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG VERSION=0.1.0
ARG IMAGE_TAG=cg3d/cg3d:${VERSION}
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG ENCODER=dinov2_vitl14
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="cg3d" \
      org.opencontainers.image.description="Training-free zero-shot anomaly detection in 3D brain MRI (CoDeGraph3D) as a GPU BIDS-App" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="https://github.com/cg3d/cg3d" \
      org.opencontainers.image.url="https://github.com/cg3d/cg3d" \
      org.opencontainers.image.documentation="https://github.com/cg3d/cg3d/blob/main/docs/containers.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="cg3d developers" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      org.bids-apps.analysis-levels="participant group" \
      org.bids-apps.boutiques-descriptor="/opt/venv/bin/cg3d --bids-exec-spec" \
      org.cg3d.encoder="${ENCODER}" \
      org.cg3d.weights-manifest="/opt/cg3d/models/manifest.json"

COPY --from=deps /opt/venv /opt/venv
# A HOME that any uid may use when the root file system is writable, /tmp sticky and world
# writable, a /version file (BIDS-Apps convention). Nothing else is written at run time.
RUN useradd --uid 1000 --user-group --no-create-home --home-dir /home/cg3d --shell /bin/bash cg3d \
    && mkdir -p /home/cg3d/.cache /home/cg3d/.config \
    && chmod 1777 /home/cg3d /home/cg3d/.cache /home/cg3d/.config /tmp \
    && printf '%s\n' "${VERSION}" > /version
COPY --from=weights /opt/cg3d/models /opt/cg3d/models
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index --force-reinstall /wheels/cg3d_bids-*.whl \
    && /opt/venv/bin/pip freeze --exclude-editable > /opt/venv/cg3d-requirements.lock.txt \
    && /opt/venv/bin/cg3d --version \
    && /opt/venv/bin/python -c "import cg3d_bids.cli.run, torch; print('torch', torch.__version__)"

# Every cache points at /tmp (a tmpfs with docker --read-only --tmpfs /tmp; the host /tmp under
# Apptainer), so a read-only root file system and an arbitrary uid work. Weights are read from
# CG3D_WEIGHTS_DIR; the hub is never contacted (HF_HUB_OFFLINE).
ENV PATH="/opt/venv/bin:${PATH}" \
    HOME=/home/cg3d \
    USER=cg3d \
    LOGNAME=cg3d \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CG3D_WEIGHTS_DIR=/opt/cg3d/models \
    CG3D_CONTAINER_TYPE=docker \
    CG3D_IMAGE_TAG="${IMAGE_TAG}" \
    CG3D_VERSION="${VERSION}" \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HOME=/tmp/.cache/huggingface \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    MPLBACKEND=Agg \
    TORCH_HOME=/tmp/.cache/torch \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    NUMBA_CACHE_DIR=/tmp/.cache/numba \
    DENO_DIR=/tmp/.cache/deno \
    NIPYPE_CONFIG_DIR=/tmp/.nipype \
    NIPYPE_NO_ET=1 \
    NO_ET=1 \
    PYTORCH_NVML_BASED_CUDA_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["/opt/venv/bin/cg3d"]
