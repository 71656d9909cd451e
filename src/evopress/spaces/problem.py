"""The problem the search sees: levels per unit, integer costs and a budget, and the level-switch move.

A ``Problem`` is all the evolutionary search needs: how many levels each unit has, what each level costs,
the budget (exact, or a window below it) and which units may trade levels with each other (``switch``).
``settle`` brings a configuration into a budget window by single-level moves; the joint space's mutation
and every space's ``repair`` use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from fractions import Fraction
from typing import Callable, Sequence

import numpy as np

from ..errors import UserError

Config = tuple[int, ...]


class NoMoveError(RuntimeError):
    """No budget-preserving level switch exists: the budget pins the configuration."""


@dataclass(frozen=True)
class Problem:
    """A discrete configuration problem: ``config[u]`` in ``range(num_levels[u])`` and a budget rule.

    The budget rule: the total cost must lie in ``[budget - slack, budget]``. ``slack`` 0 (the default)
    is the exact rule of the paper's spaces, whose switch groups hold units with equal cost steps. A
    positive slack is for spaces whose units cost unequal amounts (the joint space's byte budget): no
    single up/down pair keeps the total, so ``switch`` repairs it into the window (see ``settle``).

    ``masks`` make a level switch a set of units off: ``(unit, level, members)`` means that while
    ``unit`` is at ``level`` the ``members`` cost nothing and their levels do not matter (a dropped
    sub-block's linear layers). Members of different masks must not overlap. With masks the total
    cost is no longer a plain sum, so ``cost`` and ``delta`` are the only ways to read it.
    """

    num_levels: tuple[int, ...]
    costs: tuple[tuple[int, ...], ...]  # costs[u][level], integers so the budget is exact
    budget: int
    groups: tuple[tuple[int, ...], ...]  # level switches happen inside one group
    slack: int = 0  # feasible totals: [budget - slack, budget]
    masks: tuple[tuple[int, int, tuple[int, ...]], ...] = ()  # (unit, level, members switched off)

    @cached_property
    def _masked_by(self) -> dict[int, int]:
        """Member unit -> index of the mask that can switch it off."""
        return {m: i for i, (_, _, members) in enumerate(self.masks) for m in members}

    @cached_property
    def controllers(self) -> dict[int, list[int]]:
        """Controlling unit -> indices of its masks."""
        out: dict[int, list[int]] = {}
        for i, (unit, _, _) in enumerate(self.masks):
            out.setdefault(unit, []).append(i)
        return out

    def _on(self, config: Sequence[int], mask: int) -> bool:
        unit, level, _ = self.masks[mask]
        return config[unit] == level

    def _members_cost(self, config: Sequence[int], mask: int) -> int:
        return sum(self.costs[m][config[m]] for m in self.masks[mask][2])

    def cost(self, config: Sequence[int]) -> int:
        total = sum(self.costs[u][level] for u, level in enumerate(config))
        return total - sum(self._members_cost(config, i) for i in range(len(self.masks)) if self._on(config, i))

    def active(self, config: Sequence[int], u: int) -> bool:
        """Whether unit ``u``'s level matters (no mask switches it off)."""
        i = self._masked_by.get(u)
        return i is None or not self._on(config, i)

    def delta(self, config: Sequence[int], u: int, level: int) -> int:
        """The change of ``cost(config)`` if unit ``u`` alone moves to ``level``."""
        if not self.active(config, u):
            return 0
        change = self.costs[u][level] - self.costs[u][config[u]]
        for i in self.controllers.get(u, ()):
            on_level = self.masks[i][1]
            if (config[u] == on_level) != (level == on_level):
                change += self._members_cost(config, i) * (1 if config[u] == on_level else -1)
        return change

    def cheapest(self) -> int:
        """A lower bound of the total cost (exact without masks): every mask on, every other unit lowest."""
        off = set(self._masked_by)
        return sum(min(c) for u, c in enumerate(self.costs) if u not in off)

    def feasible(self, config: Sequence[int]) -> bool:
        if not all(0 <= lv < n for lv, n in zip(config, self.num_levels)):
            return False
        return self.budget - self.slack <= self.cost(config) <= self.budget

    def admits_baseline(self, config: Sequence[int]) -> bool:
        """A baseline's answer: feasible, or with a budget window anywhere below it (uniform bits or whole
        blocks move in steps too large to land in a 0.1% window; they must only never exceed the budget)."""
        if self.feasible(config):
            return True
        windowed = bool(self.slack or self.masks)
        in_range = all(0 <= lv < n for lv, n in zip(config, self.num_levels))
        return windowed and in_range and self.cost(config) <= self.budget


BYTE_TOLERANCE = 0.001  # default window of a byte budget: achieved bytes within 0.1% below the target


def check_tolerance(tolerance: float) -> None:
    """Refuse a byte window (``--byte-tolerance``) that is not a fraction of the budget."""
    if not 0 <= tolerance < 1:
        raise UserError(f"--byte-tolerance {tolerance}: a fraction in [0, 1), e.g. 0.001")


def switch(config: list[int], problem: Problem, rng: np.random.Generator) -> None:
    """Move one unit a level up and another unit of the same group a level down, in place.

    The paper's level-switch move. It lives with ``Problem`` because spaces use it too (a random walk
    from a canonical configuration is the only cheap way to sample an exact-budget configuration).
    A problem with a budget window or masks takes ``window_switch`` instead.
    """
    if problem.slack or problem.masks:
        window_switch(config, problem, rng)
        return
    movable = []
    for group in problem.groups:
        ups = [u for u in group if config[u] < problem.num_levels[u] - 1]
        downs = [u for u in group if config[u] > 0]
        if ups and downs and (len(ups) > 1 or len(downs) > 1 or ups != downs):
            movable.append((group, ups, downs))
    if not movable:
        raise NoMoveError("no unit can trade a level with another: the budget leaves nothing to search")
    weights = np.array([len(g) for g, _, _ in movable], dtype=float)
    _, ups, downs = movable[rng.choice(len(movable), p=weights / weights.sum())]
    while True:
        up, down = ups[rng.integers(len(ups))], downs[rng.integers(len(downs))]
        if up != down:
            break
    config[up] += 1
    config[down] -= 1


def _steps(config: Sequence[int], problem: Problem, u: int) -> list[int]:
    return [lv for lv in (config[u] - 1, config[u] + 1) if 0 <= lv < problem.num_levels[u]]


def _cost_step(config: Sequence[int], problem: Problem, u: int, way: int) -> tuple[int, int]:
    """``(level, cost change)``: the nearest level of ``u`` in direction ``way`` that changes the cost
    (``(config[u], 0)`` if none). Levels of equal cost (a combined sparse level can tie a pure one) are
    stepped over, else a repair stalls on the tie."""
    lv = config[u] + way
    while 0 <= lv < problem.num_levels[u]:
        d = problem.delta(config, u, lv)
        if d:
            return lv, d
        lv += way
    return config[u], 0


def window_switch(config: list[int], problem: Problem, rng: np.random.Generator) -> None:
    """The level switch for unequal costs: one random move, then ``settle`` back into the budget window.

    A group is drawn with probability proportional to its size among those with a unit that can move
    (a unit a mask switches off cannot); one of its movable units moves one level up or down (a
    mask's controlling unit thereby switches its members off or back on); the other units of the
    group then settle the total into ``[budget - slack, budget]``. If they cannot, ``config`` is left
    outside the window and the caller's feasibility check rejects it.
    """
    movable = []
    for group in problem.groups:
        units = [u for u in group if problem.active(config, u) and _steps(config, problem, u)]
        if len(units) > 1:
            movable.append(units)
    if not movable:
        raise NoMoveError("no unit can move a level: the budget leaves nothing to search")
    weights = np.array([len(g) for g in movable], dtype=float)
    units = movable[rng.choice(len(movable), p=weights / weights.sum())]
    u = units[rng.integers(len(units))]
    steps = _steps(config, problem, u)
    config[u] = steps[rng.integers(len(steps))]
    settle(config, problem, rng, [v for v in units if v != u])


def settle(config: list[int], problem: Problem, rng: np.random.Generator, units: Sequence[int],
           max_moves: int | None = None, masks: bool = False) -> bool:
    """Move ``units`` one level at a time until the total cost is in the window; True if it got there.

    Each move is drawn at random among the single-level moves of ``units`` that go the right way: one
    landing in the window if any; else one that does not overshoot it; else the smallest overshoot,
    to come back from the other side. Random choice keeps the repairs, and so the children, diverse.
    A mask's controlling unit moves only with ``masks`` (a mutation's repair changes bits, not which
    sub-blocks exist; building a configuration under rules may need to drop some).
    """
    units = [u for u in units if masks or u not in problem.controllers]
    low, high = problem.budget - problem.slack, problem.budget
    cost = problem.cost(config)
    for _ in range(max_moves if max_moves is not None else 4 * len(units) + 16):
        if low <= cost <= high:
            return True
        need_down = cost > high
        moves = [(u, lv, d) for u in units if problem.active(config, u) for way in (-1, 1)
                 for lv, d in [_cost_step(config, problem, u, way)] if (d < 0 if need_down else d > 0)]
        if not moves:
            return False
        landing = [m for m in moves if low <= cost + m[2] <= high]
        short = [m for m in moves if (cost + m[2] > high if need_down else cost + m[2] < low)]
        pool = landing or short or [min(moves, key=lambda m: abs(m[2]))]
        u, lv, d = pool[rng.integers(len(pool))]
        config[u], cost = lv, cost + d
    return low <= cost <= high


def shortest_decimal(near: Fraction, fits: Callable[[Fraction], bool]) -> float | None:
    """The float with the fewest decimals, rounded from ``near``, whose printed value ``fits`` (None if none).

    Spaces read a target back as ``Fraction(str(target))``; a target found from a configuration should
    print as a user would type it (2.25, not 2.2500000000000004) and still give that budget.
    """
    for digits in range(18):
        target = float(round(near, digits))
        if fits(Fraction(str(target))):
            return target
    return None
