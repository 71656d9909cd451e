"""Time to quality: how long until a depth search's profile is as good as the reference's after 20 generations.

Issue 18's measure, on the embedded default model (SmolLM2-135M, CPU): depth 25% of sub-blocks,
8 offspring, stages ``2:256,1:2048``, a pool of 32 windows of 512 calibration tokens, 16 initial
candidates, seeds 0, 1, 2. Both modes see the same calibration and held-out text.

* ``naive``: the reference's evaluator (``benchmarks/speed.py``'s ``ReferenceEvaluator``: from the
  embeddings, one window at a time, full-vocabulary teacher log-probs in RAM) and initialisation
  (random candidates only), 20 generations. The held-out KL of its final profile is recorded.
* ``ours``: our defaults: the evaluator (batches, prefix reuse, hidden-space KL) and the initial
  population warm-started from the scoring baselines (the depth space's ``--init-from auto``,
  i.e. shortgpt,angular), with the same schedule, run for the naive run's wall time with the same seed. After every generation the parent's
  held-out KL is measured outside the timed search (the clock is paused), so the trace says when it
  first reaches the naive runs' median final KL: the same as stopping the search there, since a
  search never looks ahead.
* ``ours-cold``: as ``ours`` but random initialisation (``--init-from none``), like the naive mode
  (what the evaluator alone buys).

Timed: from the start of the run's set-up (baselines, teacher pass over the pool, initial ranking)
to the end of a generation; model loading and the held-out teacher are not. Both wall time and the
process's CPU time (all threads) are recorded, since other jobs share the machine; modes are
interleaved per seed so that contention hits them alike. Held-out: the first 40 windows of 512
tokens of the Wikipedia evaluation split; PPL = exp(mean NLL), KL = mean KL(dense || candidate).

    echo -19 > /proc/self/autogroup
    python benchmarks/time_to_quality.py --workdir runs/ttq --out runs/ttq/summary.json

Each (mode, seed) runs in its own process and writes ``WORKDIR/MODE-SEED.json``; an existing file is
reused, so an interrupted benchmark continues where it stopped (delete the files to re-measure).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("naive", "ours", "ours-cold")
GENERATIONS = 20
BIG = 10**6  # "ours" runs to a wall-time budget, not to a generation count


class _OutOfTime(Exception):
    pass


class Clock:
    """Wall and process CPU time of the timed part of a run; ``paused`` leaves a held-out evaluation out."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        self.skipped_wall = self.skipped_cpu = 0.0

    def read(self) -> tuple[float, float]:
        return (time.perf_counter() - self.wall0 - self.skipped_wall,
                time.process_time() - self.cpu0 - self.skipped_cpu)

    def paused(self, fn, *args):
        w, c = time.perf_counter(), time.process_time()
        try:
            return fn(*args)
        finally:
            self.skipped_wall += time.perf_counter() - w
            self.skipped_cpu += time.process_time() - c


def recipe_for(mode: str, seed: int):
    from evopress.evolution import SearchConfig
    from evopress.recipe import Recipe

    search = SearchConfig(generations=GENERATIONS if mode == "naive" else BIG, offspring=8,
                          stages=[(2, 256), (1, 2048)], initial_candidates=16, seed=seed)
    random_start = {} if mode == "ours" else {"init_from": []}  # ours: the default initialisation, as users get it
    return Recipe(space="drop", target=0.25, data="wiki", seq_len=512, calib_tokens=32 * 512, search=search,
                  track_every=0, **random_start)


def run_mode(args: argparse.Namespace) -> dict:
    """One search, timed, with the held-out KL of its parents (naive: of the final one only)."""
    import torch

    from evopress.evaluate import EvalSettings, HeldOut
    from evopress.evolution import evolve
    from evopress.fitness import FitnessConfig
    from evopress.pipeline import _initial_population, prepare

    mode, seed = args.mode, args.seed
    recipe = recipe_for(mode, seed)
    ctx = prepare(recipe, log=lambda m: None)
    held = HeldOut(ctx.loaded, ctx.decoder, EvalSettings(data=["wiki"], tokens=40 * 512, seq_len=512,
                                                         batch_size=8))
    held.teachers["wiki"].ensure(range(40), ctx.space)  # the held-out teacher, before any clock starts
    if mode == "naive":
        sys.path.insert(0, str(Path(__file__).parent))
        from speed import ReferenceEvaluator

        ctx.evaluator = ReferenceEvaluator(ctx.space, ctx.pool, FitnessConfig(prefix_reuse=False, batch_size=1))
    cache: dict[tuple, dict] = {}

    def held_out(config) -> dict:
        if config not in cache:
            m = held.measure(ctx.space, config)["wiki"]
            cache[config] = {"kl": m["kl"], "ppl": m["ppl"]}
        return cache[config]

    trace: list[dict] = []
    clock = Clock()

    def on_generation(state) -> None:
        wall, cpu = clock.read()
        row = {"generation": state.generation, "wall": wall, "cpu": cpu, "fitness": state.fitness,
               "parent": list(state.parent)}
        if mode != "naive":
            row.update(clock.paused(held_out, state.parent))
        trace.append(row)
        print(json.dumps({"mode": mode, "seed": seed, **row}), file=sys.stderr, flush=True)  # progress
        if args.budget and wall >= args.budget:
            raise _OutOfTime

    initial = _initial_population(ctx, True, lambda m: None)
    setup_start = clock.read()
    ctx.evaluator.warm()
    teacher_wall, teacher_cpu = (b - a for a, b in zip(setup_start, clock.read()))
    try:
        evolve(ctx.space.problem, ctx.evaluator, initial, recipe.search, None, on_generation)
    except _OutOfTime:
        pass
    final = clock.paused(held_out, tuple(trace[-1]["parent"]))
    return {"mode": mode, "seed": seed, "threads": torch.get_num_threads(), "initial_candidates": len(initial),
            "teacher_setup_wall": teacher_wall, "teacher_setup_cpu": teacher_cpu, "trace": trace,
            "final": {**trace[-1], **final}, "budget": args.budget}


