"""Unstructured sparsity space: one zero count per linear layer, from a pruned-level database.

Levels (the paper's scheme, §2.2 of the reference): layer ``u`` of ``n_u`` weights has the zero
counts ``round(center * n_u) + l * step`` for ``l = -levels..levels``, keeping only those inside
``[0, n_u]`` (small layers get fewer levels). ``step`` (the paper's Δ, ``weights_diff``) is the same
for every layer, so a level switch (+1 on one layer, -1 on another) keeps the total number of zeros,
and thus of non-zeros, exactly constant, whatever the two layers' sizes. Level index 0 of a unit is
its least sparse variant; text configs and rules speak in offsets ``l`` from the database centre.

Budget: the total number of non-zeros of the compressible linear weights (decoder blocks only; the
embeddings, LM head and norms stay dense, as in the paper). Costs are integer non-zero counts, so
the budget is exact. Every reachable total is ``sum of minimum zeros + k * step``; the budget is the
one nearest ``target * weights`` (exact when the database centre is the target, up to rounding of
``center * n_u`` per layer). One database therefore serves any target inside its range; for a target
away from the centre the starting configuration is the feasible one whose per-layer sparsities are
closest to the target (``nearest_config``), which is exactly uniform when the target is the centre.
Without a target (``None``) the budget is a placeholder and the space only reads configurations;
``implied_target`` is then a configuration's average sparsity.

Switch groups (``group_rule``): ``global`` (default, the released code) lets any layer trade with
any other, valid because every step is ``step`` weights; ``size`` restricts trades to layers of equal
size (what the released paper configurations satisfy), so each size group keeps its total.

Database: built block by block on the outputs of the previous *dense* blocks (the pruned weights are
never installed, exactly as the reference). Each level is solved independently from the dense weight
and the layer Hessian (levels are not nested). A level is stored as a bitmask of its non-zeros (1 bit
per weight) plus the non-zero values in fp16 (bf16 for bf16 models), about ``0.125 + 2 * density``
bytes per weight instead of 2 for a dense fp16 copy per level. The search, evaluation and export all
decode the same stored values, so they agree bit for bit; the reference is the dense model.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Sequence

import numpy as np
import torch

from ...errors import UserError
from ...models import Decoder
from ...placement import to_device
from ..problem import Config, NoMoveError, shortest_decimal, switch
from ..layerwise import LayerwiseSpace
from .levels import nearest_levels, sparsity_problem
from .storage import decode_level, level_keys

GROUP_RULES = ("global", "size")
RANDOM_WALK = 4  # random_config: switches per unit from the uniform configuration


def check_target(target: float) -> None:
    if not 0 <= target <= 1:
        raise UserError(f"--target {target}: sparsity targets are average fractions of zeros in [0, 1]")


class SparsitySpace(LayerwiseSpace):
    name = "sparsity"

    def __init__(self, decoder: Decoder, target: float | None, db: str | None = None, group_rule: str = "global"):
        if group_rule not in GROUP_RULES:
            raise UserError(f"unknown --group-rule '{group_rule}' for sparsity (choose from {', '.join(GROUP_RULES)})")
        super().__init__(decoder, target, db)
        self.group_rule = group_rule
        manifest = self.db.manifest
        self.step: int = manifest["step"]
        entries = [manifest["layers"][name] for name in self.units]
        self.shapes = [tuple(e["shape"]) for e in entries]
        self.numels = [o * i for o, i in self.shapes]
        self.first_offsets = [e["first_offset"] for e in entries]
        self.zeros: list[list[int]] = [e["zeros"] for e in entries]
        self.weights = sum(self.numels)
        self.set_target(target)
        # per layer: sum of x_j^2 over the database's inputs (OWL), read while each file is checked
        self.input_sq_norms = [t["input_sq_norms"] for t in self.check_layer_files(
            lambda u: [k for lv in range(len(self.zeros[u])) for k in self._level_keys(u, lv)], ["input_sq_norms"])]

    def set_target(self, target: float | None) -> None:
        if target is not None:
            check_target(target)
        self.target = target
        # no target: a placeholder budget (every layer at its least sparse level), for reading configurations
        self.target_zeros = (Fraction(str(target)) * self.weights if target is not None
                             else Fraction(sum(z[0] for z in self.zeros)))
        try:
            self.problem, self.total_steps = sparsity_problem(self.numels, self.zeros, self.step, self.target_zeros,
                                                              self.group_rule)
        except ValueError:
            lo, hi = (sum(z[i] for z in self.zeros) / self.weights for i in (0, -1))
            raise UserError(f"--target {target} is outside database {self.db.root}, whose levels cover average "
                            f"sparsity {lo:.4f}..{hi:.4f} (centre {self.db.manifest['center']}); build one around the "
                            "target or with more --levels") from None

    def _level_keys(self, u: int, level: int) -> tuple[str, str]:
        return level_keys(self.first_offsets[u] + level)

    def decode(self, u: int, level: int) -> torch.Tensor:
        mask_key, values_key = self._level_keys(u, level)
        tensors = self.stored(u, (mask_key, values_key))
        device = self.device(u)
        return decode_level(to_device(tensors[mask_key], device), to_device(tensors[values_key], device),
                            self.shapes[u], self.layers[u].weight.dtype)

    def options(self) -> dict[str, Any]:
        return {"db": str(self.db.root.resolve()), "group_rule": self.group_rule}

    # -- configurations ------------------------------------------------------------------------

    def nearest_config(self, sparsities: Sequence[float]) -> Config:
        """The feasible configuration with per-layer sparsities closest to ``sparsities`` (``nearest_levels``)."""
        wanted = [s * n for s, n in zip(sparsities, self.numels)]
        return nearest_levels(self.zeros, self.numels, self.step, wanted, self.total_steps)

    def uniform_config(self) -> Config:
        """Every layer as close to the target as the levels allow; exactly uniform at the database centre."""
        return self.nearest_config([self.target] * len(self.units))

    def random_config(self, rng: np.random.Generator) -> Config:
        """A random walk of ``RANDOM_WALK`` switches per unit from the uniform configuration.

        Uniform sampling of configurations with an exact total is impractical; the walk uses the
        search's own budget-preserving switch, so it is always feasible, and spreads every layer over
        several levels.
        """
        config = list(self.uniform_config())
        try:
            for _ in range(RANDOM_WALK * len(self.units)):
                switch(config, self.problem, rng)
        except NoMoveError:
            pass  # the budget pins every layer: the uniform configuration is the only one
        return tuple(config)

    def initial_configs(self, rng: np.random.Generator, n: int) -> list[Config]:
        """The paper starts from the uniform configuration, without evaluating it."""
        return [self.uniform_config()]

    # -- reporting and export ----------------------------------------------------------------------

    def level_labels(self, u: int) -> list[Any]:
        first = self.first_offsets[u]
        return list(range(first, first + len(self.zeros[u])))

    def implied_target(self, config: Config) -> float:
        """The average sparsity of ``config``, as short a decimal as keeps its total the nearest reachable one."""
        zeros = sum(z[lv] for z, lv in zip(self.zeros, config))
        target = shortest_decimal(Fraction(zeros, self.weights),
                                  lambda t: 2 * abs(t * self.weights - zeros) < self.step)
        assert target is not None  # the exact average itself fits
        return target

    def level_bits(self, u: int, level: int) -> int:
        """As the database stores a level: the non-zero values at the model's dtype plus a 1-bit mask."""
        non_zeros = self.numels[u] - self.zeros[u][level]
        return non_zeros * 8 * self.layers[u].weight.element_size() + self.numels[u]

    def layer_sparsity(self, config: Config) -> list[float]:
        return [z[lv] / n for z, lv, n in zip(self.zeros, config, self.numels)]

    def budget_report(self, config: Config) -> dict[str, Any]:
        zeros = sum(z[lv] for z, lv in zip(self.zeros, config))
        per_layer = self.layer_sparsity(config)
        manifest = self.db.manifest
        return {
            "target": self.target,
            "achieved": zeros / self.weights,
            "exact": zeros == self.target_zeros,
            "rule": f"nearest total zero count reachable in steps of {self.step} weights",
            "weights": self.weights,
            "zeros": zeros,
            "non_zeros": self.weights - zeros,
            "step": self.step,
            "group_rule": self.group_rule,
            "database": {"method": manifest["method"], "center": manifest["center"], "levels": manifest["levels"]},
            "layer_sparsity_range": [min(per_layer), max(per_layer)],
            "unit_values": [round(s, 5) for s in per_layer],
            "value_label": "sparsity",
        }
