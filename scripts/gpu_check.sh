#!/usr/bin/env bash
# One short, prepared check for a CUDA machine with PyTorch and nvcc but no internet.
#
#   scripts/gpu_check.sh [SDIST_DIR [REPORT.md]]
#
# SDIST_DIR (optional) holds mamba-ssm / causal-conv1d source distributions fetched beforehand
# (pip download --no-deps --no-binary :all: --no-build-isolation mamba-ssm causal-conv1d); their CUDA ops
# are built for the local GPU only (scripts/build_cuda_ops.py, a few minutes, cut off after
# BUILD_TIMEOUT seconds) and put on PYTHONPATH. Then scripts/gpu_check.py compares and times the torch
# and kernel paths and prints a markdown report (also written to REPORT.md when given).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${1:-}" ]; then
  ops=/tmp/ssl_med_cuda_ops
  timeout "${BUILD_TIMEOUT:-480}" python3 scripts/build_cuda_ops.py --src "$1" --out "$ops" \
    || echo "build_cuda_ops did not finish (exit $?): checking the torch path only"
  export PYTHONPATH="$ops${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 scripts/gpu_check.py ${2:+--out "$2"} ${GPU_CHECK_ARGS:-}
