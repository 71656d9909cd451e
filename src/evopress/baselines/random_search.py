"""Best-of-N random search: the cheapest black-box baseline, for any space."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..spaces.base import Config

if TYPE_CHECKING:
    from ..pipeline import Context


def best_of_random(ctx: "Context") -> Config:
    """The best of N random feasible configurations on one shared calibration sample."""
    r = ctx.recipe
    rng = np.random.default_rng(r.search.seed)
    configs = ctx.space.initial_configs(rng, r.random_candidates)
    scores = ctx.evaluator.score(configs, ctx.evaluator.sample(r.baseline_tokens, rng))
    return configs[int(np.argmin(scores))]
