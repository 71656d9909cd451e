"""Best-of-N random search: the cheapest black-box baseline, for any space."""

from __future__ import annotations

import numpy as np

from ..fitness import Evaluator
from ..spaces.base import Config


def best_of_random(evaluator: Evaluator, n: int, tokens: int, rng: np.random.Generator) -> Config:
    """The best of ``n`` random feasible configurations on one shared ``tokens``-token sample."""
    configs = evaluator.space.initial_configs(rng, n)
    scores = evaluator.score(configs, evaluator.sample(tokens, rng))
    return configs[int(np.argmin(scores))]
