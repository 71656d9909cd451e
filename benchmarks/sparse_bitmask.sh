#!/usr/bin/env bash
# Sparse-bitmask export on the embedded default model (SmolLM2-135M) at 50% and 70% average sparsity:
# checkpoint size against the dense-zeros export, logits, and compressed-tensors 0.14.0.1's decompressor.
#
#   bash benchmarks/sparse_bitmask.sh [OUT]        (about 15 min on a shared 2-core CPU)
#
# The size depends only on the number of non-zeros, which the budget fixes exactly, not on which
# layers hold them: a uniform configuration from a magnitude-pruning database (cheap to build) gives
# the same bytes as a searched one at the same target, up to nothing (row offsets are per row).
set -euo pipefail
OUT=${1:-runs/sparse-bitmask}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PYTHON=${PYTHON:-python}
DATA=(--calib-tokens 2048 --seq-len 256)
CT014=${CT014:-$OUT/ct014}
[ -d "$CT014/compressed_tensors" ] || $PYTHON -m pip install -q --no-deps --target "$CT014" compressed-tensors==0.14.0.1
RESULTS=()
for TARGET in 0.5 0.7; do
    D="$OUT/$TARGET"
    [ -f "$D/db/manifest.json" ] || $PYTHON -m evopress build-db --space sparsity --method magnitude --center "$TARGET" \
        --levels 1 "${DATA[@]}" --out "$D/db" --quiet
    [ -f "$D/uniform/result.json" ] || $PYTHON -m evopress baseline --space sparsity --target "$TARGET" --db "$D/db" \
        "${DATA[@]}" --method uniform --final-tokens 256 --out "$D/uniform" --quiet
    RESULTS+=("$D/uniform")
done
$PYTHON benchmarks/sparse_bitmask.py "${RESULTS[@]}" --ct014 "$CT014" | tee "$OUT/sizes.jsonl"
