#!/usr/bin/env bash
# The first run of lrs on a CUDA machine, in a few minutes: GPU tests, kernel benchmark against PEFT, and
# extract-subspace / init / merge / extract-lora on CUDA against CPU. One JSON report; exit 1 without CUDA.
#   bash benchmarks/gpu_check.sh [gpu-check.json]      (extra arguments go to benchmarks/gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
report="${1:-gpu-check.json}"
shift || true
export PYTHONUNBUFFERED=1
exec "$(command -v python || command -v python3)" benchmarks/gpu_check.py --report "$report" "$@"
