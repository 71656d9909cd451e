"""Baselines on a run's context: their configurations, made once per context, and their results."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ..distributed import is_main, sharded
from ..spaces import baseline
from ..spaces.plugin import BaselineInputs
from ..spaces.problem import Config
from .context import Context
from .outputs import result_record, save_result


def baseline_inputs(ctx: Context) -> BaselineInputs:
    r = ctx.recipe
    return BaselineInputs(ctx.space, sharded(ctx.evaluator), ctx.pool, r.baseline_tokens, r.search.seed,
                          r.random_candidates, r.fitness.windows_per_batch(ctx.pool.seq_len))


def baseline_config(ctx: Context, method: str) -> tuple[Config, float]:
    """A baseline's configuration on this context and the seconds it took to make, made once.

    Why: ``pareto`` warm-starts each budget's search from its baselines (``--init-from``) and then
    reports the same baselines on the front; a scoring baseline (quant DP measures every layer at every
    level) would otherwise run twice per budget. A context that shares this one's model, space, pool and
    budget (``dataclasses.replace`` with another recipe) shares the record; the key holds what else a
    baseline reads from the recipe.
    """
    inputs = baseline_inputs(ctx)
    key = (method, inputs.tokens, inputs.seed, inputs.candidates, inputs.batch_size)
    if key not in ctx.baseline_runs:
        start = time.perf_counter()
        config = baseline(ctx.recipe.space, method)(inputs)
        ctx.baseline_runs[key] = (config, time.perf_counter() - start)
    return ctx.baseline_runs[key]


def run_baseline(ctx: Context, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    recipe = ctx.recipe
    config, seconds = baseline_config(ctx, recipe.method)  # refuses an unknown method
    result = result_record(ctx, config, [], seconds)
    if is_main():
        save_result(ctx.space, Path(out), result)
    return result
