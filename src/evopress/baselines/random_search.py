"""Best-of-N random search: the cheapest black-box baseline, for any space."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..spaces.base import Config

if TYPE_CHECKING:
    from ..pipeline import Context


def best_of(ctx: "Context", configs: list[Config], rng: np.random.Generator) -> Config:
    """The best of ``configs`` on one shared calibration sample of ``baseline_tokens`` tokens."""
    if len(configs) == 1:
        return configs[0]
    scores = ctx.evaluator.score(configs, ctx.evaluator.sample(ctx.recipe.baseline_tokens, rng))
    return configs[int(np.argmin(scores))]


def best_of_random(ctx: "Context") -> Config:
    """The best of N random feasible configurations on one shared calibration sample."""
    rng = np.random.default_rng(ctx.recipe.search.seed)
    return best_of(ctx, ctx.space.random_configs(rng, ctx.recipe.random_candidates), rng)
