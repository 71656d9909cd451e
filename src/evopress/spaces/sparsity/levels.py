"""Sparsity level arithmetic: the level grids, the exact non-zero budget, the nearest feasible profile.

Pure functions (no model, no database): the budget's exactness is tested on these. See the package
docstring for the scheme.
"""

from __future__ import annotations

import heapq
from fractions import Fraction
from typing import Sequence

from ..problem import Config, Problem

def default_step(numels: Sequence[int]) -> int:
    """Δ = min(largest layer / 50, smallest layer / 4).

    The first term is the paper's scale (1e6 weights for 45-59M-weight MLP layers: the largest layers
    move about 2% sparsity per level); the second keeps the smallest layers (GQA k/v) at steps of at
    most 25%, so they still get a few levels. SmolLM2-135M: min(884,736/50, 110,592/4) = 17,694
    (2% for MLP, 5.3% for q/o, 16% for k/v).
    """
    return max(1, min(max(numels) // 50, min(numels) // 4))


def level_grid(numel: int, center: float, step: int, levels: int) -> tuple[int, list[int]]:
    """(first offset, zero counts) of one layer: ``round(center * numel) + l * step`` inside [0, numel]."""
    mid = round(Fraction(str(center)) * numel)
    offsets = [l for l in range(-levels, levels + 1) if 0 <= mid + l * step <= numel]
    return offsets[0], [mid + l * step for l in offsets]


def nearest_total(zeros: Sequence[Sequence[int]], step: int, target_zeros: Fraction) -> int:
    """Number of level steps above the all-minimum configuration whose total is nearest the target.

    Reachable totals are ``sum(min zeros) + k * step`` for every ``k`` from 0 to the sum of the units'
    level counts minus one, because each unit's levels are contiguous. Raises if the target lies more
    than half a step outside that range.
    """
    low = sum(z[0] for z in zeros)
    top = sum(len(z) - 1 for z in zeros)
    if target_zeros < low - Fraction(step, 2) or target_zeros > low + top * step + Fraction(step, 2):
        raise ValueError("target outside the database range")
    return min(max(round((target_zeros - low) / step), 0), top)


def sparsity_problem(numels: Sequence[int], zeros: Sequence[Sequence[int]], step: int, target_zeros: Fraction,
                     group_rule: str = "global") -> tuple[Problem, int]:
    """The search problem (costs: non-zeros per level) and its total level steps, from the level grids.

    Raises ValueError when the target is outside the grids' range (see ``nearest_total``).
    """
    steps = nearest_total(zeros, step, target_zeros)
    costs = tuple(tuple(n - z for z in zs) for n, zs in zip(numels, zeros))
    budget = sum(numels) - (sum(z[0] for z in zeros) + steps * step)
    if group_rule == "global":
        groups: tuple[tuple[int, ...], ...] = (tuple(range(len(numels))),)
    else:
        by_size: dict[int, list[int]] = {}
        for u, n in enumerate(numels):
            by_size.setdefault(n, []).append(u)
        groups = tuple(tuple(g) for g in by_size.values())
    problem = Problem(num_levels=tuple(len(z) for z in zeros), costs=costs, budget=budget, groups=groups)
    return problem, steps


def nearest_levels(zeros: Sequence[Sequence[int]], numels: Sequence[int], step: int, wanted: Sequence[float],
                   total: int) -> Config:
    """Level indices with ``sum == total`` minimising ``sum_u (z_u - wanted_u)^2 / n_u`` (n_u: layer size).

    ``wanted`` are desired zero counts. In level units the cost of unit ``u`` is convex,
    ``(l - ideal_u)^2 / n_u``, and separable, so starting from every unit's own best level and taking
    the cheapest single steps towards the required total is optimal. Dividing by ``n_u`` measures the
    error in sparsity (not weights), weighted by layer size: rounding slack goes to the large layers,
    where a step changes sparsity least.
    """
    ideal = [(w - z[0]) / step for w, z in zip(wanted, zeros)]
    config = [min(max(round(i), 0), len(z) - 1) for i, z in zip(ideal, zeros)]
    need = total - sum(config)
    sign = 1 if need > 0 else -1

    def marginal(u: int) -> float:
        lv = config[u]
        return ((lv + sign - ideal[u]) ** 2 - (lv - ideal[u]) ** 2) / numels[u]

    heap = [(marginal(u), u) for u in range(len(zeros)) if 0 <= config[u] + sign < len(zeros[u])]
    heapq.heapify(heap)
    for _ in range(abs(need)):
        _, u = heapq.heappop(heap)
        config[u] += sign
        if 0 <= config[u] + sign < len(zeros[u]):
            heapq.heappush(heap, (marginal(u), u))
    return tuple(config)
