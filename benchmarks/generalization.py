"""Generalization benchmark: EvoPress and the baselines on held-out genres that no calibration default uses.

    python benchmarks/generalization.py run [--out runs/generalization] [--arms diverse,paper]
        [--spaces drop] [--seeds 0,1,2] [--generations 12] [--targets 0.25]
    python benchmarks/generalization.py table [--out runs/generalization]    (markdown on stdout)

An *arm* is a way to run the search (``ARMS``: calibration text, fitness aggregate, acceptance rule); each
arm runs one ``evopress pareto`` per space and seed: the search at the space's budgets, and the
held-out evaluation of every result on ``EVAL``: the five held-out genres of ``evopress.corpora``
(code, legal, plays, dialogue, spanish) plus the Wikipedia evaluation split and PTB test. The space's
baselines run once per calibration text (with seed 0, in the first arm calibrated on it: ShortGPT,
angular, OWL, DP and uniform do not depend on the seed, nor on the search's flags), so every arm's
EvoPress is compared with baselines that saw the same text.

The table gives, per space and budget, each method's held-out KL and (in brackets) perplexity per genre
(EvoPress: the means over seeds), and over the five held-out genres the mean and the worst ratio of its
KL to the best baseline's on that genre (below 1: better than every baseline there), with the range
over seeds in brackets. Rerunning resumes (finished runs are kept). Settings are scaled for a 2-core
CPU; docs/generalization.md gives the measured tables and commands.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from evopress.corpora import HELD_OUT

EVAL = [*HELD_OUT, "wiki", "ptb"]
WIKIPTB = ["--data", "wiki+ptb"]  # the calibration default before the diverse mix
DIVERSE = ["--data", "wiki+ptb+docs+tweets"]
ARMS = {  # name: (calibration flags, for database builds too; search flags), every setting explicit
    "paper": (WIKIPTB, ["--fitness-aggregate", "tokens", "--accept-sigmas", "0"]),  # the paper's fitness and rule
    "diverse": (DIVERSE, ["--fitness-aggregate", "sources", "--accept-sigmas", "1"]),
    "diverse-tokens": (DIVERSE, ["--fitness-aggregate", "tokens", "--accept-sigmas", "1"]),
    "diverse-worst": (DIVERSE, ["--fitness-aggregate", "worst", "--accept-sigmas", "1"]),
    "diverse-plain": (DIVERSE, ["--fitness-aggregate", "sources", "--accept-sigmas", "0"]),
    "wikiptb": (WIKIPTB, ["--fitness-aggregate", "sources", "--accept-sigmas", "1"]),
}
SPACES = {  # name: (targets, baselines, database build flags or None)
    "drop": ("0.25,0.375", "shortgpt,angular,random", None),
    "sparsity": ("0.6", "uniform,owl", ["--space", "sparsity", "--center", "0.6", "--levels", "5", "--step", "27648"]),
    "quant": ("2.5,3", "uniform,dp", ["--space", "quant", "--bits", "2,3,4,5,6,8"]),
    "joint": ("3", "uniform,grid", ["--space", "quant", "--bits", "2,3,4,5,6,8"]),
}
COMMON = ["--seq-len", "256", "--calib-tokens", "8192", "--final-tokens", "2048", "--tokens", "1024",
          "--candidates", "32", "--eval-tokens", "2048", "--eval-seq-len", "512", "--quiet"]


def run(args: argparse.Namespace) -> None:
    arms = args.arms.split(",")
    for arm in arms:
        for space in args.spaces.split(","):
            targets, baselines, build = SPACES[space]
            targets = args.targets or targets
            db = []
            if build is not None:
                path = args.out / arm / f"{build[1]}-db"
                if not (path / "manifest.json").is_file():
                    _evopress(["build-db", *build, "--calib-tokens", "8192", "--seq-len", "256", *ARMS[arm][0],
                               "--out", str(path), "--quiet"])
                db = ["--db", str(path)]
            for seed in [int(s) for s in args.seeds.split(",")]:
                out = args.out / arm / space / f"seed-{seed}"
                if (out / "front.json").is_file():
                    continue
                owner = seed == 0 and _baseline_arm(arm, arms) == arm
                _evopress(["pareto", "--space", space, *db, "--targets", targets, "--seed", str(seed),
                           "--generations", str(args.generations), "--baselines", baselines if owner else "",
                           "--eval-data", ",".join(EVAL), *COMMON, *ARMS[arm][0], *ARMS[arm][1], "--out", str(out)])


def _baseline_arm(arm: str, arms: list[str]) -> str:
    """The arm whose seed-0 run holds the baselines for ``arm``'s calibration text."""
    return next(a for a in [*arms, *ARMS] if ARMS[a][0] == ARMS[arm][0])


