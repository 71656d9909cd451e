#!/usr/bin/env bash
# Stitched vs finalized: does re-solving the chosen profile (evopress finalize) help, and does EvoPress's
# advantage over the baselines survive it?
#
#   bash benchmarks/finalize.sh [RESULTS] [OUT]    (inside the project's venv; defaults runs/results,
#                                                  runs/finalize)
#
# RESULTS: the quant and sparsity pareto runs of benchmarks/results.sh (EvoPress and every baseline at
# 2.5 / 3.0 bits and 50 / 70% sparsity; 60% is skipped), and a joint run at 3 true bits per weight that
# this script makes on results.sh's quant database when it is missing (the same settings as results.sh,
# $GEN_JOINT generations, default 12; baselines uniform and grid). Each result is finalized on the same 8,192
# calibration tokens its database was built on (block-sequential; TRUE_SEQUENTIAL=1 adds
# --true-sequential), then evaluated exactly as the stitched one was (4,096 held-out tokens each of the
# Wikipedia evaluation split and PTB test, 512-token windows). The table goes to $OUT/finalize.md
# (python benchmarks/finalize_table.py RESULTS OUT writes it again). Reruns resume. SPACES (default
# "sparsity quant joint") picks the spaces to run now.
set -euo pipefail
RESULTS=${1:-runs/results}
OUT=${2:-runs/finalize}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
FLAGS=()
[ "${TRUE_SEQUENTIAL:-0}" = 1 ] && FLAGS+=(--true-sequential)
mkdir -p "$OUT"
SPACES=${SPACES:-"sparsity quant joint"}
[[ " $SPACES " != *" joint "* ]] || [ -f "$RESULTS/joint/front.json" ] || evopress pareto --space joint --db "$RESULTS/quant-db" --targets 3 \
    --generations "${GEN_JOINT:-12}" --baselines uniform,grid --seq-len 256 --calib-tokens 8192 --final-tokens 2048 \
    --seed 0 --tokens 1024 --eval-data wiki,ptb --eval-tokens 4096 --eval-seq-len 512 --quiet --out "$RESULTS/joint"
for dir in $(for s in $SPACES; do find "$RESULTS/$s" -name result.json -printf '%h\n'; done | grep -v 'target-0.6$' | sort); do
    fin="$OUT/${dir#"$RESULTS"/}"
    echo "== $fin ($(date -u +%H:%M:%S) UTC)"
    [ -f "$fin/result.json" ] || evopress finalize "$dir" --out "$fin" --calib-tokens 8192 "${FLAGS[@]}" --quiet
    [ -f "$fin/eval.json" ] || evopress eval "$fin" --eval-data wiki,ptb --eval-tokens 4096 --eval-seq-len 512 \
        --quiet
done
python "$HERE/finalize_table.py" "$RESULTS" "$OUT" | tee "$OUT/finalize.md"
