#!/usr/bin/env bash
# The width space against its baselines on held-out text (docs/width.md).
#
#   bash benchmarks/width.sh [OUT]     env: MODEL (default: the embedded SmolLM2-135M), TARGETS (fractions of
#                                      the blocks' linear parameters removed, default 0.25,0.5), DEPTH (depth
#                                      targets at about the same parameters, default 0.234,0.5: 7 and 15 of 30
#                                      sub-blocks of each kind, 23.3% and 50%), GENERATIONS (default 12)
#
# 1. Two width databases: OBS (the default) and activation-ranked without update (Minitron-style importance).
# 2. One `evopress pareto --space width` at TARGETS: the search (warm-started from uniform and ShortGPT), those two
#    baselines on the OBS database, held-out KL/PPL on Wikipedia and PTB.
# 3. The importance baseline: uniform width on the activation database, evaluated the same way.
# 4. Depth pruning at about the same parameters: `evopress pareto --space drop` (its search and ShortGPT).
# 5. The searches and uniform width on the five held-out genres of docs/generalization.md.
# 6. Every result exported and timed in plain transformers against the dense model (benchmarks/width_speed.py),
#    then the table (benchmarks/width_table.py).
set -euo pipefail
OUT=${1:-runs/width-bench}
TARGETS=${TARGETS:-0.25,0.5}
DEPTH=${DEPTH:-0.234,0.5}
MODEL_ARGS=()
[ -n "${MODEL:-}" ] && MODEL_ARGS=(--model "$MODEL")
COMMON=(--calib-tokens 8192 --seq-len 256)
EVAL=(--eval-data wiki,ptb --eval-tokens 4096 --eval-seq-len 512)
SEARCH=(--seed 0 --generations "${GENERATIONS:-12}" --offspring 16 --stages 2:256,1:1024 --initial-candidates 8
        --initial-tokens 512 --final-tokens 2048 --tokens 1024)

for method in obs activation; do
    db=$OUT/db-$method
    [ -f "$db/manifest.json" ] || evopress build-db --space width --method "$method" "${MODEL_ARGS[@]}" --out "$db" \
        "${COMMON[@]}"
done
evopress pareto --space width --db "$OUT/db-obs" "${MODEL_ARGS[@]}" --targets "$TARGETS" "${COMMON[@]}" "${SEARCH[@]}" \
    --baselines uniform,shortgpt "${EVAL[@]}" --out "$OUT/width"
for t in ${TARGETS//,/ }; do
    dir=$OUT/activation/target-$t
    [ -f "$dir/result.json" ] || evopress baseline --space width --db "$OUT/db-activation" "${MODEL_ARGS[@]}" \
        --method uniform --target "$t" "${COMMON[@]}" --tokens 1024 --final-tokens 2048 --out "$dir"
    [ -f "$dir/eval.json" ] || evopress eval "$dir" "${EVAL[@]}"
done
evopress pareto --space drop "${MODEL_ARGS[@]}" --targets "$DEPTH" "${COMMON[@]}" "${SEARCH[@]}" \
    --baselines shortgpt "${EVAL[@]}" --out "$OUT/depth"
evopress eval "$OUT"/width/target-* "$OUT"/width/baselines/uniform/target-* "$OUT"/depth/target-* \
    --eval-data code,legal,plays,dialogue,spanish --eval-tokens 2048 --eval-seq-len 512
python benchmarks/width_speed.py "$OUT" --rounds 9
python benchmarks/width_table.py "$OUT" | tee "$OUT/table.md"
