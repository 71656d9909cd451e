#!/usr/bin/env bash
# The README's headline Results table, re-measured under today's defaults on the embedded default model
# (SmolLM2-135M, CPU): EvoPress against each space's baselines at the same budget, held-out Wikipedia
# and PTB perplexity and KL.
#
#   bash benchmarks/results.sh [OUT]          (inside the project's venv; default OUT: runs/results)
#
# Rows: depth 25% and 37.5% of the sub-blocks (vs ShortGPT, angular distance, best-of-32 random),
# unstructured sparsity 50/60/70% (vs uniform SparseGPT, OWL), quantization 3.0 and 2.5 bits per
# weight (vs uniform GPTQ, DP over per-layer errors, best-of-16 random).
#
# Today's defaults throughout: calibration on the four-genre mix (wiki+ptb+docs+tweets), the
# per-source fitness with noise-aware acceptance (docs/generalization.md), the default search shape
# (16 offspring, stages 2@256 -> 1@1024 tokens, 16 random initial candidates ranked on 512 tokens, the
# space's warm start `--init-from auto`: ShortGPT + angular for depth, OWL for sparsity, DP for quant;
# the parent tracked on 2,048 held-aside tokens every 5 generations, the final choice), act-order GPTQ
# databases, 256-token calibration windows,
# seed 0. Scaled down for about 75 minutes on 2 CPU cores (measured: 96 minutes on 2 cores shared with
# other jobs, load average 6-9, sparsity and quant then with two threads; README):
#   * generations: $GEN_DEPTH (default 12) for depth, $GEN_SPARSITY (6) for sparsity, $GEN_QUANT (6) for
#     quantization, instead of the CLI's 40;
#   * an 8,192-token calibration pool (the default would be 32,768), final calibration KL on its first
#     2,048 tokens, the same sample for every method;
#   * held-out: $EVAL_TOKENS (default 4096) tokens each of the Wikipedia evaluation split and PTB test,
#     512-token windows;
#   * baselines look at the first 1,024 calibration tokens (--tokens 1024: ShortGPT and angular pick the
#     same blocks as on 4,096 at 25%; OWL's 20-point grid and best-of-32 random are ranked on them; DP and
#     uniform read no tokens).
# Per space one `evopress pareto` process loads the model and the dense teacher once and runs the
# searches, the baselines and the held-out evaluation, then `evopress report` draws the profiles.
# Sparsity: one SparseGPT database centred on 60%, ±5 levels of 27,648 weights (3.1% of an MLP layer,
# 8.3% of q/o, 25% of k/v), serving all three targets; "uniform" is exactly uniform at 60% and the
# feasible configuration closest to uniform at 50% and 70% (k/v and q/o layers round to the nearest
# level; the total of non-zeros is exact). Quantization: one GPTQ database (bits 2,3,4,5,6,8, group 64,
# 3-bit calibration inputs), weight-bit accounting. Databases are built on 8,192 calibration tokens.
#
# Rerunning resumes: finished budgets, baselines and databases are kept, a search in progress resumes.
# Step wall times go to $OUT/timings.tsv; the table to $OUT/results.md
# (python benchmarks/results_table.py $OUT/*/front.json writes it again).
set -euo pipefail
OUT=${1:-runs/results}
GEN_DEPTH=${GEN_DEPTH:-12}
GEN_SPARSITY=${GEN_SPARSITY:-6}
GEN_QUANT=${GEN_QUANT:-6}
EVAL_TOKENS=${EVAL_TOKENS:-4096}
SPACES=${SPACES:-"drop sparsity quant"}
# One intra-op thread: on a shared 2-core CPU, two threads per process ran several times slower (barrier
# waits whenever the process gets less than both cores). Set OMP_NUM_THREADS=2 on an idle machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
TIMINGS="$OUT/timings.tsv"
[ -f "$TIMINGS" ] || printf 'step\tseconds\n' > "$TIMINGS"

timed() {  # timed STEP command...: run it, append its wall time
    local t0=$SECONDS
    echo "== $1 ($(date -u +%H:%M:%S) UTC)"
    "${@:2}"
    printf '%s\t%s\n' "$1" $((SECONDS - t0)) >> "$TIMINGS"
}

report() {  # report DIR: table and profile plots of every result under a pareto run
    mapfile -t dirs < <(find "$1" -name result.json -printf '%h\n' | sort)
    evopress report "${dirs[@]}" --out "$1/report" --quiet
}

COMMON=(--seq-len 256 --calib-tokens 8192 --final-tokens 2048 --seed 0 --tokens 1024
        --eval-data wiki,ptb --eval-tokens "$EVAL_TOKENS" --eval-seq-len 512 --quiet)
FRONTS=()

for SPACE in $SPACES; do
    case "$SPACE" in
    drop)
        timed depth evopress pareto --space drop --targets 0.25,0.375 --generations "$GEN_DEPTH" \
            --baselines shortgpt,angular,random --candidates 32 "${COMMON[@]}" --out "$OUT/depth"
        report "$OUT/depth"
        FRONTS+=("$OUT/depth/front.json")
        ;;
    quant)
        DB="$OUT/quant-db"
        [ -f "$DB/manifest.json" ] || timed quant-db evopress build-db --space quant --bits 2,3,4,5,6,8 \
            --calib-tokens 8192 --seq-len 256 --out "$DB" --quiet
        timed quant evopress pareto --space quant --db "$DB" --targets 2.5,3 --generations "$GEN_QUANT" \
            --baselines uniform,dp "${COMMON[@]}" --out "$OUT/quant"
        report "$OUT/quant"
        FRONTS+=("$OUT/quant/front.json")
        ;;
    sparsity)
        DB="$OUT/sparsity-db"
        [ -f "$DB/manifest.json" ] || timed sparsity-db evopress build-db --space sparsity --center 0.6 \
            --levels 5 --step 27648 --calib-tokens 8192 --seq-len 256 --out "$DB" --quiet
        timed sparsity evopress pareto --space sparsity --db "$DB" --targets 0.5,0.6,0.7 \
            --generations "$GEN_SPARSITY" --baselines uniform,owl "${COMMON[@]}" --out "$OUT/sparsity"
        report "$OUT/sparsity"
        FRONTS+=("$OUT/sparsity/front.json")
        ;;
    *) echo "unknown space $SPACE" >&2; exit 2 ;;
    esac
done

python "$HERE/results_table.py" "${FRONTS[@]}" | tee "$OUT/results.md"
