#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M, CPU): EvoPress depth search at 25% of the
# sub-blocks, the ShortGPT / angular-distance / best-of-32-random baselines at the same budget,
# held-out evaluation of all four, and a report (table + plots). About 16 minutes on 2 CPU cores
# including the venv (README).
#
#   bash benchmarks/demo.sh [OUT]        (make demo runs it inside the project's venv)
#
# Scale up with the search flags, e.g. the paper's depth schedule:
#   --generations 107 --offspring 32 --stages 2:2048,1:32768 --initial-candidates 64 --initial-tokens 2048
set -euo pipefail
OUT=${1:-runs/demo}
TARGET=${TARGET:-0.25}
COMMON=(--space drop --target "$TARGET" --calib-tokens 32768 --seq-len 256 --final-tokens 4096 --seed 0)

evopress search "${COMMON[@]}" --generations "${GENERATIONS:-30}" --offspring 16 --stages 2:256,1:1024 \
    --initial-candidates 16 --initial-tokens 512 --out "$OUT/evopress"   # warm start: the default, shortgpt,angular
for method in shortgpt angular; do
    evopress baseline "${COMMON[@]}" --method "$method" --tokens 4096 --out "$OUT/$method"
done
evopress baseline "${COMMON[@]}" --method random --tokens 1024 --candidates 32 --out "$OUT/random"
evopress eval "$OUT/evopress" "$OUT/shortgpt" "$OUT/angular" "$OUT/random" \
    --eval-data wiki,ptb --eval-tokens 4096 --eval-seq-len 512
evopress report "$OUT/evopress" "$OUT/shortgpt" "$OUT/angular" "$OUT/random" --out "$OUT/report"
echo "report: $OUT/report/report.md (plots: profile.png, search.png, metrics.png)"
