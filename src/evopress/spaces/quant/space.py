"""Quantization space: one bitwidth per linear layer, from a GPTQ level database.

Units are the linear layers of the decoder blocks; level ``l`` of a unit is the ``l``-th bitwidth of
``bits`` (ascending). A level's cost is an integer number of bits: ``bits * numel`` for the weights,
plus, with ``overhead=True``, ``(16 + bits)`` per quantization group for its fp16 scale and its
``bits``-wide zero point (exactly what the compressed-tensors export stores; 16 for a database built
``--symmetric``, whose zero points are all 2^(bits-1) and not stored).
The paper counts weights only (its "2.25 bits" exclude about 0.25 bit/weight of metadata at group
128); ``budget_report`` always states which accounting a result used and gives both averages.

Budget: ``target`` is average bits per compressible weight, parameter-weighted. The exact budget is
the largest achievable total cost <= target x weights, found by a small dynamic program, so a
fractional target (2.25, 2.5) is met exactly whenever the layer sizes allow it and otherwise
rounded down to the nearest feasible total; ``budget_report`` says which.

Switch groups (``group_rule``): a +1/-1 level switch preserves the total only if both steps cost the
same, so switches stay within groups of layers with *identical cost vectors*. ``size`` (default)
groups layers of equal size (Llama: q/o, k/v, gate/up/down; with ``overhead`` and per-channel grids
down_proj separates from gate/up because its row count differs); ``name`` groups by projection name.
As in the paper, each group's total level then never changes during the search: the initial
configuration fixes how many bits go to attention vs MLP.

Without a target (``None``) the budget is a placeholder and the space only reads configurations;
``implied_target`` is then a configuration's average bits.

Levels default to the longest equally spaced run of the database's bitwidths starting at the
smallest (2..6 of 2,3,4,5,6,8): with unequal steps (6 -> 8 costs twice 5 -> 6) a single-step switch
pairing them is never budget-neutral, so a level past the gap is unreachable from configurations that
do not already use it, and the search would only waste rejected children on it.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any, Sequence

import numpy as np
import torch

from ...compressors.gptq import QuantGrid, QuantizedWeight
from ...errors import UserError
from ...models import Decoder
from ...placement import to_device
from ..problem import Config, Problem, shortest_decimal
from ..layerwise import LayerwiseSpace
from .build import from_level, packed_keys
from .levels import MAX_BITS, default_levels, exact_knapsack, level_cost, max_reachable, packed_bytes

GROUP_RULES = ("size", "name")


def check_target(target: float) -> None:
    if not 0 < target <= MAX_BITS:
        raise UserError(f"--target {target}: quant targets are average bits per weight in (0, {MAX_BITS}], "
                        "e.g. 3 or 2.5")


class QuantSpace(LayerwiseSpace):
    name = "quant"

    def __init__(self, decoder: Decoder, target: float | None, db: str | None = None, group_rule: str = "size",
                 overhead: bool = False, bits: Sequence[int] | None = None):
        if group_rule not in GROUP_RULES:
            raise UserError(f"unknown --group-rule '{group_rule}' for quant (choose from {', '.join(GROUP_RULES)}; "
                            "'global' cannot keep an exact bit budget across layers of different sizes)")
        super().__init__(decoder, target, db)
        self.group_rule = group_rule
        self.overhead = overhead
        manifest = self.db.manifest
        stored = manifest["bits"]
        self.bits = tuple(bits) if bits is not None else default_levels(stored)
        if not self.bits or list(self.bits) != sorted(set(self.bits)) or not set(self.bits) <= set(stored):
            raise UserError(f"quant levels {list(self.bits)} must be ascending bitwidths stored in the database "
                            f"({','.join(map(str, stored))})")
        self.group_size = manifest["group_size"]
        self.symmetric = bool(manifest.get("symmetric", False))
        self.shapes = [tuple(manifest["layers"][name]) for name in self.units]
        self.numel = sum(o * i for o, i in self.shapes)
        self.level_costs = tuple(tuple(level_cost(b, s, self.grid(b), overhead) for b in self.bits)
                                 for s in self.shapes)
        self.switch_groups = self._groups(self.level_costs)
        self.set_target(target)
        self.check_layer_files(lambda u: [key for b in self.bits for key in packed_keys(b).values()])

    def set_target(self, target: float | None) -> None:
        if target is not None:
            check_target(target)
        self.target, costs = target, self.level_costs
        # no target: a placeholder budget (the cheapest configuration), for reading configurations
        wanted = Fraction(str(target)) * self.numel if target is not None else Fraction(sum(c[0] for c in costs))
        self.target_bits = math.floor(wanted)
        top = sum(c[-1] for c in costs)
        if wanted > top:
            raise UserError(f"--target {target} is above the most expensive configuration ({top / self.numel:.4f} "
                            f"bits per weight with every layer at {self.bits[-1]} bits, {self.accounting()}); "
                            f"database {self.db.root} offers levels {','.join(map(str, self.bits))} bits")
        budget = max_reachable(costs, self.target_bits)
        if budget is None:
            lowest = sum(c[0] for c in costs) / self.numel
            raise UserError(f"--target {target} is below the cheapest configuration ({lowest:.4f} bits per weight "
                            f"with every layer at {self.bits[0]} bits, {self.accounting()})")
        self.problem = Problem(num_levels=(len(self.bits),) * len(self.units), costs=costs, budget=budget,
                               groups=self.switch_groups)

    def grid(self, bits: int) -> QuantGrid:
        return QuantGrid(bits, self.group_size, self.symmetric)

    def accounting(self) -> str:
        if self.overhead and self.symmetric:
            return "true bits: weights plus a fp16 scale per group (symmetric grid: no zero points)"
        if self.overhead:
            return "true bits: weights plus a fp16 scale and a b-bit zero point per group"
        return "weight bits only (scale/zero-point metadata excluded, as in the paper)"

    def _groups(self, costs: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        groups: dict[Any, list[int]] = {}
        for u, name in enumerate(self.units):
            kind = re.sub(r"^.*?\.\d+\.", "", name) if self.group_rule == "name" else None
            groups.setdefault((kind, costs[u]), []).append(u)
        if self.group_rule == "name" and len({k for k, _ in groups}) != len(groups):
            raise UserError("--group-rule name: layers with the same name differ in size; use --group-rule size")
        return tuple(tuple(g) for g in groups.values())

    def quantized(self, u: int, bits: int) -> QuantizedWeight:
        packed = self.stored(u, list(packed_keys(bits).values()))
        device = self.device(u)
        return from_level({k: to_device(v, device) for k, v in packed.items()}, self.shapes[u], self.grid(bits))

    def decode(self, u: int, level: int) -> torch.Tensor:
        return self.quantized(u, self.bits[level]).dequantize(self.layers[u].weight.dtype)

    def options(self) -> dict[str, Any]:
        return {"db": str(self.db.root.resolve()), "group_rule": self.group_rule, "overhead": self.overhead,
                "bits": list(self.bits)}

    # -- configurations ------------------------------------------------------------------------

    def uniform_level(self) -> int | None:
        """The level whose uniform configuration meets the budget exactly, if any (integer targets)."""
        for level in range(len(self.bits)):
            if self.problem.feasible((level,) * len(self.units)):
                return level
        return None

    def _lowered(self, rng: np.random.Generator, start: int) -> Config | None:
        """The paper's construction: all layers at ``start``, then lower random layers one level at a time.

        A group is drawn with probability proportional to its number of layers, then a layer uniformly
        among those that can go lower. Only steps that keep the total >= budget are allowed, so the
        result meets the budget exactly, or None if no allowed step is left before it does.
        """
        costs = self.problem.costs
        config = [start] * len(self.units)
        excess = self.problem.cost(config) - self.problem.budget
        while excess > 0:
            options = [[u for u in g if config[u] > 0 and costs[u][config[u]] - costs[u][config[u] - 1] <= excess]
                       for g in self.problem.groups]
            sizes = np.array([len(g) if o else 0 for g, o in zip(self.problem.groups, options)], dtype=float)
            if not sizes.any():
                return None
            members = options[rng.choice(len(options), p=sizes / sizes.sum())]
            u = members[rng.integers(len(members))]
            excess -= costs[u][config[u]] - costs[u][config[u] - 1]
            config[u] -= 1
        return tuple(config)

    def random_config(self, rng: np.random.Generator, attempts: int = 20) -> Config:
        """Random lowering from the lowest level whose uniform cost exceeds the budget.

        For a fractional target that start is the ceiling bitwidth (the paper's initialisation); for
        an integer target it is one level above, so random configurations mix levels around it. If
        the lowering gets stuck ``attempts`` times (layer sizes leave no exact step), an exact DP
        with random per-layer scores gives a random feasible configuration instead.
        """
        n = len(self.units)
        start = next((lv for lv in range(len(self.bits)) if self.problem.cost((lv,) * n) > self.problem.budget),
                     len(self.bits) - 1)
        for _ in range(attempts):
            config = self._lowered(rng, start)
            if config is not None:
                return config
        config = exact_knapsack(self.problem.costs, rng.random((n, len(self.bits))), self.problem.budget)
        assert config is not None  # the budget is achievable by construction
        return config

    def initial_configs(self, rng: np.random.Generator, n: int) -> list[Config]:
        """Integer target met by a uniform bitwidth: just that (the paper, not evaluated); else ``n`` random."""
        level = self.uniform_level()
        if level is not None:
            return [(level,) * len(self.units)]
        return self.random_configs(rng, n)

    # -- reporting and export ----------------------------------------------------------------------

    def level_labels(self, u: int) -> list[Any]:
        return list(self.bits)

    def implied_target(self, config: Config) -> float:
        """The average bits of ``config`` (this space's accounting), as short a decimal as gives its total.

        The budget is ``floor(target x weights)``, so any target in [cost, cost + 1) / weights gives
        the configuration's cost; rounding from the middle of that range finds the shortest one.
        """
        cost, top = self.problem.cost(config), sum(c[-1] for c in self.problem.costs)
        target = shortest_decimal(Fraction(cost + min(cost + 1, top), 2 * self.numel),
                                  lambda t: math.floor(t * self.numel) == cost and t * self.numel <= top)
        if target is None:
            raise UserError(f"no decimal target gives exactly {cost} bits over {self.numel} weights; give --target")
        return target

    def level_bits(self, u: int, level: int) -> int:
        """What the export writes for the layer (packed codes and zero points, fp16 scales, shape), in bits:
        the true size whatever the budget's accounting, and the joint space's byte cost."""
        bits = self.bits[level]
        return 8 * packed_bytes(bits, self.shapes[u], self.grid(bits))

    def layer_bits(self, config: Config) -> dict[str, int]:
        return {name: self.bits[level] for name, level in zip(self.units, config)}

    def budget_report(self, config: Config) -> dict[str, Any]:
        weight_bits = sum(self.bits[lv] * o * i for lv, (o, i) in zip(config, self.shapes))
        true_bits = sum(level_cost(self.bits[lv], s, self.grid(self.bits[lv]), True)
                        for lv, s in zip(config, self.shapes))
        cost = self.problem.cost(config)
        histogram: dict[str, int] = {}
        for b in sorted(self.layer_bits(config).values()):
            histogram[str(b)] = histogram.get(str(b), 0) + 1
        return {
            "target": self.target,
            "accounting": self.accounting(),
            "achieved": cost / self.numel,
            "exact": cost == Fraction(str(self.target)) * self.numel,
            "rule": "largest achievable total <= target x weights (exact when reachable)",
            "budget_bits": self.problem.budget,
            "weights": self.numel,
            "weight_bits_per_weight": weight_bits / self.numel,
            "true_bits_per_weight": true_bits / self.numel,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "group_rule": self.group_rule,
            "level_values": list(self.bits),
            "layers_per_bitwidth": histogram,
        }
