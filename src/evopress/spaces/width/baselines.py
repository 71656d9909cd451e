"""Width baselines at the search's parameter budget.

* ``uniform``: every attention and MLP at the target's kept fraction, as near as its levels allow
  (``WidthSpace.uniform_config``). On a database built with ``--method activation`` this is the
  training-free importance baseline (Minitron-style: heads and channels ranked by activation norm, the
  same width everywhere, no weight update); on the default OBS database it is uniform width with OBS.
* ``shortgpt``: depth pruning inside the width space. Whole blocks go in ShortGPT's order (least block
  influence first) until the budget holds; the units of the removed blocks are then raised back, one
  level at a time, into the budget window. Why here: the width space contains every depth profile, and
  with this as a warm start next to ``uniform`` the search starts from both answers to "drop blocks or
  thin them?", so on its calibration text it can only end better than both.
* Depth pruning in its own space at equal parameters (``--space drop``: its search and ShortGPT) is
  compared in ``benchmarks/width.sh``.
"""

from __future__ import annotations

import numpy as np

from ..constraints import in_space
from ..drop.baselines import shortgpt_order
from ..plugin import BaselineInputs
from ..problem import Config, settle
from ..space import Space
from .space import WidthSpace


def _width(space: Space) -> WidthSpace:
    model = space.model_space
    assert isinstance(model, WidthSpace)
    return model


def uniform(inputs: BaselineInputs) -> Config:
    return in_space(inputs.space, _width(inputs.space).uniform_config(), inputs.seed)


def shortgpt(inputs: BaselineInputs) -> Config:
    space = _width(inputs.space)
    p, rng = space.problem, np.random.default_rng(inputs.seed)
    config = [n - 1 for n in p.num_levels]
    removed: list[int] = []
    for b in shortgpt_order(space, inputs.pool, inputs.pool.first(inputs.tokens), inputs.batch_size):
        if p.cost(config) <= p.budget:
            break
        units = [u for u, unit in enumerate(space.wunits) if unit.block == b]
        removed += units
        for u in units:
            config[u] = 0
    settle(config, p, rng, removed)
    return in_space(inputs.space, tuple(config), inputs.seed)
