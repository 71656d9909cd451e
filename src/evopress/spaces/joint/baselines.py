"""Single-space baselines at the joint space's byte budget: what the joint search must beat.

All three stay at or below the target bytes (they need not reach the 0.1% window: a uniform
bitwidth or a count of whole blocks moves in large steps, and their results report their own bytes).

* ``uniform``: pure quantization, every layer at the highest bitwidth of the database's levels that
  fits, nothing dropped.
* ``depth``: pure depth pruning. "Dense precision" here is the highest bitwidth of the levels (the
  joint space stores no unquantized layer); whole blocks are dropped in ShortGPT order (least
  influential first) until the rest fits.
* ``grid``: best-of-grid combination. For every bitwidth, the fewest whole blocks dropped in ShortGPT
  order and, separately, as the angular-distance run, so that the rest fits at that uniform bitwidth;
  the candidate with the lowest calibration KL on ``inputs.tokens`` tokens wins (uniform bitwidths
  that fit with nothing dropped are candidates too).

Block rankings are the depth space's own (``drop.baselines``), from dense activations. With
``--with-sparsity`` the baselines stay unpruned: they are the single-space references.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from ...errors import UserError
from ..plugin import BaselineInputs
from ..problem import Config
from ..drop.baselines import angular_run, shortgpt_order
from ..random_search import best_of
from .space import JointSpace


def _joint(inputs: BaselineInputs) -> JointSpace:
    space = inputs.space
    if not isinstance(space, JointSpace):
        raise UserError("the joint space's baselines are uniform bitwidths and whole-block drops; they take no --rules")
    return space


def _config(space: JointSpace, bit_index: int, blocks: Iterable[int]) -> Config:
    """Every layer at ``quant.bits[bit_index]`` (unpruned: the baselines are single-space), ``blocks`` dropped."""
    drop = set(blocks)
    return space.compose(space.uniform_levels(bit_index), [(b in drop, b in drop) for b in range(space.num_blocks)])


def _fits(space: JointSpace, config: Config) -> bool:
    return space.problem.cost(config) <= space.problem.budget


def _fewest(space: JointSpace, bit_index: int, blocks_for: Callable[[int], Iterable[int]]) -> Config | None:
    """Uniform ``bit_index`` with the fewest blocks dropped (``blocks_for(k)``) that fits; None if none does."""
    for k in range(space.num_blocks):
        config = _config(space, bit_index, blocks_for(k))
        if _fits(space, config):
            return config
    return None


def _order(inputs: BaselineInputs, space: JointSpace) -> list[int]:
    space.apply(None)
    return shortgpt_order(space.drop, inputs.pool, inputs.pool.first(inputs.tokens), inputs.batch_size)


def uniform(inputs: BaselineInputs) -> Config:
    space = _joint(inputs)
    for level in reversed(range(len(space.quant.bits))):
        config = _config(space, level, ())
        if _fits(space, config):
            return config
    raise UserError(f"every layer at {space.quant.bits[0]} bits is above the target's {space.problem.budget:,} bytes: "
                    "no uniform bitwidth fits (try depth or grid)")


def depth(inputs: BaselineInputs) -> Config:
    space = _joint(inputs)
    order = _order(inputs, space)
    config = _fewest(space, len(space.quant.bits) - 1, lambda k: order[:k])
    if config is None:
        raise UserError("no number of whole blocks dropped fits the target at the highest bitwidth")
    return config


def grid(inputs: BaselineInputs) -> Config:
    space = _joint(inputs)
    order = _order(inputs, space)
    sample = inputs.pool.first(inputs.tokens)
    runs: dict[int, range] = {}

    def angular(k: int) -> range:
        if k not in runs:
            space.apply(None)
            runs[k] = angular_run(space.drop, inputs.pool, sample, k, inputs.batch_size) if k else range(0)
        return runs[k]

    candidates: dict[Config, None] = {}
    for level in range(len(space.quant.bits)):
        for blocks_for in (lambda k: order[:k], angular):
            config = _fewest(space, level, blocks_for)
            if config is not None:
                candidates.setdefault(config)
    if not candidates:
        raise UserError("no uniform bitwidth with whole blocks dropped fits the target")
    return best_of(inputs, list(candidates), np.random.default_rng(inputs.seed))
