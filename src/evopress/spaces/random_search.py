"""Best-of-N random search: the cheapest black-box baseline, offered by every space."""

from __future__ import annotations

import numpy as np

from .plugin import BaselineInputs

from .problem import Config


def best_of(inputs: BaselineInputs, configs: list[Config], rng: np.random.Generator) -> Config:
    """The best of ``configs`` on one shared calibration sample of ``inputs.tokens`` tokens."""
    if len(configs) == 1:
        return configs[0]
    scores = inputs.evaluator.score(configs, inputs.evaluator.sample(inputs.tokens, rng))
    return configs[int(np.argmin([float(s) for s in scores]))]


def best_of_random(inputs: BaselineInputs) -> Config:
    """The best of N random feasible configurations on one shared calibration sample."""
    rng = np.random.default_rng(inputs.seed)
    return best_of(inputs, inputs.space.random_configs(rng, inputs.candidates), rng)
