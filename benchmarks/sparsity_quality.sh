#!/usr/bin/env bash
# Unstructured-sparsity quality on the embedded default model (SmolLM2-135M, 30 blocks, CPU):
# EvoPress against uniform SparseGPT and OWL at 50%, 60% and 70% average sparsity.
#
# Per target: a SparseGPT level database centred at the target (so "uniform" is exactly uniform),
# step 27,648 weights (3.1% of an MLP layer, 8.3% of q/o, 25% of k/v), ±3 levels; calibration and
# search on 8,192 tokens of the default calibration (wiki+ptb+docs+tweets; the tables in docs/sparsity.md
# were measured on the wiki+ptb mix, then the default) in 256-token windows. OWL: the paper's 20-point (lambda, M) grid,
# best on 1,024 calibration tokens. EvoPress: warm-started from uniform and OWL (the better of the two
# on 512 tokens becomes the first parent), offspring 16, stages 2@256 -> 1@1024 tokens, $GENERATIONS
# generations. Held-out: Wikipedia summaries (last 2,000 articles) and PTB test, 8,192 tokens each,
# 512-token windows. Step timings go to $OUT/timings.tsv.
#
#   bash benchmarks/sparsity_quality.sh [OUT]      (about 45 min on a shared 2-core CPU)
#
# Single-threaded torch by default: on a 2-core machine shared with other jobs, two threads per
# process made a forward pass 2.5x slower (barrier waits). Set OMP_NUM_THREADS=2 on an idle machine.
set -euo pipefail
OUT=${1:-runs/sparsity-quality}
GENERATIONS=${GENERATIONS:-20}
TARGETS=${TARGETS:-"0.5 0.6 0.7"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA=(--calib-tokens 8192 --seq-len 256)
mkdir -p "$OUT"
TIMINGS="$OUT/timings.tsv"
[ -f "$TIMINGS" ] || printf 'target\tstep\tseconds\n' > "$TIMINGS"

timed() {  # timed TARGET STEP command...: run, append the wall time
    local t0=$SECONDS
    "${@:3}"
    printf '%s\t%s\t%s\n' "$1" "$2" $((SECONDS - t0)) >> "$TIMINGS"
}

for TARGET in $TARGETS; do
    D="$OUT/$TARGET"
    if [ ! -f "$D/db/manifest.json" ]; then
        timed "$TARGET" build-db evopress build-db --space sparsity --center "$TARGET" --levels 3 --step 27648 \
            "${DATA[@]}" --out "$D/db" --quiet
    fi
    COMMON=(--space sparsity --target "$TARGET" --db "$D/db" "${DATA[@]}" --final-tokens 2048 --seed 0 --quiet)
    timed "$TARGET" uniform evopress baseline "${COMMON[@]}" --method uniform --out "$D/uniform"
    timed "$TARGET" owl evopress baseline "${COMMON[@]}" --method owl --tokens 1024 --out "$D/owl"
    timed "$TARGET" evopress evopress search "${COMMON[@]}" --generations "$GENERATIONS" --offspring 16 \
        --stages 2:256,1:1024 --initial-tokens 512 --init-from owl --out "$D/evopress"
    timed "$TARGET" eval evopress eval "$D/evopress" "$D/owl" "$D/uniform" --eval-data wiki,ptb --eval-tokens 8192 \
        --eval-seq-len 512 --quiet
    evopress report "$D/evopress" "$D/owl" "$D/uniform" --out "$D/report" --quiet
done
