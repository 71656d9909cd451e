#!/usr/bin/env bash
# 1 process vs 2 torchrun processes (gloo, CPU) on the same depth search and seed: wall time per
# generation and whether the results are identical.
#   bash benchmarks/distributed.sh [OUT]
set -euo pipefail
OUT=${1:-runs/distributed}
ARGS=(--space drop --target 0.25 --generations "${GENERATIONS:-4}" --offspring 16 --stages 2:256,1:1024
      --initial-candidates 1 --init-from none --calib-tokens 8192 --final-tokens 256 --device cpu --quiet --restart)
evopress search "${ARGS[@]}" --out "$OUT/one"
torchrun --nproc-per-node 2 -m evopress search "${ARGS[@]}" --out "$OUT/two"
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
runs = {n: json.load(open(f"{out}/{n}/result.json")) for n in ("one", "two")}
for n, r in runs.items():
    gens = [h for h in r["history"] if h["generation"] > 0]
    print(f"{n} process(es): {sum(h['seconds'] for h in gens) / len(gens):.1f} s per generation, "
          f"{sum(h['tokens'] for h in gens) / sum(h['seconds'] for h in gens):.0f} candidate-tokens/s")
print("identical levels and fitness:", runs["one"]["levels"] == runs["two"]["levels"]
      and runs["one"]["fitness"] == runs["two"]["fitness"])
PY
