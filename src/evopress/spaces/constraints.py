"""Deployment constraints on any space: pin modules to a level, bound their levels, tie fused ones.

Rules target modules by name, exactly or with an llm-compressor style ``re:`` regex, and speak in the
space's level labels (bits for quant, 1 = dropped for depth):

    rules:
      - {match: "re:.*layers\\.0\\..*", pin: 0}            # never drop anything in block 0
      - {match: "re:.*mlp\\.down_proj", min: 3, max: 6}     # keep down_proj between 3 and 6 bits
      - {match: "re:.*self_attn\\.[qkv]_proj", tie: true}   # q/k/v of a block share one level (fused QKV)

The wrapper presents the search with "super-units": each tie group of one block is one unit whose
cost is the sum of its members', pinned and bounded units have only their allowed levels. Switches
happen between super-units of the same original switch group whose level steps cost the same, so the
budget stays exact. Results keep speaking of the model's own modules (``model_units`` and
``to_model_levels``), so export, evaluation and text configs are unchanged.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import UserError
from .problem import Config, Problem
from .space import Space


@dataclass(frozen=True)
class Rule:
    match: str
    pin: Any = None
    min: Any = None
    max: Any = None
    tie: bool = False

    def matches(self, name: str) -> bool:
        if self.match.startswith("re:"):
            return re.fullmatch(self.match[3:], name) is not None
        return name == self.match


def parse_rules(data: Any) -> list[Rule]:
    if not isinstance(data, list):
        raise UserError("rules must be a list of {match, pin | min | max | tie} mappings")
    try:
        rules = [Rule(**r) for r in data]
    except TypeError as e:
        raise UserError(f"bad rule: {e}") from e
    for r in rules:
        if r.match.startswith("re:"):
            try:
                re.compile(r.match[3:])
            except re.error as e:
                raise UserError(f"rule '{r.match}': bad regex ({e})") from e
    return rules


class ConstrainedSpace(Space):
    def __init__(self, base: Space, rules: list[Rule]):
        self.base = base
        self.rules = rules
        self.name = base.name  # type: ignore[misc]
        self.num_blocks = base.num_blocks
        self.decoder = getattr(base, "decoder", None)
        self.target = getattr(base, "target", None)
        self.members = self._tie_groups()
        self.ranges = [self._allowed(m) for m in self.members]
        self.units = ["+".join(base.units[u] for u in m) for m in self.members]
        self.unit_block = [base.unit_block[m[0]] for m in self.members]
        p = base.problem
        costs = tuple(tuple(sum(p.costs[u][lv] for u in m) for lv in range(lo, hi + 1))
                      for m, (lo, hi) in zip(self.members, self.ranges))
        self.problem = Problem(tuple(hi - lo + 1 for lo, hi in self.ranges), costs, p.budget,
                               self._groups(costs), p.slack, self._masks())
        if not self.problem.cheapest() <= p.budget or sum(max(c) for c in costs) < p.budget - p.slack:
            raise UserError("the rules make the budget impossible to meet; relax pins or bounds")

    # --- structure -------------------------------------------------------------------------------
    def _tie_groups(self) -> list[list[int]]:
        base = self.base
        groups: dict[tuple, list[int]] = {}
        for u, name in enumerate(base.units):
            tie = next((i for i, r in enumerate(self.rules) if r.tie and r.matches(name)), None)
            key = ("tie", tie, base.unit_block[u]) if tie is not None else ("unit", u)
            groups.setdefault(key, []).append(u)
        out = sorted(groups.values(), key=lambda m: m[0])
        for m in out:
            labels = {tuple(map(str, base.level_labels(u))) for u in m}
            if len(labels) > 1:
                raise UserError(f"cannot tie {', '.join(base.units[u] for u in m)}: their levels differ")
        return out

    def _level(self, u: int, label: Any, rule: Rule) -> int:
        labels = [str(x) for x in self.base.level_labels(u)]
        if str(label) not in labels:
            raise UserError(f"rule '{rule.match}': level {label} is not one of {', '.join(labels)} "
                            f"for {self.base.units[u]}")
        return labels.index(str(label))

    def _allowed(self, members: list[int]) -> tuple[int, int]:
        lo, hi = 0, self.base.problem.num_levels[members[0]] - 1
        for rule in self.rules:
            for u in members:
                if not rule.matches(self.base.units[u]):
                    continue
                if rule.pin is not None:
                    lv = self._level(u, rule.pin, rule)
                    lo, hi = max(lo, lv), min(hi, lv)
                if rule.min is not None:
                    lo = max(lo, self._level(u, rule.min, rule))
                if rule.max is not None:
                    hi = min(hi, self._level(u, rule.max, rule))
        if lo > hi:
            raise UserError(f"rules leave no level for {'+'.join(self.base.units[u] for u in members)}")
        return lo, hi

    def _masks(self) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
        """The base problem's masks in super-units; a mask whose level the rules forbid is never on."""
        where = {u: s for s, m in enumerate(self.members) for u in m}
        out = []
        for unit, level, members in self.base.problem.masks:
            s = where[unit]
            lo, hi = self.ranges[s]
            supers = sorted({where[m] for m in members})
            if any(not set(self.members[t]) <= set(members) for t in supers):
                raise UserError("a tie joins layers that are switched off separately (e.g. across an attention and "
                                "an MLP sub-block that may be dropped); tie layers of one sub-block only")
            if lo <= level <= hi:
                out.append((s, level - lo, tuple(supers)))
        return tuple(out)

    def _groups(self, costs: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        """Super-units trade levels when their members come from one original group and steps cost alike.

        Under a budget window (or masks) the switch repairs unequal steps itself (``base.window_switch``),
        so there only the original groups count.
        """
        p = self.base.problem
        group_of = {u: g for g, members in enumerate(p.groups) for u in members}
        keyed: dict[tuple, list[int]] = {}
        for s, (m, c) in enumerate(zip(self.members, costs)):
            steps = () if p.slack or p.masks else tuple(b - a for a, b in zip(c, c[1:]))
            keyed.setdefault((tuple(sorted({group_of[u] for u in m})), steps), []).append(s)
        return tuple(tuple(v) for v in keyed.values())

    def retarget(self, target: float | None) -> Space | None:
        """The same rules over the base space at ``target`` (None when the base is built afresh)."""
        base = self.base.retarget(target)
        return None if base is None else ConstrainedSpace(base, self.rules)

    # --- mapping ---------------------------------------------------------------------------------
    @property
    def model_space(self) -> Space:
        return self.base.model_space

    def _expand(self, config: Config) -> Config:
        levels = [0] * len(self.base.units)
        for m, (lo, _), lv in zip(self.members, self.ranges, config):
            for u in m:
                levels[u] = lo + lv
        return tuple(levels)

    def to_model_levels(self, config: Config) -> Config:
        return self.base.to_model_levels(self._expand(config))

    def from_model_levels(self, levels: Config) -> Config:
        base = self.base.from_model_levels(levels)
        config = []
        for m, (lo, hi) in zip(self.members, self.ranges):
            if len({base[u] for u in m}) != 1 or not lo <= base[m[0]] <= hi:
                raise UserError(f"levels of {'+'.join(self.base.units[u] for u in m)} break the rules")
            config.append(base[m[0]] - lo)
        return tuple(config)

    # --- Space interface -------------------------------------------------------------------------
    def apply(self, config: Config | None) -> None:
        self.base.apply(None if config is None else self._expand(config))

    def random_config(self, rng: np.random.Generator) -> Config:
        return self.fit(self.base.random_config(rng), rng)

    def initial_configs(self, rng: np.random.Generator, n: int) -> list[Config]:
        return list(dict.fromkeys(self.fit(c, rng) for c in self.base.initial_configs(rng, n)))

    def project(self, base_config: Config) -> list[int]:
        """Nearest constrained configuration, budget aside: ties take their members' median level."""
        return [int(np.clip(round(float(np.median([base_config[u] for u in m]))), lo, hi)) - lo
                for m, (lo, hi) in zip(self.members, self.ranges)]

    def fit(self, base_config: Config, rng: np.random.Generator) -> Config:
        """A configuration of the base space under the rules: projected, then repaired to the budget."""
        config = self.repair(self.project(base_config), rng)
        if config is None:
            window = self.problem.slack or self.problem.masks
            reach = "window impossible to reach" if window else "impossible to meet exactly"
            raise UserError(f"the rules make the budget {reach}; relax pins or bounds")
        return config

    def options(self) -> dict[str, Any]:
        return {**self.base.options(), "rules": [asdict(r) for r in self.rules]}

    def budget_report(self, config: Config) -> dict[str, Any]:
        return self.base.budget_report(self._expand(config))

    def size_bytes(self, config: Config) -> int:
        return self.base.size_bytes(self._expand(config))

    def dense_bytes(self) -> int:
        return self.base.dense_bytes()

    def level_labels(self, u: int) -> list[Any]:
        lo, hi = self.ranges[u]
        return self.base.level_labels(self.members[u][0])[lo: hi + 1]

    def check_calibration(self, pool: Any) -> None:
        self.base.check_calibration(pool)


def in_space(space: Space, levels: Config, seed: int) -> Config:
    """A configuration of the model's own units (a baseline's) as one of ``space``: under rules, projected and
    repaired to the budget (``ConstrainedSpace.fit``); without, as it is."""
    if isinstance(space, ConstrainedSpace):
        return space.fit(levels, np.random.default_rng(seed))
    return levels