def child(args: argparse.Namespace, mode: str, seed: int, budget: float | None) -> dict:
    path = Path(args.workdir) / f"{mode}-{seed}.json"
    if not path.is_file():
        cmd = [sys.executable, __file__, "--mode", mode, "--seed", str(seed)]
        if budget:
            cmd += ["--budget", str(budget)]
        env = {**os.environ, "EVOPRESS_DB_CACHE_GB": "0"} if mode == "naive" else None
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(out.strip().splitlines()[-1] + "\n")
        print(f"{mode} seed {seed}: done", file=sys.stderr, flush=True)
    return json.loads(path.read_text())


def first_reaching(run: dict, target: float) -> dict | None:
    """The first generation whose parent's held-out KL is at or below ``target``."""
    return next((r for r in run["trace"] if r["kl"] <= target), None)


def at_time(run: dict, wall: float) -> dict:
    """The parent at a wall time: the last generation that finished by then."""
    done = [r for r in run["trace"] if r["wall"] <= wall]
    return done[-1] if done else run["trace"][0]


def summarise(runs: dict[str, dict[int, dict]]) -> dict:
    """Per mode and seed: time to the naive runs' median final held-out KL, and quality at the naive wall time."""
    naive = runs["naive"]
    target = statistics.median(n["final"]["kl"] for n in naive.values())
    out: dict = {"target_kl": target, "naive_seeds": sorted(naive), "modes": {}}
    for mode in [m for m in runs if m != "naive"]:
        rows = []
        for s in sorted(s for s in runs[mode] if s in naive):
            n, o = naive[s]["final"], runs[mode][s]
            hit = first_reaching(o, target)
            same = at_time(o, n["wall"])
            rows.append({
                "seed": s, "naive_wall": n["wall"], "naive_cpu": n["cpu"], "naive_kl": n["kl"], "naive_ppl": n["ppl"],
                "reached_generation": hit and hit["generation"], "wall_to_quality": hit and hit["wall"],
                "cpu_to_quality": hit and hit["cpu"],
                "wall_ratio": hit and n["wall"] / hit["wall"], "cpu_ratio": hit and n["cpu"] / hit["cpu"],
                "same_wall_generation": same["generation"], "same_wall_kl": same["kl"], "same_wall_ppl": same["ppl"],
                "generations_in_budget": o["trace"][-1]["generation"]})
        # a seed that never reached the target within the naive run's time counts as ratio < 1 (0 here)
        out["modes"][mode] = {
            "per_seed": rows,
            "median_wall_ratio": statistics.median(r["wall_ratio"] or 0.0 for r in rows),
            "median_cpu_ratio": statistics.median(r["cpu_ratio"] or 0.0 for r in rows)}
    return out


def saved_runs(workdir: Path) -> dict[str, dict[int, dict]]:
    """Every finished run in ``workdir``, by mode and seed."""
    runs: dict[str, dict[int, dict]] = {m: {} for m in MODES}
    for path in Path(workdir).glob("*-*.json"):
        mode, _, seed = path.stem.rpartition("-")
        if mode in runs and seed.isdigit():
            runs[mode][int(seed)] = json.loads(path.read_text())
    return {m: r for m, r in runs.items() if r}


def markdown(summary: dict) -> str:
    """The per-seed table of docs/speed.md, from a summary."""
    lines = [f"target: median final held-out KL of naive seeds {summary['naive_seeds']}: {summary['target_kl']:.4f}", "",
             "| mode | seed | naive: wall / CPU s | naive KL / PPL | reached at gen | wall / CPU s to target "
             "| ratio wall / CPU | same wall: gen, KL / PPL |", "|---|---|---|---|---|---|---|---|"]
    for mode, d in summary["modes"].items():
        for r in d["per_seed"]:
            hit = (f"{r['reached_generation']} | {r['wall_to_quality']:.0f} / {r['cpu_to_quality']:.0f} | "
                   f"{r['wall_ratio']:.2f}x / {r['cpu_ratio']:.2f}x") if r["wall_to_quality"] else "not reached | - | -"
            lines.append(f"| {mode} | {r['seed']} | {r['naive_wall']:.0f} / {r['naive_cpu']:.0f} | "
                         f"{r['naive_kl']:.3f} / {r['naive_ppl']:.1f} | {hit} | {r['same_wall_generation']}, "
                         f"{r['same_wall_kl']:.3f} / {r['same_wall_ppl']:.1f} |")
        lines.append(f"| {mode} | median | | | | | {d['median_wall_ratio']:.2f}x / {d['median_cpu_ratio']:.2f}x | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="'' (empty): only summarise the runs in --workdir")
    p.add_argument("--modes", default="naive,ours", help=f"comma-separated, from {', '.join(MODES)}; naive always runs")
    p.add_argument("--workdir", default="runs/ttq")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    seeds = [int(s) for s in args.seeds.split(",") if s]
    modes = ["naive"] + [m for m in args.modes.split(",") if m and m != "naive"]
    for s in seeds:  # interleaved, so contention from other jobs hits every mode alike
        naive = child(args, "naive", s, None)
        for m in modes[1:]:
            child(args, m, s, naive["final"]["wall"])
    summary = summarise(saved_runs(Path(args.workdir)))  # the target: the median over all naive runs there
    text = json.dumps(summary, indent=2)
    print(text)
    print(markdown(summary), file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
