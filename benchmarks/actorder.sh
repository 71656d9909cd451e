#!/usr/bin/env bash
# Why llm-compressor's GPTQ of a profile beat our database's levels: act-order, measured on both sides.
#
#   bash benchmarks/actorder.sh [OUT]     (inside the project's venv; llm-compressor in /work/venv-llmc,
#                                          see benchmarks/llmcompressor_recipe.py; default OUT runs/actorder)
#
# Same profile, same calibration text on both sides ($DATA, default the wiki+ptb mix; 8,192 tokens of it
# in 256-token windows: our database's pool and oneshot's 32 windows), group 64 asymmetric, dampening
# 0.01, default model. Four arms: our quant database (bits 2,3,4, 3-bit calibration inputs) built with
# act-order (the default) and with --no-act-order, each giving the uniform 3-bit profile (and, with
# SYMMETRIC=1, a third database built --symmetric); llm-compressor's oneshot of that profile's exported
# recipe with actorder static and null. Then `evopress finalize` of the act-order result (our levels
# re-solved on the inputs of the quantized model, as oneshot calibrates). Held-out: 4,096 tokens each of
# the Wikipedia evaluation split and PTB test, 512-token windows; compare.json and finalize/ hold the
# numbers.
set -euo pipefail
OUT=${1:-runs/actorder}
DATA=${DATA:-wiki+ptb}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
LLMC=${LLMC:-/work/venv-llmc/bin/python}
mkdir -p "$OUT"
COMMON=(--data "$DATA" --seq-len 256 --quiet)
ARMS=("act:" "plain:--no-act-order")
[ "${SYMMETRIC:-0}" = 1 ] && ARMS+=("sym:--symmetric")
RESULTS=()
for arm in "${ARMS[@]}"; do
    name=${arm%%:*}; flag=${arm#*:}
    [ -f "$OUT/db-$name/manifest.json" ] || evopress build-db --space quant --bits 2,3,4 $flag --calib-tokens 8192 \
        --out "$OUT/db-$name" "${COMMON[@]}"
    [ -f "$OUT/uniform-$name/result.json" ] || evopress baseline --space quant --method uniform --target 3 \
        --db "$OUT/db-$name" --calib-tokens 8192 --final-tokens 2048 --tokens 1024 --out "$OUT/uniform-$name" \
        "${COMMON[@]}"
    RESULTS+=("$OUT/uniform-$name")
done
[ -f "$OUT/uniform-act-finalized/result.json" ] || evopress finalize "$OUT/uniform-act" --calib-tokens 8192 \
    --out "$OUT/uniform-act-finalized" --quiet
evopress eval "${RESULTS[@]}" "$OUT/uniform-act-finalized" --eval-data wiki,ptb --eval-tokens 4096 \
    --eval-seq-len 512 --quiet
"$LLMC" "$HERE/llmcompressor_quant.py" "${RESULTS[@]}" "$OUT/uniform-act-finalized" --out "$OUT/llmc" \
    --data "$DATA" --calib-windows 32 --eval-windows 8 --actorder static,null
