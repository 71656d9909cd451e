"""Joint space: drop attention/MLP sub-blocks and choose every remaining linear layer's bitwidth, in bytes.

Composition, not a fork: a ``QuantSpace`` (built without a target) supplies the layers, their levels
and decoded weights from a quant database; a ``DropSpace`` (sub-block granularity, no target)
supplies the dropping, the same module swap the depth space makes. Units are the quant space's
linear layers, then one unit per attention and per MLP sub-block (level 1: dropped).

Budget: true bytes, exactly what the export writes for a layer (``quant.levels.packed_bytes``:
int32-packed codes and zero points, fp16 scales, the shape), zero for a dropped sub-block. A
dropped sub-block is a ``Problem`` mask: while its unit is at level 1 its layers cost nothing and
their levels do not matter. ``--target`` is average bits per compressible weight counting scales
and zero points (``--target-bits``), or with ``--target-bytes`` a byte count. The search keeps the
achieved bytes in ``[budget - slack, budget]`` with ``slack = floor(budget * tolerance)`` (default
0.1%, ``--byte-tolerance``; a tiny model's layer steps need more): never above the target.
Layer steps cost unequal bytes, so no single up/down pair keeps a total; ``base.window_switch`` makes one
random move (a layer a level up or down, or a sub-block dropped or restored) and then moves other
layers one level at a time until the total is back in the window.

With ``with_sparsity`` (a sparsity database of the same model) a layer's levels also include combined
levels, a SparseGPT weight quantized at a bitwidth (``layers.SparseQuantLayers``, ``combined.py``), and
every layer's levels are ordered by true bytes, so a level up never costs less. A combined level's
bytes are those of the sparse layout of ``combined.py`` (a bitmask and the non-zeros' codes); the
export stores its codes densely and says how much more that takes. Labels: bits for the quant
database's weights (``4``), ``<sparsity>%@<bits>`` for combined ones (``50%@3``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from ...compressors.gptq import QuantizedWeight
from ...errors import UserError
from ...models import Decoder
from ..problem import BYTE_TOLERANCE, Config, Problem, check_tolerance, settle
from ..space import RetargetableSpace
from ..drop.space import DropSpace
from ..quant.space import QuantSpace
from .layers import LayerLevel, SparseQuantLayers, quant_levels

KEPT, DROPPED = "keep", "drop"


def check_target(target: float) -> None:
    if not target > 0:
        raise UserError(f"--target {target}: joint targets are average bits per weight (e.g. 3) or, with "
                        "--target-bytes, a byte count; both positive")


class JointSpace(RetargetableSpace):
    name = "joint"

    def __init__(self, decoder: Decoder, target: float | None, db: str | None = None, target_bytes: bool = False,
                 tolerance: float = BYTE_TOLERANCE, bits: Sequence[int] | None = None, with_sparsity: str | None = None):
        check_tolerance(tolerance)  # before the database opens
        self.quant = (QuantSpace(decoder, None, db=db, bits=bits) if with_sparsity is None
                      else SparseQuantLayers(decoder, db, bits, with_sparsity))
        self.with_sparsity = with_sparsity
        self.drop = DropSpace(decoder, None)
        self._dense_bytes = self.quant.dense_bytes()  # now: a dropped sub-block's modules are swapped out later
        self.decoder, self.target_bytes, self.tolerance = decoder, target_bytes, tolerance
        self.num_blocks = decoder.num_blocks
        q = self.layers = len(self.quant.units)
        self.units = self.quant.units + self.drop.units
        self.unit_block = self.quant.unit_block + self.drop.unit_block
        self.levels = [sorted(self._layer_levels(u), key=lambda lv: (lv.cost, lv.zeros, lv.bits)) for u in range(q)]
        self._uniform = [[next(i for i, lv in enumerate(levels) if lv.sparse is None and lv.bits == b)
                          for b in self.quant.bits] for levels in self.levels]
        self._labels = [labels(levels, o * i) for levels, (o, i) in zip(self.levels, self.quant.shapes)]
        self.layer_costs = tuple(tuple(lv.cost for lv in levels) for levels in self.levels)
        self.numel = self.quant.numel
        self.drop_masks = tuple((q + i, 1, self._members(sub)) for i, sub in enumerate(self.drop.units))
        self.set_target(target)

    def set_target(self, target: float | None) -> None:
        """Set ``target`` and the byte budget; no target: every layer at its top level (for reading configurations)."""
        costs, subs = self.layer_costs, len(self.drop.units)
        top = sum(c[-1] for c in costs)
        budget = self._budget(target) if target is not None else top
        if budget > top:
            raise UserError(f"--target {target:g} is above the most expensive configuration: {top:,} bytes "
                            f"({8 * top / self.numel:.4f} bits per weight) with every layer at "
                            f"{self.quant.bits[-1]} bits; database {self.quant.db.root}")
        cheapest = min(sum(costs[u][0] for u in members) for _, _, members in self.drop_masks)
        if 0 < budget < cheapest:  # only the empty configuration is cheaper, and it is below any byte window
            need = cheapest if self.target_bytes else math.ceil(8e4 * cheapest / self.numel) / 1e4
            raise UserError(f"--target {target:g} is below the cheapest configuration that keeps a sub-block "
                            f"({cheapest:,} bytes: one at its cheapest levels, every other dropped); give --target "
                            f"{need:g} or more")
        self.target = target
        self.problem = Problem(num_levels=tuple(map(len, self.levels)) + (2,) * subs,
                               costs=costs + ((0, 0),) * subs, budget=budget, groups=(tuple(range(len(self.units))),),
                               slack=math.floor(budget * self.tolerance), masks=self.drop_masks)

    def _layer_levels(self, u: int) -> list[LayerLevel]:
        return self.quant.levels(u) if isinstance(self.quant, SparseQuantLayers) else quant_levels(self.quant, u)

    def _budget(self, target: float) -> int:
        check_target(target)
        return math.floor(target) if self.target_bytes else math.floor(target * self.numel / 8)

    def _members(self, sub_block: str) -> tuple[int, ...]:
        members = tuple(u for u, name in enumerate(self.quant.units) if name.startswith(sub_block + "."))
        if not members:
            raise UserError(f"cannot drop {sub_block}: it holds none of the database's linear layers")
        return members

    # -- the two composed spaces -------------------------------------------------------------------

    def split(self, config: Config) -> tuple[Config, Config]:
        """(quant levels of the layers, depth levels of the sub-blocks)."""
        return tuple(config[: self.layers]), tuple(config[self.layers:])

    def apply(self, config: Config | None) -> None:
        layers, subs = (None, None) if config is None else self.split(config)
        self.quant.apply(None if layers is None else tuple(self.levels[u][lv].key for u, lv in enumerate(layers)))
        self.drop.apply(subs)

    def dropped(self, config: Config) -> list[tuple[bool, bool]]:
        return self.drop.masks(self.split(config)[1])

    def kept_layers(self, config: Config) -> list[int]:
        """Layer units whose sub-block is kept."""
        return [u for u in range(self.layers) if self.problem.active(config, u)]

    def compose(self, layer_levels: Sequence[int], masks: Sequence[tuple[bool, bool]]) -> Config:
        return tuple(layer_levels) + self.drop.config_from_masks(list(masks))

    def uniform_levels(self, bit_index: int) -> Config:
        """Levels of the layers with every one at ``quant.bits[bit_index]``, unpruned."""
        return tuple(indices[bit_index] for indices in self._uniform)

    def quantized(self, u: int, level: int) -> QuantizedWeight:
        """Layer ``u``'s weight at ``level`` as the export packs it."""
        lv = self.levels[u][level]
        if lv.sparse is None:
            return self.quant.quantized(u, lv.bits)
        assert isinstance(self.quant, SparseQuantLayers)
        return self.quant.combined_weight(u, lv)

    # -- configurations ------------------------------------------------------------------------------

    def random_config(self, rng: np.random.Generator, attempts: int = 20) -> Config:
        """The lowest uniform bitwidth above the window (sub-blocks dropped at random while even the cheapest
        levels are above), then random single-level moves down into the window (``base.settle``).

        A set of drops can leave only layer steps too coarse to land in the window; another draw of
        drops is tried then, ``attempts`` times in all.
        """
        p, n, subs = self.problem, self.layers, len(self.drop.units)
        bits = range(len(self.quant.bits))
        start = next((b for b in bits if p.cost(self.uniform_levels(b) + (0,) * subs) > p.budget), bits[-1])
        for _ in range(attempts):
            config = list(self.uniform_levels(start)) + [0] * subs
            for s in rng.permutation(subs):
                if p.cost([0] * n + config[n:]) <= p.budget:
                    break
                config[n + int(s)] = 1
            # enough moves to walk every layer through all its levels (combined levels make many small steps)
            if settle(config, p, rng, range(len(config)), max_moves=2 * sum(p.num_levels)):
                return tuple(config)
        raise UserError(f"--target {self.target:g}: no configuration found within {self.tolerance:.2%} below "
                        f"{p.budget:,} bytes; the layer steps are too coarse for the window (raise --byte-tolerance)")

    def options(self) -> dict[str, Any]:
        return {"db": str(self.quant.db.root.resolve()), "bits": list(self.quant.bits),
                "target_bytes": self.target_bytes, "tolerance": self.tolerance, "with_sparsity": self.with_sparsity}

    def check_calibration(self, pool: Any) -> None:
        self.quant.check_calibration(pool)  # and the sparsity database's (SparseQuantLayers)

    def level_labels(self, u: int) -> list[Any]:
        return self._labels[u] if u < self.layers else [KEPT, DROPPED]

    def layer_bits(self, config: Config) -> dict[str, int]:
        """Bits of every layer whose sub-block is kept (pruned or not)."""
        return {self.units[u]: self.levels[u][config[u]].bits for u in self.kept_layers(config)}

    # -- size -----------------------------------------------------------------------------------------

    def size_bytes(self, config: Config) -> int:
        return self.problem.cost(config)

    def dense_bytes(self) -> int:
        return self._dense_bytes

    def budget_report(self, config: Config) -> dict[str, Any]:
        p = self.problem
        size = p.cost(config)
        masks = self.dropped(config)
        kept = [(u, self.levels[u][config[u]]) for u in self.kept_layers(config)]
        values = [0.0] * self.layers
        for u, lv in kept:  # bits; with sparsity levels, stored bits per weight (mask, codes, scales, zero points)
            values[u] = float(lv.bits) if self.with_sparsity is None else 8 * lv.cost / self._numel(u)
        for i, (b, kind) in enumerate((b, k) for k in range(2) for b in range(self.num_blocks)):
            members = p.masks[i][2]
            values.append(0.0 if masks[b][kind] else sum(values[m] for m in members) / len(members))
        report = {
            "target": self.target,
            "target_unit": "bytes" if self.target_bytes else "average bits per weight (scales and zero points counted)",
            "rule": f"true bytes in [budget - {self.tolerance:.2%}, budget]: packed codes, fp16 scales and packed zero "
                    "points per group as the export stores them; 0 for a dropped sub-block",
            "budget_bytes": p.budget,
            "lowest_bytes": p.budget - p.slack,
            "bytes": size,
            "achieved": 8 * size / self.numel,
            "bits_per_weight": 8 * size / self.numel,
            "dense_bytes": self.dense_bytes(),
            "weights": self.numel,
            "dropped_attention": [b for b, (a, _) in enumerate(masks) if a],
            "dropped_mlp": [b for b, (_, m) in enumerate(masks) if m],
            "removed_blocks": [b for b, (a, m) in enumerate(masks) if a and m],
            "layers_per_bitwidth": _histogram(lv.bits for _, lv in kept),
            "group_size": self.quant.group_size,
            "unit_values": values,
            "value_label": "bits (0: dropped)" if self.with_sparsity is None else "stored bits per weight (0: dropped)",
        }
        if self.with_sparsity is not None:
            report["sparsity"] = self._sparsity_mix(kept)
        return report

    def _numel(self, u: int) -> int:
        out, n = self.quant.shapes[u]
        return out * n

    def _sparsity_mix(self, kept: list[tuple[int, LayerLevel]]) -> dict[str, Any]:
        """How much of the kept layers is pruned, and at which bitwidths."""
        sparse = [(u, lv) for u, lv in kept if lv.sparse is not None]
        fractions = [lv.zeros / self._numel(u) for u, lv in sparse]
        zeros = sum(lv.zeros for _, lv in sparse)
        return {
            "database": self.with_sparsity,
            "rule": "a pruned layer costs a 1-bit mask per weight, int32-packed codes of its non-zeros and the "
                    "same scales and zero points; the export stores its codes densely (docs/joint.md)",
            "sparse_layers": len(sparse),
            "zeros": zeros,
            "fraction_of_weights": zeros / self.numel,
            "sparse_layers_per_bitwidth": _histogram(lv.bits for _, lv in sparse),
            "layer_sparsity_range": [min(fractions), max(fractions)] if sparse else None,
        }


def _histogram(bits: Iterable[int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for b in sorted(bits):
        counts[str(b)] = counts.get(str(b), 0) + 1
    return counts


def labels(levels: Sequence[LayerLevel], numel: int) -> list[Any]:
    """A layer's level labels: bits for a quant database weight (``4``), ``<sparsity>%@<bits>`` for a combined
    level (``50%@3``), with the fewest decimals that keep the layer's sparsities apart."""
    fractions = sorted({lv.zeros / numel for lv in levels if lv.sparse is not None})
    text: dict[float, str] = {}
    for decimals in range(7):
        text = {f: f"{100 * f:.{decimals}f}" for f in fractions}
        if len(set(text.values())) == len(fractions):
            break
    return [lv.bits if lv.sparse is None else f"{text[lv.zeros / numel]}%@{lv.bits}" for lv in levels]
