#!/usr/bin/env bash
# Uniform SparseGPT at 50% and 70%: our database's level (dense-model inputs, as the paper's database),
# the same re-solved by `evopress finalize` (inputs of the already-pruned model, as llm-compressor
# calibrates), and llm-compressor's SparseGPTModifier, on the same text.
#
#   bash benchmarks/sparsegpt.sh [OUT]    (inside the project's venv; llm-compressor in /work/venv-llmc, see
#                                          benchmarks/llmcompressor_recipe.py; default OUT runs/sparsegpt)
#
# Per sparsity S: a database with one level per layer (--center S --levels 0: exactly round(S x n) zeros
# in every layer), its uniform result, the finalized result; 8,192 tokens of $DATA (default wiki+ptb) in
# 256-token windows on our side, the same 32 windows for oneshot; held-out 4,096 tokens each of the
# Wikipedia evaluation split and PTB test (512-token windows). Numbers: $OUT/<S>/llmc/compare.json.
set -euo pipefail
OUT=${1:-runs/sparsegpt}
DATA=${DATA:-wiki+ptb}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
LLMC=${LLMC:-/work/venv-llmc/bin/python}
for S in ${SPARSITIES:-0.5 0.7}; do
    dir="$OUT/$S"
    mkdir -p "$dir"
    [ -f "$dir/db/manifest.json" ] || evopress build-db --space sparsity --center "$S" --levels 0 --data "$DATA" \
        --calib-tokens 8192 --seq-len 256 --out "$dir/db" --quiet
    [ -f "$dir/uniform/result.json" ] || evopress baseline --space sparsity --method uniform --target "$S" \
        --db "$dir/db" --data "$DATA" --seq-len 256 --calib-tokens 8192 --final-tokens 2048 --tokens 1024 \
        --out "$dir/uniform" --quiet
    [ -f "$dir/finalized/result.json" ] || evopress finalize "$dir/uniform" --calib-tokens 8192 \
        --out "$dir/finalized" --quiet
    "$LLMC" "$HERE/llmcompressor_sparsity.py" "$dir/uniform" "$dir/finalized" --out "$dir/llmc" --data "$DATA" \
        --calib-windows 32 --eval-windows 8
done
