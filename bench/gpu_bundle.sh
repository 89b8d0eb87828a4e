#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what bench/gpu_check.sh needs on a GPU host that has no network: the service's
# pure-Python and cp312 wheels (../shared/device/fetch-wheels.sh), perf_analyzer's wheel, the generated gRPC modules,
# and scikit-image's photographs as PNGs (the host has no scikit-image). Run from the project root, on this machine,
# after `make test` or `pip install -e .` (which generate the gRPC modules).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
fetch=${FETCH_WHEELS:-../shared/device/fetch-wheels.sh}
"$fetch" httptools uvloop pytest-asyncio pytest-timeout safetensors \
  grpcio grpcio-health-checking grpcio-reflection "protobuf>=7.35.1,<8" >/dev/null
# The gRPC modules generated from app/grpc/proto at install (setup.py; git-ignored, so not carried with the tree):
# gpu_check.sh puts them back, as the host runs the tree without installing it.
mkdir -p .whl/grpc_proto && cp app/grpc/proto/*_pb2*.py .whl/grpc_proto/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_38_x86_64 perf-analyzer==2.60.0 -d .whl
# decode_backend nvimagecodec (the `nvimagecodec` extra): nvImageCodec and the nvJPEG library it loads (CUDA 13.0's,
# as PyTorch's), about 25 MB and 4 MB
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 nvidia-nvimgcodec-cu13==0.9.0.20 \
  "nvidia-nvjpeg==13.0.*" -d .whl
PYTHONPATH=$root "${PYTHON:-.venv/bin/python}" -c 'import pathlib, tests.support.photos as p; p.export(pathlib.Path(".whl/photos"))'
du -sh .whl
