"""Depth space: drop attention and/or MLP sub-blocks (or whole blocks).

A dropped sub-block outputs zero, so the decoder layer adds nothing to its residual stream: the
sub-block, including its pre-norm, becomes an exact identity. Level 0 keeps a unit, level 1 drops it.
With sub-block granularity exactly k attention and exactly k MLP sub-blocks are dropped (k =
floor(target * blocks)), as in the paper; attention and MLP trade only among themselves, so both
counts stay exact under every switch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..io import write_json
from ..models import Decoder
from .base import Config, Problem, Space

GRANULARITIES = ("sublayer", "block")


class DroppedAttention(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        return torch.zeros_like(hidden_states), None


class DroppedMLP(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _output_projection(module: nn.Module) -> nn.Linear:
    """The linear layer that writes a sub-block's result (o_proj, down_proj, ...): the last one registered."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"cannot export: {type(module).__name__} has no linear output projection")
    return linears[-1]


def drop_count(target: float, blocks: int) -> int:
    if not 0.0 < target < 1.0:
        raise UserError(f"--target {target} out of range: depth targets are fractions in (0, 1)")
    k = math.floor(target * blocks + 1e-9)
    if k == 0:
        raise UserError(f"--target {target} drops nothing on a {blocks}-block model (floor({target}*{blocks}) = 0)")
    return k


class DropSpace(Space):
    name = "drop"

    def __init__(self, decoder: Decoder, target: float, granularity: str = "sublayer"):
        if granularity not in GRANULARITIES:
            raise UserError(f"unknown granularity '{granularity}' (choose from {', '.join(GRANULARITIES)})")
        self.decoder = decoder
        self.target = target
        self.granularity = granularity
        self.num_blocks = L = decoder.num_blocks
        self.k = drop_count(target, L)
        prefix = next(n for n, m in decoder.model.named_modules() if m is decoder.layers)
        kinds = [decoder.attn_attr, decoder.mlp_attr] if granularity == "sublayer" else [None]
        self.units = [f"{prefix}.{b}" + (f".{kind}" if kind else "") for kind in kinds for b in range(L)]
        self.unit_block = [b for _ in kinds for b in range(L)]
        groups = tuple(tuple(range(i * L, (i + 1) * L)) for i in range(len(kinds)))
        self.problem = Problem(num_levels=(2,) * len(self.units), costs=((0, 1),) * len(self.units),
                               budget=self.k * len(kinds), groups=groups)
        self._originals = [(decoder.attn(b), decoder.mlp(b)) for b in range(L)]
        self._dropped = [(False, False)] * L

    @classmethod
    def options_from_args(cls, args: Any) -> dict[str, Any]:
        return {"granularity": args.granularity}

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

    def export(self, config: Config, out: Path, tokenizer: Any) -> dict[str, Any]:
        """A plain transformers checkpoint computing exactly the configuration; modifies the model in place.

        Whole dropped blocks are removed (``num_hidden_layers`` shrinks, so the model is smaller and
        faster). A lone dropped sub-block cannot be expressed in a standard architecture, so its output
        projection (attention ``o_proj``-like last linear, MLP ``down_proj``-like last linear) is zeroed:
        the sub-block then adds exactly zero to the residual stream, with identical logits. The profile,
        including DeciLM/Nemotron-NAS style ``block_configs`` (no-op attention/FFN) for runtimes that can
        skip them, goes to ``evopress_profile.json``.
        """
        self.apply(None)
        masks = self.masks(config)
        for b, (attn, mlp) in enumerate(masks):
            for dropped, module in ((attn, self.decoder.attn(b)), (mlp, self.decoder.mlp(b))):
                if dropped and not (attn and mlp):
                    proj = _output_projection(module)
                    proj.weight.data.zero_()
                    if proj.bias is not None:
                        proj.bias.data.zero_()
        keep = [b for b, (attn, mlp) in enumerate(masks) if not (attn and mlp)]
        model = self.decoder.model
        layers = self.decoder.layers
        for b in reversed(range(self.num_blocks)):
            if b not in keep:
                del layers[b]  # ModuleList renumbers what follows
        for i, layer in enumerate(layers):
            for m in layer.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = i
        config_ = model.config
        if getattr(config_, "layer_types", None):
            config_.layer_types = [config_.layer_types[b] for b in keep]
        config_.num_hidden_layers = len(keep)
        out = Path(out)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        profile = {
            "space": self.name, "target": self.target, "removed_blocks": [b for b in range(self.num_blocks) if b not in keep],
            "block_configs": [{"attention": {"no_op": a}, "ffn": {"no_op": m}} for a, m in masks if not (a and m)],
            "original_num_hidden_layers": self.num_blocks,
        }
        write_json(out / "evopress_profile.json", profile)
        return {"out": str(out), "num_hidden_layers": len(keep),
                "parameters": sum(p.numel() for p in model.parameters())}

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
        }
