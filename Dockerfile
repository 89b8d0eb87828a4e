# syntax=docker/dockerfile:1
# vit-serve: a CUDA-enabled PyTorch runtime that serves on the GPU when the NVIDIA container toolkit gives it one
# (docker run --gpus all), and on the CPU otherwise. Stages:
#   deps    the virtual environment with torch and every other dependency (GBs; rebuilt only when the pins change)
#   build   the project's wheel
#   weights pretrained weights fetched at build time (BAKE_WEIGHTS), so start-up needs no network
#   runtime what runs: deps + weights + the wheel + models/, as a non-root user
ARG PYTHON_VERSION=3.11
ARG DEBIAN_RELEASE=bookworm

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS deps
# PyPI's torch for Linux x86_64 is a CUDA build that brings its CUDA libraries as wheels: no CUDA base image needed.
# For a small CPU-only image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://pypi.org/simple
# Optional extras, comma-separated: --build-arg EXTRAS=hf,timm (Hugging Face Transformers and timm models),
# EXTRAS=openvino or EXTRAS=onnx (the OpenVINO and ONNX Runtime backends, docs/guides/backends.md).
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
# Only the dependencies, read from pyproject.toml, so that this layer survives every change to the source.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e for e in os.environ['EXTRAS'].split(',') if e]; \
print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

FROM deps AS build
# setup.py generates the gRPC modules from app/grpc/proto/*.proto while the wheel builds (grpcio-tools, fetched by
# pip as a build requirement: the runtime image does not carry it)
COPY README.md setup.py ./
COPY app ./app
# The client package (vit-serve-client, clients/python), which the vit-serve wheel includes.
COPY clients/python/vit_serve_client ./clients/python/vit_serve_client
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip install --no-deps /wheels/*.whl

FROM build AS weights
# Space-separated model names whose pretrained weights go into the image; empty for none (then mount them, or
# give the container network at start-up).
ARG BAKE_WEIGHTS=vit_b_16
COPY models ./models
RUN mkdir -p /weights \
 && if [ -n "$BAKE_WEIGHTS" ]; then \
        vit-serve download --model-repository models --weights-cache-dir /weights $BAKE_WEIGHTS; \
    fi

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS runtime
ARG UID=10001
RUN groupadd --system --gid "$UID" vit \
 && useradd --system --uid "$UID" --gid vit --home-dir /home/vit --create-home --shell /usr/sbin/nologin vit
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIT_HOST=0.0.0.0 \
    VIT_PORT=8000 \
    VIT_GRPC_PORT=8001 \
    VIT_MODEL_REPOSITORY=/opt/vit-serve/models \
    VIT_WEIGHTS_CACHE_DIR=/opt/vit-serve/weights \
    VIT_LOG_FORMAT=json
WORKDIR /opt/vit-serve
# Largest and most stable first: dependencies, then weights, then the project, then the model configs.
COPY --from=deps /opt/venv /opt/venv
# Owned by the service's user: weights not baked in are downloaded here at start-up (root's would refuse them).
COPY --from=weights --chown=${UID}:${UID} /weights /opt/vit-serve/weights
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-deps /wheels/*.whl
COPY models /opt/vit-serve/models
USER ${UID}:${UID}
# HTTP (the native API, the Open Inference Protocol over REST, probes, metrics) and the protocol's gRPC service.
EXPOSE 8000 8001
# Liveness through the service's own /healthz, with the Python the image already has (no curl in slim images).
# The start period covers loading the model: the port opens once it is loaded (readiness, /readyz, follows when the
# warm-up is done).
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('VIT_PORT', '8000')}/healthz\", timeout=4)"]
# Exec form: vit-serve is PID 1 and gets SIGTERM itself, stops accepting, drains for VIT_DRAIN_TIMEOUT_S and exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["vit-serve"]
CMD ["serve"]
