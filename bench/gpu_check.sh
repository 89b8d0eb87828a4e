#!/usr/bin/env bash
# The GPU check (issue 11): one run on a GPU host with PyTorch preinstalled and no network, bounded by its steps'
# limits to about 11 minutes (the run of 2026-11-27 07:51, with 2 workers where 8 are now, took 433 s; issue 24 added
# the nvImageCodec and MPS configurations):
#   1. the GPU tests (tests/gpu/test_gpu.py, and test_acceleration.py and test_workers.py on that host),
#   2. where a batch of 1920x1280 JPEGs spends its time on the device (bench/gpu_stages.py),
#   3. raw ViT-B/16 throughput, fp16 eager and graphs first (what the service's ratio needs), then the rest as the
#      budget allows, checked against fp32,
#   4. the service end to end over HTTP with real JPEGs (451x300 and 1920x1280) at several concurrencies: GPU decode
#      (torchvision's nvJPEG and nvImageCodec, issue 24) and CPU decode, 8 workers with and without CUDA MPS, 2 larger
#      workers, where the time goes, GPU-decode logits against CPU-decode ones, perf_analyzer (OIP),
#   5. one summary table, printed last and written to OUT/summary.md.
# Each step has its own time limit and the next one runs whatever happened; full logs are in OUT.
#
#   bench/gpu_bundle.sh          # here, first: fills .whl/ (wheels, perf_analyzer, photographs)
#   bench/gpu_check.sh [OUT]     # on the GPU host, with .whl/ carried along (default OUT: $OUT, else ./gpu-check)
#   QUICK=1 bench/gpu_check.sh   # at most 6 minutes: the service's target rows, GPU-decode numerics (both decode
#                                # backends), nvImageCodec at 8 workers with and without MPS, the GPU tests
set -uo pipefail
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >"$out/install.log" 2>&1 || { echo "wheel install failed"; cat "$out/install.log"; exit 1; }
export PYTHONPATH=$PWD:$PWD/clients/python:/tmp/site  # the server, its client package (clients/python), the wheels
cp .whl/grpc_proto/*_pb2*.py app/grpc/proto/ 2>/dev/null || echo "no generated gRPC modules in .whl (bench/gpu_bundle.sh)"
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

{ date -u; nvidia-smi; python3 -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)'
  python3 -c 'import nvidia.nvimgcodec as n; print("nvimgcodec", n.__version__)' 2>&1 | tail -1
  command -v nvidia-cuda-mps-control || echo "no nvidia-cuda-mps-control: the MPS rows run without MPS"; } \
  >"$out/env.log" 2>&1
if [[ -n ${QUICK:-} ]]; then  # a lease of a few minutes: the service's targets and numerics first, then the tests
  step gpu_serve 210 python3 bench/gpu_serve.py --out "$out" --duration 4 --warmup 1 --quick
  step gpu_raw 40 python3 bench/gpu_raw.py --out "$out" --budget-s 25 --dtypes fp16 --modes graphs
  step pytest 90 python3 -m pytest -q -p no:cacheprovider -o filterwarnings=default -o addopts= -s tests/gpu/test_gpu.py
else
  # test_acceleration's inductor test compiles C++ on the CPU (over 45 s on that host): it runs here, not there.
  step pytest 160 python3 -m pytest -q -p no:cacheprovider -o filterwarnings=default -o addopts= -s \
    tests/gpu/test_gpu.py tests/integration/test_acceleration.py tests/system/test_workers.py -k "not inductor"
  step gpu_stages 30 python3 bench/gpu_stages.py --out "$out"
  step gpu_raw 55 python3 bench/gpu_raw.py --out "$out" --budget-s 35
  step gpu_serve 400 python3 bench/gpu_serve.py --out "$out" --duration 5 --warmup 1.5 --perf-analyzer "$pa"
fi
python3 bench/gpu_report.py "$out" | tee "$out/summary.md"
