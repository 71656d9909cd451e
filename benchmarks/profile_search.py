"""torch.profiler over one search generation: which operators the evaluator's time goes to.

    python benchmarks/profile_search.py --space drop --target 0.25 --out runs/profile/drop.txt
    python benchmarks/profile_search.py --space sparsity --target 0.5 --db DB --out runs/profile/sparsity.txt

Same search settings and modes as ``benchmarks/speed.py`` (``--mode naive`` profiles the reference's
evaluator), with its ``FitnessConfig(profile=True)``: the device is synced around timed steps. The teacher is built before profiling, as in a search. Writes the operator table sorted by
self CPU time (and CUDA time on a GPU) and prints its first rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from speed import MODES, prepare_mode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="drop")
    p.add_argument("--target", type=float, default=0.25)
    p.add_argument("--db", default=None)
    p.add_argument("--mode", choices=MODES, default="optimised")
    p.add_argument("--offspring", type=int, default=16)
    p.add_argument("--stages", default="2:256,1:1024")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--workdir", default="runs/profile")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    from evopress.pipeline import run_search

    ctx = prepare_mode(args, 1)
    ctx.evaluator.warm()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        run_search(ctx, Path(args.workdir) / f"{args.space}-{args.mode}", restart=True, progress=False,
                   log=lambda m: None)
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
