#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M, CPU): EvoPress depth search at 25% of the
# sub-blocks, the ShortGPT / angular-distance / best-of-16-random baselines at the same budget,
# held-out evaluation of all four on Wikipedia and PTB, and a report (table + plots).
#
# One `evopress pareto` process does the search, the baselines and the evaluation: the model, the
# calibration pool with its dense teacher and the held-out sets are loaded once (separate `search`,
# `baseline` and `eval` commands would each reload the model and redo the teacher pass).
# Measured time: README ("Two commands").
#
#   bash benchmarks/demo.sh [OUT]        (make demo runs it inside the project's venv)
#
# Scale up with the search flags, e.g. the paper's depth schedule:
#   --generations 107 --offspring 32 --stages 2:2048,1:32768 --initial-candidates 64 --initial-tokens 2048
set -euo pipefail
OUT=${1:-runs/demo}
TARGET=${TARGET:-0.25}

# Search: 20 generations, 16 offspring, stages 2@256 -> 1@1024 tokens, 16 random initial candidates
# ranked on 512 tokens plus the default warm start (ShortGPT and angular), on an 8,192-token pool of
# the default four-genre calibration mix in 256-token windows (the dense teacher pass over a
# 32,768-token pool took 3 of the demo's minutes), then the final choice on the 4,096-token final
# sample. The baselines look at the first 1,024 calibration tokens (ShortGPT and angular pick the same
# blocks as on 4,096; random: best of 16 on them); final calibration KL on 4,096 tokens shared by every
# method; held-out: 4,096 tokens of Wikipedia and of PTB test in 512-token windows. Sized to finish in
# about 12 minutes on 2 CPU cores (README).
evopress pareto --space drop --targets "$TARGET" --calib-tokens 8192 --seq-len 256 --final-tokens 4096 --seed 0 \
    --generations "${GENERATIONS:-20}" --offspring 16 --stages 2:256,1:1024 \
    --initial-candidates 16 --initial-tokens 512 \
    --baselines shortgpt,angular,random --tokens 1024 --candidates 16 \
    --eval-data wiki,ptb --eval-tokens 4096 --eval-seq-len 512 --out "$OUT"

# the pareto layout: the search in target-<t>/, each baseline in baselines/<method>/target-<t>/
T="target-$(python -c "import sys; print(f'{float(sys.argv[1]):g}')" "$TARGET")"
evopress report "$OUT/$T" "$OUT/baselines/shortgpt/$T" "$OUT/baselines/angular/$T" "$OUT/baselines/random/$T" \
    --out "$OUT/report"
echo "report: $OUT/report/report.md (plots: profile.png, search.png, metrics.png)"
