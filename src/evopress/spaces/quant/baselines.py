"""Quantization baselines at the search's exact bit budget.

* Uniform GPTQ: every layer at the target bitwidth (integer targets whose uniform configuration meets
  the budget exactly, i.e. weight-bit accounting).
* DP over per-layer errors (the SPDY-style baseline): assume errors add up and pick, per layer, the
  bitwidth minimising the sum of per-layer relative output errors tr(dW H dW^T) / tr(W H W^T) (stored
  in the database) subject to the *exact* budget, by a multiple-choice knapsack DP. Unlike the
  reference script it handles fractional targets, and unlike the search it may move bits between
  layer groups (attention vs MLP), because the budget is global.

Both respect deployment rules (``ConstrainedSpace``): a tied group is one DP item whose error is the
sum of its members', and pinned or bounded layers only offer their allowed levels.
"""

from __future__ import annotations

from ...errors import UserError
from ..plugin import BaselineInputs
from ..problem import Config
from ..space import Space
from ..constraints import ConstrainedSpace
from .levels import exact_knapsack
from .space import QuantSpace


def _quant(space: Space) -> QuantSpace:
    quant = space.model_space
    assert isinstance(quant, QuantSpace)
    return quant


def uniform(inputs: BaselineInputs) -> Config:
    quant = _quant(inputs.space)
    level = quant.uniform_level()
    if level is None:
        raise UserError(f"uniform needs a target that one bitwidth meets exactly; {quant.target:g} "
                        f"({quant.accounting()}) is not {list(quant.bits)} (use dp or random for this target)")
    return inputs.space.from_model_levels((level,) * len(quant.units))


def error_table(space: Space) -> list[list[float]]:
    """Per unit of ``space`` and level, the database's per-layer error (summed over tied members)."""
    quant = _quant(space)
    errors = quant.db.manifest["errors"]
    table = [[errors[name][str(b)] for b in quant.bits] for name in quant.units]
    if not isinstance(space, ConstrainedSpace):
        return table
    return [[sum(table[u][lo + lv] for u in members) for lv in range(hi - lo + 1)]
            for members, (lo, hi) in zip(space.members, space.ranges)]


def dp(inputs: BaselineInputs) -> Config:
    problem = inputs.space.problem
    config = exact_knapsack(problem.costs, error_table(inputs.space), problem.budget)
    if config is None:
        raise UserError("no configuration meets the budget exactly under these rules")
    return config
