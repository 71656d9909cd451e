#!/usr/bin/env bash
# Quantization quality benchmark on the embedded default model (SmolLM2-135M, CPU): EvoPress vs the DP
# baseline (per-layer errors, exact budget), uniform GPTQ and best-of-16 random at 3.0 and 2.5 average
# bits per weight (weight bits only, as the paper; add --count-overhead to COMMON for true bits),
# held-out Wikipedia/PTB perplexity and KL, and a report with the bits-per-layer heatmaps.
# About 60 minutes on 2 shared CPU cores (database 8 min, each search 13 min, baselines and evaluation 25).
#
#   bash benchmarks/quant_quality.sh [OUT]          (inside the project's venv)
#   DATA=wiki+ptb TARGETS=3 bash benchmarks/quant_quality.sh runs/quant-mix   (calibrate on a text mix)
#
# The reference is the dequantized Q4_1 GGUF (its weights sit on a 4-bit grid, 32-weight blocks); the
# database uses group-64 asymmetric grids (64 divides 576 and 1536; 128 does not) and 2-3 bit targets.
# Paper schedule for quantization: --generations 150 --offspring 128 --stages 16:2048,4:16384,1:131072
# with a 524,288-token pool at 8k context; this script scales it to CPU (see docs/quant.md).
set -euo pipefail
OUT=${1:-runs/quant}
GENERATIONS=${GENERATIONS:-20}
# One intra-op thread: on a shared 2-core CPU, two threads ran the forward 1.6x slower (barrier waits).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA=${DATA:-wiki}
COMMON=(--space quant --db "$OUT/db" --data "$DATA" --calib-tokens 32768 --seq-len 256 --final-tokens 4096 --seed 0 --quiet)

if [ ! -f "$OUT/db/manifest.json" ]; then
    evopress build-db --space quant --bits 2,3,4,5,6,8 --calib-tokens 8192 --seq-len 256 --data "$DATA" --out "$OUT/db"
fi
RUNS=()
todo() { [ ! -f "$1/result.json" ]; }  # rerunning the script skips finished baselines; searches resume
for T in ${TARGETS:-3 2.5}; do
    todo "$OUT/dp-$T" && evopress baseline "${COMMON[@]}" --target "$T" --method dp --out "$OUT/dp-$T"
    todo "$OUT/random-$T" && evopress baseline "${COMMON[@]}" --target "$T" --method random --tokens 1024 \
        --candidates 16 --out "$OUT/random-$T"
    # Warm start: the DP profile joins the paper's initial population (uniform at integer targets,
    # random lowering from ceil(target) otherwise); the search keeps it only if nothing beats it.
    evopress search "${COMMON[@]}" --target "$T" --generations "$GENERATIONS" --offspring 16 --stages 2:256,1:1024 \
        --initial-candidates 8 --initial-tokens 1024 --init-from dp --out "$OUT/evopress-$T"
    RUNS+=("$OUT/evopress-$T" "$OUT/dp-$T" "$OUT/random-$T")
done
todo "$OUT/uniform-3" && evopress baseline "${COMMON[@]}" --target 3 --method uniform --out "$OUT/uniform-3"
todo "$OUT/uniform-2" && evopress baseline "${COMMON[@]}" --target 2 --method uniform --out "$OUT/uniform-2"  # a bracket
RUNS+=("$OUT/uniform-3" "$OUT/uniform-2")
evopress eval "${RUNS[@]}" --eval-data wiki,ptb --eval-tokens 8192 --eval-seq-len 512 --quiet
evopress report "${RUNS[@]}" --out "$OUT/report" --quiet
cat "$OUT/report/report.md"
