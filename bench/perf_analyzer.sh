#!/usr/bin/env bash
# Run NVIDIA's perf_analyzer (the Open Inference Protocol load tool) against a running vit-serve:
# FP32 tensors of zeros through MODEL_pixels, then real JPEGs through MODEL's IMAGE input, at several concurrencies.
#
#   bench/perf_analyzer.sh [HOST:PORT] [MODEL] [CONCURRENCY_RANGE]     (defaults: 127.0.0.1:8000 vit_b_16 1:16:3)
#
# perf_analyzer is taken from $PERF_ANALYZER, else from PATH (pip install perf-analyzer==2.60.0, on a system with
# glibc 2.38+), else bench/perf_analyzer_debian12.sh runs PyPI's binary on Debian 12 (glibc 2.36). Extra perf_analyzer
# options go in $PA_ARGS (e.g. PA_ARGS="-b 4"), the measurement window in $PA_INTERVAL_MS (default 3000); JPEGs for the
# IMAGE input in $PA_IMAGES (default: a real photograph). PA_PROTOCOL=grpc measures the gRPC service instead of REST
# (then HOST:PORT is the gRPC port, 8001 by default).
set -euo pipefail
url=${1:-127.0.0.1:8000}
model=${2:-vit_b_16}
range=${3:-1:16:3}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}

if [[ -n ${PERF_ANALYZER:-} ]]; then pa=$PERF_ANALYZER
elif command -v perf_analyzer >/dev/null; then pa=perf_analyzer
else pa=$here/perf_analyzer_debian12.sh
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# shellcheck disable=SC2086  # PA_IMAGES is a list of paths
"$python" "$here/perf_analyzer_input.py" "$work/jpeg.json" ${PA_IMAGES:-}

# shellcheck disable=SC2206  # PA_ARGS is a list of options
common=(-u "$url" -i "${PA_PROTOCOL:-http}" --concurrency-range "$range" --measurement-interval "${PA_INTERVAL_MS:-3000}" ${PA_ARGS:-})
# Zeros, not perf_analyzer's random data: that is random bytes, NaN and infinity among them, which the server refuses
# (400 invalid_tensor); a forward costs the same whatever the values.
echo "== perf_analyzer: $model""_pixels, FP32 [N, 3, H, W] tensors of zeros"
"$pa" -m "${model}_pixels" --input-data zero "${common[@]}"
echo "== perf_analyzer: $model, real JPEGs as IMAGE (BYTES, binary)"
"$pa" -m "$model" --input-data "$work/jpeg.json" "${common[@]}"