def _evopress(argv: list[str]) -> None:
    print("evopress " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "evopress", *argv], check=True, env=os.environ)


def table(args: argparse.Namespace) -> None:
    arms = args.arms.split(",")
    lines = []
    for arm in arms:
        for space in args.spaces.split(","):
            fronts = [json.loads(f.read_text()) for f in sorted((args.out / arm / space).glob("seed-*/front.json"))]
            owner = args.out / _baseline_arm(arm, arms) / space / "seed-0" / "front.json"
            if fronts and owner.is_file():
                lines += _space_table(arm, space, fronts, json.loads(owner.read_text()))
    print("\n".join(lines))


def _space_table(arm: str, space: str, fronts: list[dict], baseline_front: dict) -> list[str]:
    head = ["budget", "method", *EVAL, "held-out mean ratio", "worst ratio"]
    lines = [f"\n**{space}, arm `{arm}`** ({' '.join(ARMS[arm][0] + ARMS[arm][1])}; EvoPress: mean of "
             f"{len(fronts)} seed(s))\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for target in fronts[0]["targets"]:
        methods: dict[str, list[dict[str, float]]] = {}
        for front in [*fronts, baseline_front]:
            for method, points in front["methods"].items():
                if (method == "evopress") == (front is baseline_front):
                    continue  # EvoPress from this arm's runs, the baselines from their owner's
                for p in points:
                    if p["target"] == target:
                        methods.setdefault(method, []).append(p["held_out"])
        kl, ppl = ({m: {d: sum(r[d][key] for r in rs) / len(rs) for d in EVAL} for m, rs in methods.items()}
                   for key in ("kl", "ppl"))
        baselines = [m for m in kl if m != "evopress"]
        if not baselines:
            continue
        best = {d: min(kl[b][d] for b in baselines) for d in EVAL}
        for method in sorted(kl, key=lambda m: (m != "evopress", m)):
            ratios = [kl[method][d] / best[d] for d in HELD_OUT]
            runs = [_ratios(r, best) for r in methods[method]]  # per seed: (mean, worst)
            spread = "" if len(runs) == 1 else f" ({min(m for m, _ in runs):.3f}-{max(m for m, _ in runs):.3f})"
            worst = "" if len(runs) == 1 else f" ({min(w for _, w in runs):.3f}-{max(w for _, w in runs):.3f})"
            cells = [f"{target:g}", method, *(f"{kl[method][d]:.4f} ({ppl[method][d]:,.1f})" for d in EVAL),
                     f"{sum(ratios) / len(ratios):.3f}{spread}", f"{max(ratios):.3f}{worst}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ratios(held_out: dict[str, dict[str, float]], best: dict[str, float]) -> tuple[float, float]:
    """One run's mean and worst ratio of its held-out KL to the best baseline's, over the held-out genres."""
    ratios = [held_out[d]["kl"] / best[d] for d in HELD_OUT]
    return sum(ratios) / len(ratios), max(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("run", "table"))
    ap.add_argument("--out", type=Path, default=Path("runs/generalization"))
    ap.add_argument("--arms", default="diverse,paper")
    ap.add_argument("--spaces", default="drop")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--generations", type=int, default=12)
    ap.add_argument("--targets", default=None, help="comma-separated budgets instead of the space's (SPACES)")
    args = ap.parse_args()
    run(args) if args.command == "run" else table(args)


if __name__ == "__main__":
    main()
