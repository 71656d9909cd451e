#!/usr/bin/env bash
# GPU check (not a test; CI has no GPU): short bf16 searches of the default model on CUDA, printing
# candidate-tokens/s, peak device memory and the bf16-vs-fp32 fitness of the same candidates.
# Needs the project installed with a CUDA torch (e.g. `make setup` on a GPU machine); no network.
#   bash benchmarks/gpu_check.sh [OUT] [--spaces drop,sparsity,quant]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-runs/gpu-check}
mkdir -p "$OUT"
HF_HUB_OFFLINE=1 PYTHONPATH=src "$PY" benchmarks/gpu_check.py --out "$OUT" "${@:2}" 2>&1 | tee "$OUT/gpu_check.log"
