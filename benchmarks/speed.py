"""Naive vs optimised evaluator on the same search (same seed, same samples).

Naive = what the reference implementation does (``ReferenceEvaluator`` below): every candidate runs
from the embeddings, one sequence at a time, changed layers are read back from the database on disk
(no variant cache), and the teacher's full-vocabulary log-probs are held in RAM for the whole pool,
the KL taken over the vocabulary. Optimised = our defaults: batched windows, prefix reuse across
candidates, the hidden-space KL (``evopress.fitness``), variants cached in RAM.

    python benchmarks/speed.py --space drop --target 0.25 --generations 4 --out runs/speed/speed-drop.json
    python benchmarks/speed.py --space sparsity --target 0.5 --db DB --generations 4 --out runs/speed/speed-sparsity.json

Both modes compute their teacher over the whole pool before the search (the reference does too);
that set-up is timed separately and is not part of the per-generation times. Each mode runs in its
own subprocess so peak RSS is per mode. FLOPs are counted with torch's FlopCounterMode in a separate
one-generation run (it slows execution, so it is not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from evopress.fitness import Evaluator, FitnessConfig, TeacherCache, predicted

MODES = ("naive", "optimised")


class FullLogitTeacher(TeacherCache):
    """The reference's teacher: full-vocabulary log-probs of every calibration position, in RAM."""

    def targets(self, normed: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"log_p": F.log_softmax(self.decoder.logits(normed), dim=-1)}


class ReferenceEvaluator(Evaluator):
    """KL over the full vocabulary against cached teacher log-probs, chunk by chunk."""

    def __init__(self, space, pool, config: FitnessConfig):
        super().__init__(space, pool, config)
        self.teacher = FullLogitTeacher(self.decoder, pool, config.batch_size, config.chunk_tokens)

    def _compare(self, states, targets, resident=True) -> torch.Tensor:
        kl = nll = dense_nll = 0.0
        for h, t in zip(states, targets):
            s = predicted(self.decoder.norm(h))
            labels = t["labels"]
            for i in range(0, len(s), self.config.chunk_tokens):
                log_q = F.log_softmax(self.decoder.logits(s[i: i + self.config.chunk_tokens]), dim=-1)
                log_p, y = t["log_p"][i: i + self.config.chunk_tokens], labels[i: i + self.config.chunk_tokens]
                kl += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
                nll += F.nll_loss(log_q, y, reduction="sum").item()
                dense_nll += F.nll_loss(log_p, y, reduction="sum").item()
        return torch.tensor([kl, nll, dense_nll], dtype=torch.float64)


def prepare_mode(args: argparse.Namespace, generations: int):
    from evopress.evolution import SearchConfig
    from evopress.pipeline import prepare
    from evopress.recipe import Recipe

    options = {"db": args.db} if args.db else {}
    search = SearchConfig(generations=generations, offspring=args.offspring,
                          stages=[tuple(int(x) for x in s.split(":")) for s in args.stages.split(",")],
                          initial_candidates=1, seed=args.seed)
    # profile: sync the device around timed steps, so the time fractions below are true on a GPU;
    # init_from []: one random start taken as is, no warm-start baselines (per-generation cost only)
    recipe = Recipe(space=args.space, target=args.target, data="wiki", seq_len=args.seq_len,
                    calib_tokens=args.calib_tokens, space_options=options, search=search, final_tokens=512,
                    fitness=FitnessConfig(profile=True), init_from=[])
    ctx = prepare(recipe, log=lambda m: None)
    if args.mode == "naive":
        naive = FitnessConfig(prefix_reuse=False, batch_size=1, profile=True)
        ctx.evaluator = ReferenceEvaluator(ctx.space, ctx.pool, naive)
    return ctx


def run_mode(args: argparse.Namespace) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from evopress.pipeline import run_search

    if args.mode == "naive":
        os.environ["EVOPRESS_DB_CACHE_GB"] = "0"  # every changed layer is read from disk again
    ctx = prepare_mode(args, args.generations)
    start = time.perf_counter()
    ctx.evaluator.warm()
    setup = time.perf_counter() - start
    before = ctx.evaluator.stats.as_dict()
    start = time.perf_counter()
    result = run_search(ctx, Path(args.workdir) / args.mode, restart=True, progress=False, log=lambda m: None)
    wall = time.perf_counter() - start
    gens = [h for h in result["history"] if h["generation"] > 0]
    stats = {k: v - before[k] for k, v in ctx.evaluator.stats.as_dict().items()}
    # FLOPs of one generation, counted separately (the counter slows execution down)
    flops_ctx = prepare_mode(args, 1)
    flops_ctx.evaluator.warm()
    counter = FlopCounterMode(display=False)
    with counter:
        run_search(flops_ctx, Path(args.workdir) / f"{args.mode}-flops", restart=True, progress=False,
                   log=lambda m: None)
    hidden = ctx.decoder.head.weight.shape[1]
    vocab = ctx.decoder.head.weight.shape[0]
    return {
        "mode": args.mode,
        "threads": torch.get_num_threads(),
        "levels": result["levels"],
        # the parent after every generation, from the search's checkpoint (result.json keeps only the last)
        "trajectory": [h["parent"] for h in json.loads((Path(args.workdir) / args.mode / "checkpoint.json")
                                                       .read_text())["state"]["history"]],
        "fitness": result["fitness"]["kl"],
        "teacher_setup_seconds": setup,
        "seconds_per_generation": sum(h["seconds"] for h in gens) / len(gens),
        "candidate_tokens_per_second": sum(h["tokens"] for h in gens) / sum(h["seconds"] for h in gens),
        "search_wall_seconds": wall,
        # shares of the search's wall time (set-up excluded). Model forwards: candidate decoder blocks,
        # candidate LM head + KL, and dense teacher forwards; the rest is rewriting layers (apply),
        # mutation, sorting and checkpoints
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
        "full_logit_cache_mb": len(ctx.pool.windows) * ctx.pool.seq_len * vocab * 4 / 2**20,
        "hidden_over_vocab": hidden / vocab,
        "pool_tokens": ctx.pool.tokens,
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
        "teacher_cache_over_full_logits": fast["teacher_cache_mb"] / fast["full_logit_cache_mb"],
        "hidden_over_vocab": fast["hidden_over_vocab"],
        "runs": runs,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
