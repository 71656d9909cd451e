#!/usr/bin/env bash
# The gguf space against llama.cpp's own presets, each at its own size (docs/gguf.md).
#
#   bash benchmarks/gguf.sh [OUT]      env: MODEL (a .gguf; default: the embedded SmolLM2-135M Q4_1),
#                                      PRESETS (default "Q2_K Q3_K_M Q4_K_M"), GENERATIONS (default 12)
#
# 1. Two databases of the default types (Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0 after llama.cpp's shape fallback):
#    with the importance matrix of the calibration text (the default) and without (llama.cpp's default).
# 2. One `evopress pareto` at the presets' sizes (build-db prints them; read here from the manifest): the
#    search, the `preset` baseline (the largest preset within the budget: at a preset's size, that preset)
#    and `uniform`, with held-out KL/PPL on Wikipedia and PTB.
# 3. The same presets quantized without an imatrix, evaluated the same way.
# 4. Each result exported as a GGUF and run in llama.cpp (xllamacpp): greedy agreement with our torch model
#    and generation speed (benchmarks/gguf_runtime.py); then the table (benchmarks/gguf_table.py).
set -euo pipefail
OUT=${1:-runs/gguf-bench}
PRESETS=${PRESETS:-"Q2_K Q3_K_M Q4_K_M"}
MODEL_ARGS=()
[ -n "${MODEL:-}" ] && MODEL_ARGS=(--model "$MODEL")
COMMON=(--calib-tokens 8192 --seq-len 256)
EVAL=(--eval-data wiki,ptb --eval-tokens 4096 --eval-seq-len 512)

for db in db db-noimatrix; do
    extra=(); [ "$db" = db-noimatrix ] && extra=(--no-imatrix)
    [ -f "$OUT/$db/manifest.json" ] || evopress build-db --space gguf "${MODEL_ARGS[@]}" "${extra[@]}" \
        --out "$OUT/$db" "${COMMON[@]}"
done
TARGETS=$(python - "$OUT/db/manifest.json" $PRESETS <<'PY'
import json, sys
presets = json.load(open(sys.argv[1]))["presets"]
print(",".join(f"{presets[p]['bits_per_weight']:.6f}" for p in sys.argv[2:]))
PY
)
evopress pareto --space gguf --db "$OUT/db" "${MODEL_ARGS[@]}" --targets "$TARGETS" "${COMMON[@]}" --seed 0 \
    --generations "${GENERATIONS:-12}" --offspring 16 --stages 2:256,1:1024 --initial-candidates 8 \
    --initial-tokens 512 --final-tokens 2048 --baselines preset,uniform --tokens 1024 "${EVAL[@]}" \
    --out "$OUT/pareto"
for t in ${TARGETS//,/ }; do
    dir="$OUT/noimatrix/target-$t"
    [ -f "$dir/result.json" ] || evopress baseline --space gguf --db "$OUT/db-noimatrix" "${MODEL_ARGS[@]}" \
        --method preset --target "$t" "${COMMON[@]}" --tokens 1024 --final-tokens 2048 --out "$dir"
    [ -f "$dir/eval.json" ] || evopress eval "$dir" "${EVAL[@]}"
done
python benchmarks/gguf_runtime.py "$OUT"
python benchmarks/gguf_table.py "$OUT" | tee "$OUT/table.md"
