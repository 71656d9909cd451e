"""Width space: how many KV groups each attention keeps and how many channels each MLP keeps.

Units, levels and structures: ``structures.py``. During the search a level changes one weight per unit,
its output projection: the removed structures' input columns are zero and the kept ones hold the
database's OBS-updated values, so the model computes exactly the thinned network (the removed heads and
channels still run, at dense cost, and add nothing). ``export`` slices the projections into a smaller
dense model computing the same.

Budget: the parameters of the blocks' linear layers (weights and biases; embeddings, head and norms are
not counted), ``--target`` the fraction removed (0.5 keeps half). Attention and MLP steps cost unequal
amounts, so no up/down pair keeps a total exactly: the rule is a window one level step wide, the kept
parameters in ``[budget - slack, budget]`` with ``budget = floor((1 - target) * total)`` and ``slack`` the
largest single level step of any unit (exact within one step); ``Problem.slack`` and ``window_switch``
keep every child in it.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import nn

from ...compressors.structured import kept_columns, kept_structures, structure_columns
from ...errors import UserError
from ...models import Decoder
from ...placement import to_device
from ..layerwise import LayerwiseSpace
from ..problem import Config, NoMoveError, Problem, shortest_decimal, switch
from .build import ORDER, level_key, stored_widths
from .structures import Unit, find_units

RANDOM_WALK = 4  # random_config: switches per unit from the uniform configuration


def check_target(target: float) -> None:
    if not 0 <= target < 1:
        raise UserError(f"--target {target}: width targets are the fraction of the blocks' linear parameters "
                        "removed, in [0, 1)")


class WidthSpace(LayerwiseSpace):
    name = "width"

    def __init__(self, decoder: Decoder, target: float | None, db: str | None = None):
        super().__init__(decoder, target, db)
        self.costs = tuple(tuple(u.params(w) for w in u.widths) for u in self.wunits)
        self.total = sum(c[-1] for c in self.costs)
        self.slack = max(b - a for c in self.costs for a, b in zip(c, c[1:]))
        self.set_target(target)
        self.check_layer_files(lambda u: [ORDER] + [level_key(w) for w in stored_widths(self.wunits[u])])

    def find_units(self) -> tuple[list[str], list[int], list[nn.Module]]:
        self.wunits: list[Unit] = find_units(self.decoder, self.db.manifest["mlp_step"])
        stored = self.db.manifest["layers"]
        if sorted(u.name for u in self.wunits) != sorted(stored) or \
                any(stored[u.name]["widths"] != list(u.widths) for u in self.wunits):
            raise UserError(f"database {self.db.root} holds other units or widths than this model's")
        return [u.name for u in self.wunits], [u.block for u in self.wunits], [u.output for u in self.wunits]

    def set_target(self, target: float | None) -> None:
        if target is not None:
            check_target(target)
        self.target = target
        budget = self.total if target is None else math.floor((1 - Fraction(str(target))) * self.total)
        cheapest = sum(c[0] for c in self.costs)
        if budget < cheapest:
            raise UserError(f"--target {target} removes more than the narrowest levels allow (at most "
                            f"{1 - cheapest / self.total:.4f}: sub-blocks with an output bias keep one structure)")
        self.problem = Problem(num_levels=tuple(len(c) for c in self.costs), costs=self.costs, budget=budget,
                               groups=(tuple(range(len(self.costs))),), slack=self.slack)

    def options(self) -> dict[str, Any]:
        return {"db": str(self.db.root.resolve())}

    # -- levels into the model ---------------------------------------------------------------------

    def kept(self, u: int, width: int) -> list[int]:
        """The structures unit ``u`` keeps at ``width``, ascending (the last ``width`` the database removed)."""
        return kept_structures(self.stored(u, (ORDER,))[ORDER].tolist(), width)

    def thinned(self, u: int, level: int) -> torch.Tensor:
        """The output projection restricted to the kept columns at a level below the full width, in the model's
        dtype (CPU)."""
        unit, width = self.wunits[u], self.wunits[u].widths[level]
        if width == 0:
            return torch.zeros(unit.output.out_features, 0, dtype=unit.output.weight.dtype)
        return self.stored(u, (level_key(width),))[level_key(width)].to(unit.output.weight.dtype)

    def decode(self, u: int, level: int) -> torch.Tensor:
        unit, width = self.wunits[u], self.wunits[u].widths[level]
        device = self.device(u)
        if width == unit.structures:
            return to_device(self.dense_weight(u), device)
        weight = torch.zeros(unit.output.weight.shape, dtype=unit.output.weight.dtype, device=device)
        columns = kept_columns(self.stored(u, (ORDER,))[ORDER].tolist(), structure_columns(unit.structures, unit.size),
                               width)
        weight[:, columns.to(device)] = to_device(self.thinned(u, level), device)
        return weight

    # -- configurations ------------------------------------------------------------------------------

    def uniform_config(self) -> Config:
        """Every unit as near the target's kept fraction as its levels allow, then the units furthest above
        it stepped down (or furthest below it up) until the total is in the window."""
        keep = 1 - (self.target or 0)
        frac = [[cost / c[-1] for cost in c] for c in self.costs]
        config = [min(range(len(f)), key=lambda lv, f=f: (abs(f[lv] - keep), -lv)) for f in frac]
        p = self.problem
        cost = p.cost(config)
        while cost > p.budget:
            u = max((u for u in range(len(config)) if config[u] > 0), key=lambda u: frac[u][config[u] - 1])
            cost += p.delta(config, u, config[u] - 1)
            config[u] -= 1
        while cost < p.budget - p.slack:
            fits = [u for u in range(len(config)) if config[u] + 1 < len(frac[u])
                    and cost + p.delta(config, u, config[u] + 1) <= p.budget]
            u = min(fits, key=lambda u: frac[u][config[u] + 1])
            cost += p.delta(config, u, config[u] + 1)
            config[u] += 1
        return tuple(config)

    def random_config(self, rng: np.random.Generator) -> Config:
        """A random walk of the search's own switches from the uniform configuration (always feasible)."""
        config = list(self.uniform_config())
        last = tuple(config)
        try:
            for _ in range(RANDOM_WALK * len(self.units)):
                switch(config, self.problem, rng)
                if self.problem.feasible(config):
                    last = tuple(config)
                else:
                    config = list(last)
        except NoMoveError:
            pass
        return last

    # -- reporting --------------------------------------------------------------------------------

    def level_labels(self, u: int) -> list[Any]:
        return list(self.wunits[u].widths)

    def widths(self, config: Config) -> list[int]:
        return [u.widths[lv] for u, lv in zip(self.wunits, config)]

    def implied_target(self, config: Config) -> float:
        """A removed fraction whose window holds ``config``, as short a decimal as there is."""
        cost = self.problem.cost(config)

        def fits(t: Fraction) -> bool:
            budget = math.floor((1 - t) * self.total)
            return 0 <= t < 1 and budget - self.slack <= cost <= budget

        # from the middle of the targets whose window holds ``cost``: the exact fraction is at its edge
        target = shortest_decimal(Fraction(max(self.total - cost - self.slack // 2, 0), self.total), fits)
        if target is None:
            raise UserError(f"no target in [0, 1) puts a configuration of {cost:,} kept parameters in its window")
        return target

    def dense_bytes(self) -> int:
        return self.total * self.layers[0].weight.element_size()

    def size_bytes(self, config: Config) -> int:
        return self.problem.cost(config) * self.layers[0].weight.element_size()

    def budget_report(self, config: Config) -> dict[str, Any]:
        p = self.problem
        kept = p.cost(config)
        widths = self.widths(config)
        return {
            "target": self.target,
            "rule": "kept parameters of the blocks' linear layers in [budget - slack, budget], slack = the "
                    "largest level step",
            "parameters": self.total,
            "kept_parameters": kept,
            "budget": p.budget,
            "lowest": p.budget - p.slack,
            "achieved": 1 - kept / self.total,
            "method": self.db.manifest["method"],
            "kv_groups_kept": [w for u, w in zip(self.wunits, widths) if u.kind == "attention"],
            "mlp_channels_kept": [w for u, w in zip(self.wunits, widths) if u.kind == "mlp"],
            "unit_values": [round(w / u.structures, 4) for u, w in zip(self.wunits, widths)],
            "value_label": "kept fraction of heads / channels",
        }
