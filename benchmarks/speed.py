"""Naive vs optimised evaluator on the same search (same seed, same samples).

Naive = what the reference implementation does: every candidate runs from the embeddings, one
sequence at a time, teacher log-probs recomputed for every candidate. Optimised = our defaults:
batched windows, prefix reuse across candidates, the sample's teacher log-probs computed once.

    python benchmarks/speed.py --space drop --target 0.25 --generations 4 --out docs/speed-drop.json
    python benchmarks/speed.py --space sparsity --target 0.5 --db DB --generations 3 --out docs/speed-sparsity.json

Each mode runs in its own subprocess so peak RSS is per mode. FLOPs are counted with torch's
FlopCounterMode in a separate one-generation run (it slows execution, so it is not timed).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = {
    "naive": {"prefix_reuse": False, "logit_cache_bytes": 0, "batch_size": 1},
    "optimised": {},
}


def run_mode(args: argparse.Namespace) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from evopress.fitness import FitnessConfig
    from evopress.pipeline import Recipe, prepare, run_search
    from evopress.evolution import SearchConfig

    options = {"granularity": "sublayer"} if args.space == "drop" else {"db": args.db}
    search = SearchConfig(generations=args.generations, offspring=args.offspring,
                          stages=[tuple(int(x) for x in s.split(":")) for s in args.stages.split(",")],
                          initial_candidates=1, seed=args.seed)
    recipe = Recipe(space=args.space, target=args.target, data="wiki", seq_len=args.seq_len,
                    calib_tokens=args.calib_tokens, space_options=options, search=search,
                    fitness=FitnessConfig(**MODES[args.mode]), final_tokens=512)
    ctx = prepare(recipe, log=lambda m: None)
    start = time.perf_counter()
    result = run_search(ctx, Path(args.workdir) / args.mode, restart=True, progress=False, log=lambda m: None)
    wall = time.perf_counter() - start
    gens = [h for h in result["history"] if h["generation"] > 0]
    stats = ctx.evaluator.stats.as_dict()
    # FLOPs of one generation, counted separately (the counter slows execution down)
    recipe.search = SearchConfig(**{**search.__dict__, "generations": 1})
    flops_ctx = prepare(recipe, log=lambda m: None)
    counter = FlopCounterMode(display=False)
    with counter:
        run_search(flops_ctx, Path(args.workdir) / f"{args.mode}-flops", restart=True, progress=False,
                   log=lambda m: None)
    pool_tokens = ctx.pool.tokens
    hidden = ctx.decoder.head.weight.shape[1]
    vocab = ctx.decoder.head.weight.shape[0]
    return {
        "mode": args.mode,
        "levels": result["levels"],
        # the parent after every generation, from the search's checkpoint (result.json keeps only the last)
        "trajectory": [h["parent"] for h in json.loads((Path(args.workdir) / args.mode / "checkpoint.json")
                                                       .read_text())["state"]["history"]],
        "fitness": result["fitness"]["kl"],
        "seconds_per_generation": sum(h["seconds"] for h in gens) / len(gens),
        "candidate_tokens_per_second": sum(h["tokens"] for h in gens) / sum(h["seconds"] for h in gens),
        "wall_seconds": wall,
        "fraction_in_evaluator": stats["seconds"] / wall,
        # model forwards: candidate decoder blocks, candidate LM head + KL, and the dense teacher's
        # forwards/log-probs; the rest is rewriting layers (apply), mutation, sorting, checkpoints
        "fraction_in_blocks": stats["block_seconds"] / wall,
        "fraction_in_head_and_kl": stats["head_seconds"] / wall,
        "fraction_in_teacher": stats["teacher_seconds"] / wall,
        "fraction_in_apply": stats["apply_seconds"] / wall,
        "fraction_in_model_forwards": (stats["block_seconds"] + stats["head_seconds"]
                                       + stats["teacher_seconds"]) / wall,
        "flops_one_generation": counter.get_total_flops(),
        "block_tokens": stats["block_tokens"],
        "naive_block_tokens": stats["naive_block_tokens"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "teacher_cache_mb": ctx.evaluator.teacher.nbytes / 2**20,
        "full_logit_cache_mb_for_touched_windows": len(ctx.evaluator.teacher.store) * ctx.pool.seq_len
        * vocab * 4 / 2**20,
        "hidden_over_vocab": hidden / vocab,
        "pool_tokens": pool_tokens,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="drop")
    p.add_argument("--target", type=float, default=0.25)
    p.add_argument("--db", default=None)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--offspring", type=int, default=16)
    p.add_argument("--stages", default="2:256,1:1024")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/speed")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    runs = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], check=True,
                             stdout=subprocess.PIPE, text=True).stdout  # child errors reach stderr
        runs[mode] = json.loads(out.strip().splitlines()[-1])
    naive, fast = runs["naive"], runs["optimised"]
    summary = {
        "space": args.space, "target": args.target, "generations": args.generations,
        "offspring": args.offspring, "stages": args.stages,
        "identical_final_configuration": naive["levels"] == fast["levels"],
        "identical_trajectory": naive["trajectory"] == fast["trajectory"],  # the parent after every generation
        "speedup_wall_per_generation": naive["seconds_per_generation"] / fast["seconds_per_generation"],
        "flops_ratio_optimised_over_naive": fast["flops_one_generation"] / naive["flops_one_generation"],
        "runs": runs,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
