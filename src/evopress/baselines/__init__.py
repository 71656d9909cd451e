"""Baselines: configurations at the same budget as the search, found without search.

Each is a function ``(Context) -> Config`` registered per space; the CLI and pipeline only see this table.
"""

from typing import TYPE_CHECKING, Callable

from ..spaces.base import Config
from . import drop, quant, sparsity
from .random_search import best_of_random

if TYPE_CHECKING:
    from ..pipeline import Context

Baseline = Callable[["Context"], Config]

BASELINES: dict[str, dict[str, Baseline]] = {
    "drop": {"shortgpt": drop.shortgpt, "angular": drop.angular, "random": best_of_random},
    "quant": {"uniform": quant.uniform, "dp": quant.dp, "random": best_of_random},
    "sparsity": {"uniform": sparsity.uniform, "owl": sparsity.owl, "random": best_of_random},
}


def baseline_methods(space: str) -> list[str]:
    return list(BASELINES.get(space, {}))
