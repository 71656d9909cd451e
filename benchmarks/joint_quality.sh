#!/usr/bin/env bash
# Joint compression quality on the embedded default model (SmolLM2-135M, CPU): the joint search (drop
# sub-blocks + per-layer bitwidths under one true byte budget) against the best single-space results at
# the same bytes: uniform bitwidth (pure quant), pure depth (layers at the top bitwidth, ShortGPT blocks
# dropped until it fits) and the best-of-grid combination (uniform bits + ShortGPT/angular drops, best
# calibration KL). Targets are true bits per weight (scales and zero points counted), default the bytes
# of 2.5, 3 and 4 bits. Held-out Wikipedia/PTB perplexity and KL, and a report.
#
#   bash benchmarks/joint_quality.sh [OUT]                       (inside the project's venv)
#   DB=runs/quant/db TARGETS=3 GENERATIONS=10 bash benchmarks/joint_quality.sh runs/joint   (reuse a quant db)
#   WITH_SPARSITY=runs/joint/sdb bash benchmarks/joint_quality.sh runs/joint
#       adds one joint search per target whose layers may also be pruned (--with-sparsity: a SparseGPT
#       database of the same model and data, centred at 50%; built there first if it is missing).
set -euo pipefail
OUT=${1:-runs/joint}
DB=${DB:-$OUT/db}
GENERATIONS=${GENERATIONS:-20}
CALIB=${CALIB:-32768}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON=(--space joint --db "$DB" --data wiki --calib-tokens "$CALIB" --seq-len 256 --final-tokens 4096 --seed 0 --quiet)

if [ ! -f "$DB/manifest.json" ]; then
    evopress build-db --space quant --bits "${BITS:-2,3,4,5,6}" --calib-tokens 8192 --seq-len 256 --data wiki --out "$DB"
fi
if [ -n "${WITH_SPARSITY:-}" ] && [ ! -f "$WITH_SPARSITY/manifest.json" ]; then
    evopress build-db --space sparsity --calib-tokens 8192 --seq-len 256 --data wiki --out "$WITH_SPARSITY"
fi
RUNS=()
todo() { [ ! -f "$1/result.json" ]; }  # rerunning skips finished baselines; searches resume
for T in ${TARGETS:-2.5 3 4}; do
    for M in uniform depth grid; do
        todo "$OUT/$M-$T" && evopress baseline "${COMMON[@]}" --target "$T" --method "$M" --tokens 1024 \
            --out "$OUT/$M-$T"
        RUNS+=("$OUT/$M-$T")
    done
    # the search's default warm start is the grid baseline; --tokens 1024 scores it on the baselines' sample
    evopress search "${COMMON[@]}" --target "$T" --generations "$GENERATIONS" --offspring 16 --stages 2:256,1:1024 \
        --initial-candidates 8 --initial-tokens 1024 --tokens 1024 --out "$OUT/joint-$T"
    RUNS+=("$OUT/joint-$T")
    if [ -n "${WITH_SPARSITY:-}" ]; then
        evopress search "${COMMON[@]}" --with-sparsity "$WITH_SPARSITY" --target "$T" --generations "$GENERATIONS" \
            --offspring 16 --stages 2:256,1:1024 --initial-candidates 8 --initial-tokens 1024 --tokens 1024 \
            --out "$OUT/joint-sparse-$T"
        RUNS+=("$OUT/joint-sparse-$T")
    fi
done
evopress eval "${RUNS[@]}" --eval-data wiki,ptb --eval-tokens 8192 --eval-seq-len 512 --quiet
evopress report "${RUNS[@]}" --out "$OUT/report" --quiet
cat "$OUT/report/report.md"
for R in "${RUNS[@]}"; do
    python -c "import json,sys; r=json.load(open(sys.argv[1]+'/result.json')); b=r['budget']; print(sys.argv[1], b['bytes'], \
'bytes', round(b['bits_per_weight'], 4), 'bits/w; dropped attn', b['dropped_attention'], 'mlp', b['dropped_mlp'], \
'bits', b['layers_per_bitwidth'], 'sparsity', b.get('sparsity', {}).get('fraction_of_weights'))" "$R"
done
