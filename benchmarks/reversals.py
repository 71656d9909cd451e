"""How often a search's generation winner is reversed on a fresh calibration sample of the last stage's size.

    python benchmarks/reversals.py RUN_DIR [--samples 8] [--tokens T] [--seed 0] [--json PATH]

Why: the last stage's sample is small; a winner that only met easier windows would be reversed on another
sample of that size. For every generation whose parent changed, the old and the new parent are scored
together (common random numbers) on ``--samples`` fresh samples of ``--tokens`` tokens (default: the last
stage's) drawn from the run's calibration pool with the project's own Evaluator; a sample on which the
old parent scores strictly lower is a reversal. RUN_DIR is a finished (or checkpointed) search's --out:
its recipe.json (read through ``make_recipe``, which fills settings newer than the run) and checkpoint.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from evopress.evolution import SearchState
from evopress.io import read_json
from evopress.pipeline.context import prepare
from evopress.pipeline.outputs import CHECKPOINT, RECIPE
from evopress.recipe import make_recipe


def changes(state: SearchState) -> list[tuple[int, tuple, tuple]]:
    """(generation, old parent, new parent) for every generation g >= 1 whose parent changed."""
    h = state.history
    return [(h[i].generation, tuple(h[i - 1].parent), tuple(h[i].parent))
            for i in range(1, len(h)) if h[i].generation >= 1 and h[i].parent != h[i - 1].parent]


def measure(run: Path, samples: int, tokens: int | None, seed: int) -> dict[str, Any]:
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731 - the project's progress lines, off stdout
    raw, saved = read_json(run / RECIPE), read_json(run / CHECKPOINT)
    recipe = make_recipe(raw)
    if saved.get("fingerprint") != recipe.fingerprint():
        # a run older than a setting did what Recipe.identity says every run did before it: score it so
        older = make_recipe({**raw, "fitness": {"aggregate": "tokens", **(raw.get("fitness") or {})},
                             "search": {"accept_sigmas": 0.0, **(raw.get("search") or {})}})
        if older.fingerprint() == saved.get("fingerprint"):
            recipe = older
            log("recipe.json predates fitness.aggregate / search.accept_sigmas: scoring with the values "
                "the run was searched with (aggregate tokens), which match its checkpoint's fingerprint")
        else:
            log(f"warning: {run}/{CHECKPOINT} was made with other settings than recipe.json read by this "
                "code gives; scoring with the latter")
    state = SearchState.from_json(saved["state"])
    initial = state.contenders[0]  # the initial winner (SearchState.from_json reads older checkpoints too)
    tokens = tokens or recipe.search.stages[-1][1]
    ctx = prepare(recipe, log)
    if len(ctx.pool.names) > 1 and ctx.evaluator.config.aggregate != "tokens":
        # as run_search does: per-source aggregates are relative to the initial winner on the final sample
        ctx.evaluator.set_reference(initial, ctx.pool.first(recipe.final_tokens))
    rng = np.random.default_rng(seed)
    rows = []
    for generation, old, new in changes(state):
        if not (ctx.space.problem.feasible(old) and ctx.space.problem.feasible(new)):
            log(f"warning: generation {generation}: a parent is not feasible in this code's space")
        pairs = [[float(s) for s in ctx.evaluator.score([old, new], ctx.pool.sample(tokens, rng))]
                 for _ in range(samples)]
        o, n = np.array(pairs).T
        rows.append({"generation": generation, "old_mean": float(o.mean()), "new_mean": float(n.mean()),
                     "reversals": int((o < n).sum()), "samples": samples,
                     "old": o.tolist(), "new": n.tolist()})
        log(f"generation {generation}: {rows[-1]['reversals']}/{samples} reversed")
    total = sum(r["reversals"] for r in rows)
    majority = sum(r["reversals"] * 2 > samples for r in rows)
    return {"run": str(run), "tokens": tokens, "samples": samples, "seed": seed, "metric": recipe.fitness.metric,
            "aggregate": recipe.fitness.aggregate,
            "changes": rows, "reversals": total, "comparisons": samples * len(rows),
            "majority_reversed": majority, "majority_share": majority / len(rows) if rows else None}


def table(r: dict[str, Any]) -> str:
    lines = ["| generation | old parent mean | new parent mean | reversals/K |", "|---:|---:|---:|---:|"]
    lines += [f"| {c['generation']} | {c['old_mean']:.4f} | {c['new_mean']:.4f} | {c['reversals']}/{c['samples']} |"
              for c in r["changes"]]
    n = len(r["changes"])
    share = "n/a" if r["majority_share"] is None else f"{r['majority_share']:.0%}"
    rate = f" ({r['reversals'] / r['comparisons']:.0%})" if r["comparisons"] else ""
    lines.append(f"\n{n} parent changes, {r['tokens']}-token samples: {r['reversals']}/{r['comparisons']} "
                 f"comparisons reversed{rate}; majority of samples reversed in {r['majority_reversed']}/{n} "
                 f"changes ({share})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="a search's output directory (recipe.json, checkpoint.json)")
    p.add_argument("--samples", "-k", type=int, default=8, help="fresh samples per parent change (K)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per sample (default: the last stage's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples' numpy rng")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    a = p.parse_args(argv)
    start = time.perf_counter()
    r = measure(a.run, a.samples, a.tokens, a.seed)
    r["seconds"] = time.perf_counter() - start
    print(table(r))
    if a.json:
        a.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
