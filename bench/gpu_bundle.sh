#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what bench/gpu_check.sh needs on a GPU host that has no network: the service's
# pure-Python and cp312 wheels (../shared/device/fetch-wheels.sh), perf_analyzer's wheel, and scikit-image's
# photographs as PNGs (the host has no scikit-image). Run from the project root, on this machine.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
fetch=${FETCH_WHEELS:-../shared/device/fetch-wheels.sh}
"$fetch" httptools uvloop pytest-asyncio pytest-timeout safetensors >/dev/null
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_38_x86_64 perf-analyzer==2.60.0 -d .whl
PYTHONPATH=$root "${PYTHON:-.venv/bin/python}" -c 'import pathlib, tests.support.photos as p; p.export(pathlib.Path(".whl/photos"))'
du -sh .whl
