"""Depth space: drop attention and/or MLP sub-blocks (or whole blocks).

A dropped sub-block outputs zero, so the decoder layer adds nothing to its residual stream: the
sub-block, including its pre-norm, becomes an exact identity. Level 0 keeps a unit, level 1 drops it.
With sub-block granularity exactly k attention and exactly k MLP sub-blocks are dropped (k =
floor(target * blocks)), as in the paper; attention and MLP trade only among themselves, so both
counts stay exact under every switch. ``target=None`` builds the units without a budget (nothing
dropped), enough to read a configuration and find its target (``implied_target``: k / blocks).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import UserError
from ...models import Decoder
from ..problem import Config, Problem
from ..space import Space, module_bytes

GRANULARITIES = ("sublayer", "block")


class DroppedAttention(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        return torch.zeros_like(hidden_states), None


class DroppedMLP(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def check_target(target: float) -> None:
    if not 0.0 < target < 1.0:
        raise UserError(f"--target {target} out of range: depth targets are fractions in (0, 1)")


def drop_count(target: float, blocks: int) -> int:
    check_target(target)
    k = math.floor(target * blocks + 1e-9)
    if k == 0:
        raise UserError(f"--target {target} drops nothing on a {blocks}-block model (floor({target}*{blocks}) = 0)")
    return k


class DropSpace(Space):
    name = "drop"

    def __init__(self, decoder: Decoder, target: float | None, granularity: str = "sublayer"):
        if granularity not in GRANULARITIES:
            raise UserError(f"unknown granularity '{granularity}' (choose from {', '.join(GRANULARITIES)})")
        self.decoder = decoder
        self.target = target
        self.granularity = granularity
        self.num_blocks = L = decoder.num_blocks
        self.k = drop_count(target, L) if target is not None else 0
        prefix = next(n for n, m in decoder.model.named_modules() if m is decoder.layers)
        kinds = [decoder.attn_attr, decoder.mlp_attr] if granularity == "sublayer" else [None]
        self.units = [f"{prefix}.{b}" + (f".{kind}" if kind else "") for kind in kinds for b in range(L)]
        self.unit_block = [b for _ in kinds for b in range(L)]
        groups = tuple(tuple(range(i * L, (i + 1) * L)) for i in range(len(kinds)))
        self.problem = Problem(num_levels=(2,) * len(self.units), costs=((0, 1),) * len(self.units),
                               budget=self.k * len(kinds), groups=groups)
        self._originals = [(decoder.attn(b), decoder.mlp(b)) for b in range(L)]
        self._dropped = [(False, False)] * L
        # from the original modules: a dropped one is swapped for a parameterless stand-in
        parts = [[module_bytes(a) for a, _ in self._originals], [module_bytes(m) for _, m in self._originals]]
        self.unit_bytes = parts[0] + parts[1] if granularity == "sublayer" else \
            [module_bytes(decoder.layers[b]) for b in range(L)]

    def dense_bytes(self) -> int:
        return sum(self.unit_bytes)

    def size_bytes(self, config: Config) -> int:
        """The kept units' parameters at the model's dtype (a dropped sub-block stores nothing)."""
        return sum(b for b, level in zip(self.unit_bytes, config) if level == 0)

    def options(self) -> dict[str, Any]:
        return {"granularity": self.granularity}

    def masks(self, config: Config | None) -> list[tuple[bool, bool]]:
        """Per block: (attention dropped, MLP dropped)."""
        L = self.num_blocks
        if config is None:
            return [(False, False)] * L
        if self.granularity == "block":
            return [(bool(c), bool(c)) for c in config]
        return [(bool(config[b]), bool(config[L + b])) for b in range(L)]

    def config_from_masks(self, masks: list[tuple[bool, bool]]) -> Config:
        if self.granularity == "block":
            return tuple(int(a and m) for a, m in masks)
        return tuple(int(a) for a, _ in masks) + tuple(int(m) for _, m in masks)

    def implied_target(self, config: Config) -> float:
        """k / blocks for a configuration dropping k sub-blocks of each kind (floor(target * blocks) = k)."""
        masks = self.masks(config)
        attn, mlp = sum(a for a, _ in masks), sum(m for _, m in masks)
        if attn != mlp:
            raise UserError(f"the configuration drops {attn} attention and {mlp} MLP sub-blocks; the depth space "
                            "drops equally many of each kind")
        if not 0 < attn < self.num_blocks:
            raise UserError(f"the configuration drops {attn} of {self.num_blocks} sub-blocks of each kind; a depth "
                            "target drops at least one and fewer than all")
        return attn / self.num_blocks

    def apply(self, config: Config | None) -> None:
        layers = self.decoder.layers
        for b, (want, have) in enumerate(zip(self.masks(config), self._dropped)):
            if want == have:
                continue
            attn, mlp = self._originals[b]
            setattr(layers[b], self.decoder.attn_attr, DroppedAttention() if want[0] else attn)
            setattr(layers[b], self.decoder.mlp_attr, DroppedMLP() if want[1] else mlp)
            self._dropped[b] = want

    def random_config(self, rng: np.random.Generator) -> Config:
        config = [0] * len(self.units)
        for group in self.problem.groups:
            for u in rng.choice(len(group), size=self.k, replace=False):
                config[group[u]] = 1
        return tuple(config)

    def budget_report(self, config: Config) -> dict[str, Any]:
        masks = self.masks(config)
        attn = sum(a for a, _ in masks)
        mlp = sum(m for _, m in masks)
        return {
            "target": self.target,
            "rule": f"floor(target * {self.num_blocks} blocks) = {self.k} sub-blocks of each kind dropped",
            "dropped_attention": attn,
            "dropped_mlp": mlp,
            "achieved": (attn + mlp) / (2 * self.num_blocks),
            "level_values": [0, 1],
            "value_label": "dropped",
        }
