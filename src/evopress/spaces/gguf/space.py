"""Gguf space: a llama.cpp quant type per weight tensor, embeddings and head included, under a byte budget.

Units are the model's GGUF weight tensors (``tensors.model_tensors``); a unit's levels are the types its
database stores for it, cheapest first (``build.tensor_levels``: the requested types after llama.cpp's
shape fallback, so a 576-wide tensor offers Q4_0/Q5_0/Q5_1/Q8_0 where a 1536-wide one offers the K
types). A level's cost is its true bytes in a GGUF file (``types.tensor_bytes``). ``--target`` is bits
per weight over these tensors (llama.cpp's bpw of the quantized tensors), or with ``--target-bytes``
a byte count; as in the joint space the achieved bytes stay in ``[budget - slack, budget]`` with
``slack = floor(budget * tolerance)``, never above, and the mutation is one random level move repaired
back into that window (``problem.window_switch``).

The fitness dequantizes a level exactly as llama.cpp does (``types.dequantize``) into the torch model.
llama.cpp's CPU matmuls also quantize the activations (to Q8_0/Q8_1/Q8_K), which the torch model does
not: its logits are close to llama.cpp's, not equal (docs/gguf.md measures the agreement).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ...errors import UserError
from ...models import Decoder
from ..layerwise import LayerwiseSpace
from ..problem import BYTE_TOLERANCE, Config, Problem, check_tolerance, settle
from .tensors import model_tensors
from .types import bits_per_weight, dequantize, fallback, parse_types, tensor_bytes


def check_target(target: float) -> None:
    if not target > 0:
        raise UserError(f"--target {target}: gguf targets are bits per weight of the quantized tensors (e.g. 4.5) "
                        "or, with --target-bytes, a byte count; both positive")


class GGUFSpace(LayerwiseSpace):
    name = "gguf"
    moves_embeddings = True  # the token embedding is a unit

    def __init__(self, decoder: Decoder, target: float | None, db: str | None = None, target_bytes: bool = False,
                 tolerance: float = BYTE_TOLERANCE, types: str | Sequence[str] | None = None):
        check_tolerance(tolerance)  # before the database opens
        super().__init__(decoder, target, db)
        info = self.db.manifest["tensors"]
        self.gguf_names = [info[u]["gguf"] for u in self.units]
        self.shapes = [tuple(info[u]["shape"]) for u in self.units]
        self.restricted = None if types is None else list(parse_types(types))
        self.types = [self._offered(info[u]["types"], self.restricted, u) for u in self.units]
        self.level_costs = tuple(tuple(tensor_bytes(q, s) for q in ts) for ts, s in zip(self.types, self.shapes))
        self.numel = sum(r * c for r, c in self.shapes)
        self.target_bytes, self.tolerance, self.imatrix = target_bytes, tolerance, bool(self.db.manifest["imatrix"])
        self.set_target(target)
        self.check_layer_files(lambda u: self.types[u])

    def find_units(self) -> tuple[list[str], list[int], list[nn.Module]]:
        tensors = model_tensors(self.decoder, self.db.manifest["arch"])
        if sorted(t.name for t in tensors) != sorted(self.db.manifest["tensors"]):
            raise UserError(f"database {self.db.root} holds other tensors than this model's")
        model = self.decoder.model
        return [t.name for t in tensors], [t.block for t in tensors], [model.get_submodule(t.name) for t in tensors]

    def _offered(self, stored: list[str], wanted: list[str] | None, unit: str) -> list[str]:
        """The stored types of a tensor, or those ``--types`` names (after the fallback)."""
        if wanted is None:
            return list(stored)
        shape = self.db.manifest["tensors"][unit]["shape"]
        chosen = {fallback(t, shape[1]) for t in wanted}
        missing = sorted(chosen - set(stored))
        if missing:
            raise UserError(f"--types: {unit} would need {','.join(missing)}, which database {self.db.root} does not "
                            f"store (it has {','.join(stored)}); rebuild it with those --types")
        return [t for t in stored if t in chosen]

    def set_target(self, target: float | None) -> None:
        """The byte budget of ``target``; no target: every tensor at its top type (for reading configurations)."""
        costs = self.level_costs
        top, low = sum(c[-1] for c in costs), sum(c[0] for c in costs)
        budget = top if target is None else self._budget(target)
        if budget > top:
            raise UserError(f"--target {target:g} is above the most expensive configuration: {top:,} bytes "
                            f"({8 * top / self.numel:.4f} bits per weight, every tensor at its largest type); "
                            f"database {self.db.root}")
        if budget < low:
            raise UserError(f"--target {target:g} is below the cheapest configuration: {low:,} bytes "
                            f"({8 * low / self.numel:.4f} bits per weight, every tensor at its smallest type)")
        self.target = target
        self.problem = Problem(num_levels=tuple(map(len, self.types)), costs=costs, budget=budget,
                               groups=(tuple(range(len(self.units))),), slack=math.floor(budget * self.tolerance))

    def _budget(self, target: float) -> int:
        check_target(target)
        return math.floor(target) if self.target_bytes else math.floor(target * self.numel / 8)

    def decode(self, u: int, level: int) -> torch.Tensor:
        weight = torch.from_numpy(dequantize(self.raw(u, level), self.types[u][level], self.shapes[u][1]))
        return weight.to(self.device(u), self.layers[u].weight.dtype)

    def raw(self, u: int, level: int) -> np.ndarray:
        """Unit ``u``'s stored blocks at ``level`` (uint8 [rows, row bytes], torch row order)."""
        qtype = self.types[u][level]
        return self.stored(u, [qtype])[qtype].numpy()

    def check_calibration(self, pool: Any) -> None:
        if self.imatrix:  # without an importance matrix the levels do not depend on any text
            super().check_calibration(pool)

    # -- configurations ------------------------------------------------------------------------------

    def random_config(self, rng: np.random.Generator, attempts: int = 20) -> Config:
        """Every tensor at its largest type, then random single-level moves down into the window."""
        p = self.problem
        for _ in range(attempts):
            config = [n - 1 for n in p.num_levels]
            if settle(config, p, rng, range(len(config)), max_moves=2 * sum(p.num_levels)):
                return tuple(config)
        raise UserError(f"--target {self.target:g}: no configuration found within {self.tolerance:.2%} below "
                        f"{p.budget:,} bytes; the tensors' steps are too coarse for the window (raise --byte-tolerance)")

    def config_of(self, types: dict[str, str], what: str) -> Config:
        """The configuration giving each GGUF tensor the type ``types`` names (``what`` names them in errors)."""
        config = []
        for u, name in enumerate(self.gguf_names):
            qtype = types[name]
            if qtype not in self.types[u]:
                raise UserError(f"{what} puts {qtype} on {name}, which database {self.db.root} does not offer there "
                                f"(it has {','.join(self.types[u])}); rebuild it with --types including {qtype}")
            config.append(self.types[u].index(qtype))
        return tuple(config)

    def tensor_types(self, config: Config) -> dict[str, str]:
        """GGUF tensor name -> type."""
        return {name: self.types[u][lv] for u, (name, lv) in enumerate(zip(self.gguf_names, config))}

    def options(self) -> dict[str, Any]:
        return {"db": str(self.db.root.resolve()), "target_bytes": self.target_bytes, "tolerance": self.tolerance,
                "types": self.restricted}

    def level_labels(self, u: int) -> list[Any]:
        return list(self.types[u])

    def level_bits(self, u: int, level: int) -> int:
        return 8 * self.level_costs[u][level]

    def layer_bits(self, config: Config) -> dict[str, float]:
        return {name: bits_per_weight(self.types[u][lv]) for u, (name, lv) in enumerate(zip(self.units, config))}

    def budget_report(self, config: Config) -> dict[str, Any]:
        p = self.problem
        size = p.cost(config)
        histogram: dict[str, int] = {}
        for qtype in sorted(self.tensor_types(config).values()):
            histogram[qtype] = histogram.get(qtype, 0) + 1
        return {
            "target": self.target,
            "target_unit": "bytes" if self.target_bytes else "bits per weight of the quantized tensors",
            "rule": f"GGUF bytes of the weight tensors in [budget - {self.tolerance:.2%}, budget]",
            "budget_bytes": p.budget,
            "lowest_bytes": p.budget - p.slack,
            "bytes": size,
            "achieved": size if self.target_bytes else 8 * size / self.numel,
            "bits_per_weight": 8 * size / self.numel,
            "weights": self.numel,
            "imatrix": self.imatrix,
            "tensors_per_type": histogram,
            "unit_values": [bits_per_weight(self.types[u][lv]) for u, lv in enumerate(config)],
            "value_label": "bits per weight of the tensor's type",
        }
