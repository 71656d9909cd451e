#!/usr/bin/env bash
# Depth-pruning quality on the embedded default model (SmolLM2-135M, 30 blocks, CPU):
# EvoPress (random initial population, as the paper; and warm-started from the scoring baselines, the default)
# against ShortGPT, angular distance and best-of-32 random, at 25% and 37.5% of the sub-blocks.
# Held-out: Wikipedia summaries (last 2,000 articles) and PTB test, 8,192 tokens each, 512-token windows.
#
#   bash benchmarks/depth_quality.sh [OUT]      (about 1.5 h on 2 idle CPU cores)
#   TARGETS=0.375 GENERATIONS=30 bash benchmarks/depth_quality.sh   (one target, shorter search)
#   DATA=ptb TARGETS=0.25 bash benchmarks/depth_quality.sh runs/depth-quality-ptb   (calibrate on PTB train)
set -euo pipefail
OUT=${1:-runs/depth-quality}
GENERATIONS=${GENERATIONS:-40}
for TARGET in ${TARGETS:-0.25 0.375}; do
    D="$OUT/$TARGET"
    COMMON=(--space drop --target "$TARGET" --data "${DATA:-wiki}" --calib-tokens 32768 --seq-len 256 --final-tokens 4096 --seed 0 --quiet)
    SEARCH=(--generations "$GENERATIONS" --offspring 16 --stages 2:256,1:1024 --initial-candidates 16 --initial-tokens 512)
    # baselines are deterministic: an existing result is kept (searches resume from their checkpoints)
    for method in shortgpt angular; do
        [ -f "$D/$method/result.json" ] || evopress baseline "${COMMON[@]}" --method "$method" --tokens 4096 --out "$D/$method"
    done
    [ -f "$D/random/result.json" ] || evopress baseline "${COMMON[@]}" --method random --tokens 1024 --candidates 32 --out "$D/random"
    evopress search "${COMMON[@]}" "${SEARCH[@]}" --out "$D/evopress-warm"   # the default: --init-from shortgpt,angular
    evopress search "${COMMON[@]}" "${SEARCH[@]}" --init-from none --out "$D/evopress"   # the paper's random start
    evopress eval "$D/evopress" "$D/evopress-warm" "$D/shortgpt" "$D/angular" "$D/random" \
        --eval-data wiki,ptb --eval-tokens 8192 --eval-seq-len 512 --quiet
    evopress report "$D/evopress" "$D/evopress-warm" "$D/shortgpt" "$D/angular" "$D/random" --out "$D/report"
done
