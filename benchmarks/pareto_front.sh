#!/usr/bin/env bash
# Pareto fronts on the embedded default model (SmolLM2-135M, CPU): one `evopress pareto` run per space,
# 3 budgets each, with a small search schedule; each front is compared with the space's own baselines
# (depth: ShortGPT, angular; quant: uniform GPTQ, DP) on held-out Wikipedia (4,096 tokens; PTB too with
# EVAL_DATA=wiki,ptb).
#
#   bash benchmarks/pareto_front.sh [OUT]                  (inside the project's venv)
#   DB_Q=path/to/quant-db bash benchmarks/pareto_front.sh   (reuse a quant database built on wiki)
#   GENERATIONS=20 EVAL_DATA=wiki,ptb bash benchmarks/pareto_front.sh   (longer search, both held-out sets)
#   SPACES=drop bash benchmarks/pareto_front.sh             (depth only)
#
# Rerunning the script skips finished budgets and resumes the one in progress (pareto is resumable).
# Prints the front.json of each space as a markdown table (docs/pareto.md has the figures and the
# settings they were measured with).
set -euo pipefail
OUT=${1:-runs/pareto}
GENERATIONS=${GENERATIONS:-8}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DB_Q=${DB_Q:-$OUT/quant-db}
COMMON=(--data wiki --calib-tokens 8192 --seq-len 256 --final-tokens 2048 --seed 0
        --generations "$GENERATIONS" --offspring 8 --stages 2:256,1:1024 --initial-candidates 8
        --initial-tokens 512 --tokens 2048 --track-every 0
        --eval-data "${EVAL_DATA:-wiki}" --eval-tokens 4096 --eval-seq-len 512 --quiet)
SPACES=${SPACES:-drop quant}
FRONTS=()

if [[ " $SPACES " == *" drop "* ]]; then
    evopress pareto --space drop --targets "${DEPTH_TARGETS:-0.125,0.25,0.375}" "${COMMON[@]}" --out "$OUT/depth"
    FRONTS+=("$OUT/depth/front.json")
fi
if [[ " $SPACES " == *" quant "* ]]; then
    if [ ! -f "$DB_Q/manifest.json" ]; then
        evopress build-db --space quant --bits 2,3,4 --calib-tokens 8192 --seq-len 256 --data wiki --out "$DB_Q"
    fi
    evopress pareto --space quant --db "$DB_Q" --targets "${QUANT_TARGETS:-2.5,3,3.5}" "${COMMON[@]}" --out "$OUT/quant"
    FRONTS+=("$OUT/quant/front.json")
fi

python - "${FRONTS[@]}" <<'PY'
import json, sys

for path in sys.argv[1:]:
    front = json.load(open(path))
    sets = front["eval"]["data"]
    print(f"\n{front['space']} ({path}); dense: " + ", ".join(
        f"{s} PPL {front['dense']['held_out'][s]['ppl']:.2f}" for s in sets)
        + f", {front['dense']['model_gb']:.4f} GB")
    print("| method | target | model GB | bits/param | " + " | ".join(f"{s} KL | {s} PPL" for s in sets) + " |")
    print("|---|---|---|---|" + "---|---|" * len(sets))
    for method, points in front["methods"].items():
        for p in points:
            print(f"| {method} | {p['target']:g} | {p['model_gb']:.4f} | {p['bits_per_param']:.3f} | " + " | ".join(
                f"{p['held_out'][s]['kl']:.4f} | {p['held_out'][s]['ppl']:.2f}" for s in sets) + " |")
    for method, skipped in front["skipped"].items():
        for s in skipped:
            print(f"skipped: {method} at {s['target']:g}: {s['reason']}")
PY
