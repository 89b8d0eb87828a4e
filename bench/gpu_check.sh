#!/usr/bin/env bash
# The GPU check (issue 11), one run of about 6 minutes on a GPU host with PyTorch preinstalled and no network:
#   1. the GPU tests (tests/test_gpu.py, and tests/test_acceleration.py on that host's torch),
#   2. raw ViT-B/16 throughput: fp32/fp16/bf16 x eager/graphs/compiled x batch 1..256, checked against fp32,
#   3. the service end to end over HTTP with real JPEGs (451x300 and 1920x1280) at several concurrencies, GPU and CPU
#      decode, where the time goes, GPU-decode logits against CPU-decode ones, and perf_analyzer over OIP,
#   4. one summary table, printed last and written to OUT/summary.md.
# Each step has its own time limit and the next one runs whatever happened; full logs are in OUT.
#
#   bench/gpu_bundle.sh          # here, first: fills .whl/ (wheels, perf_analyzer, photographs)
#   bench/gpu_check.sh [OUT]     # on the GPU host, with .whl/ carried along (default OUT: $OUT, else ./gpu-check)
#   QUICK=1 bench/gpu_check.sh   # about 2.5 minutes: the service's target rows and GPU-decode numerics, the GPU tests
set -uo pipefail
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >"$out/install.log" 2>&1 || { echo "wheel install failed"; cat "$out/install.log"; exit 1; }
export PYTHONPATH=$PWD:/tmp/site
export VIT_TEST_PHOTOS=$PWD/.whl/photos
pa=/tmp/site/perf_analyzer/bin/perf_analyzer

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, say how it ended
  local name=$1 limit=$2 started=$SECONDS
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   $name: exit $rc after $((SECONDS - started)) s"
  tail -n 3 "$out/$name.log" | sed 's/^/   | /'
}

{ date -u; nvidia-smi; python3 -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)'; } \
  >"$out/env.log" 2>&1
if [[ -n ${QUICK:-} ]]; then  # a lease of a few minutes: the service's targets and numerics first, then the tests
  step gpu_serve 100 python3 bench/gpu_serve.py --out "$out" --duration 4 --warmup 1 --quick
  step pytest 60 python3 -m pytest -q -p no:cacheprovider -o filterwarnings=default -o addopts= -s tests/test_gpu.py
else
  step pytest 150 python3 -m pytest -q -p no:cacheprovider -o filterwarnings=default -o addopts= -s \
    tests/test_gpu.py tests/test_acceleration.py
  step gpu_raw 150 python3 bench/gpu_raw.py --out "$out" --budget-s 110
  step gpu_serve 260 python3 bench/gpu_serve.py --out "$out" --duration 6 --warmup 2 --perf-analyzer "$pa"
fi
python3 bench/gpu_report.py "$out" | tee "$out/summary.md"
