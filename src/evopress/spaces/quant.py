"""Quantization space: one bitwidth per linear layer, from a GPTQ level database.

Units are the linear layers of the decoder blocks; level ``l`` of a unit is the ``l``-th bitwidth of
``bits`` (ascending). A level's cost is an integer number of bits: ``bits * numel`` for the weights,
plus, with ``overhead=True``, ``(16 + bits)`` per quantization group for its fp16 scale and its
``bits``-wide zero point (exactly what the packed database and the compressed-tensors export store).
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

Levels default to the longest equally spaced run of the database's bitwidths starting at the
smallest (2..6 of 2,3,4,5,6,8): with unequal steps (6 -> 8 costs twice 5 -> 6) a single-step switch
pairing them is never budget-neutral, so a level past the gap is unreachable from configurations that
do not already use it, and the search would only waste rejected children on it.
"""

from __future__ import annotations

import math
import re
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..compressors.gptq import QuantGrid, QuantizedWeight, gptq_quantize_levels
from ..compressors.hessian import HessianAccumulator
from ..data import TokenPool
from ..database import (BuildLog, Database, VariantCache, calibrate_blocks, data_fingerprint, layer_file, linear_units,
                        model_fingerprint, save_layer, single_thread)
from ..errors import UserError
from ..models import Decoder
from .base import Config, Problem, Space

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_CALIB_BITS = 3  # the paper's calibration bitwidth; 0 builds every block on dense inputs
SCALE_BITS = 16  # one fp16 scale per group
GROUP_RULES = ("size", "name")
PACKED = ("codes", "scales", "zeros")  # per bitwidth in a layer file: packed codes, fp16 scales, packed zero points
MAX_DP_STATES = 50_000_000  # reachable-total DP array; far above any grid whose groups divide in_features


def packed_keys(bits: int) -> dict[str, str]:
    """Names of one bitwidth's tensors in a layer file, by the part of ``QuantizedWeight.to_packed`` they hold."""
    return {k: f"{bits}.{k}" for k in PACKED}


def parse_bits(text: str | Sequence[int] | None, default: Sequence[int] = DEFAULT_BITS) -> tuple[int, ...]:
    if text is None or text == "":
        return tuple(default)
    try:
        bits = [int(b) for b in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        bits = []
    if not bits or any(not 1 <= b <= 8 for b in bits) or len(set(bits)) != len(bits):
        raise UserError(f"--bits '{text}' must be distinct integers in 1..8, e.g. 2,3,4,5,6,8")
    return tuple(sorted(bits))


def default_levels(stored: Sequence[int]) -> tuple[int, ...]:
    """Longest equally spaced run of ``stored`` starting at its smallest bitwidth (see module doc)."""
    stored = sorted(stored)
    if len(stored) < 2:
        return tuple(stored)
    step = min(b - a for a, b in zip(stored, stored[1:]))
    run = [stored[0]]
    while run[-1] + step in stored:
        run.append(run[-1] + step)
    return tuple(run)


def default_group_size(in_features: Sequence[int]) -> int:
    """128 (the paper's) if it divides every layer's in_features, else the largest power of two that does.

    SmolLM2's hidden size 576 = 4.5 x 128 gets 64. Below 16 the metadata would dominate, so such
    models fall back to per-channel grids (-1).
    """
    for g in (128, 64, 32, 16):
        if all(n % g == 0 for n in in_features):
            return g
    return -1


def level_cost(bits: int, shape: tuple[int, int], grid: QuantGrid, overhead: bool) -> int:
    """Bits one layer takes at ``bits``; with ``overhead`` its fp16 scales and bit-wide zero points too."""
    out, n = shape
    cost = bits * out * n
    if overhead:
        cost += out * (n // grid.group_len(n)) * (SCALE_BITS + bits)
    return cost


# ----------------------------------------------------------------------------------------------
# Exact-budget dynamic programs (multiple-choice knapsack with an equality constraint)


def _scaled(costs: Sequence[Sequence[int]]) -> tuple[int, int, list[list[int]]]:
    """Costs as (sum of per-unit minima, common divisor g, per-unit offsets above the minimum / g).

    Every achievable total is base + g * s for an integer s, so a DP over s is exact. It is also small
    for transformer layers, whose sizes share a large divisor: SmolLM2 at 2-6 bits has 3,840 states.
    """
    base = [min(c) for c in costs]
    g = 0
    for c, b in zip(costs, base):
        for x in c:
            g = math.gcd(g, x - b)
    g = g or 1
    return sum(base), g, [[(x - b) // g for x in c] for c, b in zip(costs, base)]


def _check_states(states: int) -> None:
    if states > MAX_DP_STATES:
        raise UserError(f"the exact-budget DP would need {states:,} states: the layer costs share too small "
                        "a common divisor (per-channel grids with --count-overhead?); use a group size that "
                        "divides every layer's in_features")


def max_reachable(costs: Sequence[Sequence[int]], limit: int) -> int | None:
    """The largest total sum(costs[u][level_u]) that is <= limit, or None if even the cheapest exceeds it."""
    base, g, offsets = _scaled(costs)
    if limit < base:
        return None
    top = min((limit - base) // g, sum(max(o) for o in offsets))
    _check_states(top + 1)
    reach = np.zeros(top + 1, dtype=bool)
    reach[0] = True
    for o in offsets:
        nxt = np.zeros_like(reach)
        for x in set(o):
            if x <= top:
                nxt[x:] |= reach[: top + 1 - x]
        reach = nxt
    return base + g * int(np.flatnonzero(reach)[-1])


def exact_knapsack(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]],
                   budget: int) -> tuple[int, ...] | None:
    """Levels minimising sum(errors[u][level_u]) subject to sum(costs[u][level_u]) == budget exactly.

    Classic DP over units with the total cost (in units of the common divisor) as state; ties go to
    the lowest level index. Returns None when no configuration meets the budget.
    """
    base, g, offsets = _scaled(costs)
    if budget < base or (budget - base) % g:
        return None
    top = (budget - base) // g
    _check_states((top + 1) * max(1, len(costs)))
    best = np.full(top + 1, np.inf)
    best[0] = 0.0
    choices = np.zeros((len(costs), top + 1), dtype=np.int16)
    for u, (o, e) in enumerate(zip(offsets, errors)):
        cand = np.full((len(o), top + 1), np.inf)
        for level, (x, err) in enumerate(zip(o, e)):
            if x <= top:
                cand[level, x:] = best[: top + 1 - x] + float(err)
        choices[u] = np.argmin(cand, axis=0)
        best = cand[choices[u], np.arange(top + 1)]
    if not np.isfinite(best[top]):
        return None
    config, s = [0] * len(costs), top
    for u in reversed(range(len(costs))):
        config[u] = int(choices[u, s])
        s -= offsets[u][config[u]]
    return tuple(config)


# ----------------------------------------------------------------------------------------------
# Database construction


def _relative_error(weight: torch.Tensor, q: QuantizedWeight, H: torch.Tensor) -> float:
    """Layer output error tr(dW H dW^T) / tr(W H W^T): the per-layer proxy the DP baseline adds up."""
    W = weight.float()
    dW = W - q.dequantize(torch.float32).to(W.device)
    return float(((dW @ H) * dW).sum() / ((W @ H) * W).sum().clamp_min(1e-30))


def build_quant_database(decoder: Decoder, pool: TokenPool, out: Path, bits: tuple[int, ...], group_size: int,
                         calib_bits: int, batch_size: int, damp: float = 0.01,
                         progress: bool = True) -> dict[str, Any]:
    """GPTQ every linear layer at every bitwidth; block-sequential with ``calib_bits`` installed between blocks.

    Each bitwidth is an independent GPTQ pass over one shared Hessian (asymmetric min-max grid, block
    128, no act-order: the paper's "FastOBQ"). After a block is done, its ``calib_bits`` version is
    written into the model, so later blocks are calibrated on inputs of a quantized model, as in the
    reference (``calib_bits=0``: dense inputs). Leaves the model's linear weights at ``calib_bits``.
    Layers are stored packed (codes and zero points bit-packed, fp16 scales), never dequantized.
    """
    if calib_bits and calib_bits not in bits:
        raise UserError(f"--calib-bits {calib_bits} must be one of --bits {','.join(map(str, bits))} (or 0: dense)")
    shapes = {name: tuple(m.weight.shape) for name, m in decoder.linear_layers().items()}
    try:
        grids = [QuantGrid(b, group_size) for b in bits]
        for shape in shapes.values():
            grids[0].group_len(shape[1])
    except ValueError as e:
        raise UserError(f"--group-size {group_size}: {e}; choose one dividing every layer's in_features "
                        "or -1 for per-channel") from e
    fingerprint = model_fingerprint(decoder.model)  # before calibration overwrites weights
    build = BuildLog(out, {"space": "quant", "model_fingerprint": fingerprint, "data_fingerprint":
                           data_fingerprint(pool), "bits": list(bits), "group_size": group_size,
                           "calib_bits": calib_bits, "damp": damp, "dtype": str(decoder.head.weight.dtype)})
    keys = [key for g in grids for key in packed_keys(g.bits).values()] + ["errors"]
    errors: dict[str, dict[str, float]] = {}
    start = time.perf_counter()

    def compress(b: int, layers: dict[str, nn.Linear], hessians: dict[str, HessianAccumulator]) -> None:
        for name, layer in layers.items():
            stored = build.done(name, keys)
            if stored is None:
                H = hessians[name].hessian()
                with single_thread():  # GPTQ's column loop: 0.15 s vs 5 s per level with 2 threads here
                    levels = gptq_quantize_levels(layer.weight, H, grids, damp=damp)
                rel = [_relative_error(layer.weight, q, H) for q in levels]
                save_layer(out, name, {**{packed_keys(g.bits)[k]: v for g, q in zip(grids, levels)
                                          for k, v in q.to_packed().items()},
                                       "errors": torch.tensor(rel, dtype=torch.float64)})
                calib = levels[bits.index(calib_bits)] if calib_bits else None
            else:  # solved before the build was interrupted
                rel = stored["errors"].tolist()
                calib = QuantizedWeight.from_packed({k: stored[key] for k, key in packed_keys(calib_bits).items()},
                                                    shapes[name],
                                                    QuantGrid(calib_bits, group_size)) if calib_bits else None
            errors[name] = {str(g.bits): e for g, e in zip(grids, rel)}
            if calib is not None:
                layer.weight.data.copy_(calib.dequantize(layer.weight.dtype))

    calibrate_blocks(decoder, pool, batch_size, compress, progress)
    size = sum(layer_file(out, name).stat().st_size for name in shapes)
    manifest = {
        "space": "quant",
        "model_fingerprint": fingerprint,
        "data": pool.source,
        "data_fingerprint": data_fingerprint(pool),
        "calibration": {"tokens": pool.tokens, "seq_len": pool.seq_len},
        "method": "gptq",
        "bits": list(bits),
        "group_size": group_size,
        "symmetric": False,
        "act_order": False,
        "block_size": 128,
        "damp": damp,
        "calib_bits": calib_bits,
        "layers": {name: list(shape) for name, shape in shapes.items()},
        "errors": errors,
        "error_metric": "tr(dW H dW^T) / tr(W H W^T) on the database's calibration inputs",
        "bytes": size,
        "seconds": round(time.perf_counter() - start, 1),
    }
    build.finish(manifest)
    return manifest


# ----------------------------------------------------------------------------------------------
# The space


class QuantSpace(Space):
    name = "quant"

    def __init__(self, decoder: Decoder, target: float, db: str | None = None, group_rule: str = "size",
                 overhead: bool = False, bits: Sequence[int] | None = None):
        if db is None:
            raise UserError("the quant space needs --db (build one with: evopress build-db --space quant --out DB)")
        if group_rule not in GROUP_RULES:
            raise UserError(f"unknown --group-rule '{group_rule}' for quant (choose from {', '.join(GROUP_RULES)}; "
                            "'global' cannot keep an exact bit budget across layers of different sizes)")
        if not target > 0:
            raise UserError(f"--target {target}: quant targets are average bits per weight, e.g. 3 or 2.5")
        self.decoder = decoder
        self.target = target
        self.group_rule = group_rule
        self.overhead = overhead
        self.db = Database.open(db, self.name, decoder.model)
        manifest = self.db.manifest
        stored = manifest["bits"]
        self.bits = tuple(bits) if bits is not None else default_levels(stored)
        if not self.bits or list(self.bits) != sorted(set(self.bits)) or not set(self.bits) <= set(stored):
            raise UserError(f"quant levels {list(self.bits)} must be ascending bitwidths stored in the database "
                            f"({','.join(map(str, stored))})")
        self.grid_size = manifest["group_size"]
        self.num_blocks = decoder.num_blocks
        self.units, self.unit_block, self.layers = linear_units(decoder, self.db)
        self.shapes = [tuple(manifest["layers"][name]) for name in self.units]
        self.numel = sum(o * i for o, i in self.shapes)
        costs = tuple(tuple(level_cost(b, s, self.grid(b), overhead) for b in self.bits) for s in self.shapes)
        self.target_bits = math.floor(Fraction(str(target)) * self.numel)
        budget = max_reachable(costs, self.target_bits)
        if budget is None:
            lowest = sum(c[0] for c in costs) / self.numel
            raise UserError(f"--target {target} is below the cheapest configuration ({lowest:.4f} bits per weight "
                            f"with every layer at {self.bits[0]} bits, {self.accounting()})")
        self.problem = Problem(num_levels=(len(self.bits),) * len(self.units), costs=costs, budget=budget,
                               groups=self._groups(costs))
        self._variants = self._open_levels()
        # Weights are swapped, never overwritten: the dense originals stay as they are (on CPU; no copy
        # on a CPU model), and going dense stashes each layer's quantized tensor, so the fitness's
        # teacher passes cost no dequantization when the next candidate shares the bitwidths.
        self._dense = [m.weight.data.to("cpu") for m in self.layers]
        self._stash: list[tuple[int, torch.Tensor] | None] = [None] * len(self.units)
        self._current: list[int | None] = [None] * len(self.units)  # bitwidth each layer holds (None: dense)

    def grid(self, bits: int) -> QuantGrid:
        return QuantGrid(bits, self.grid_size)

    def accounting(self) -> str:
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

    def _open_levels(self) -> VariantCache:
        """Check every layer file now; read packed levels on demand, dequantized only when applied."""
        for name in self.units:
            self.db.check_layer(name, [key for b in self.bits for key in packed_keys(b).values()])
        return VariantCache(self.db)

    def quantized(self, u: int, bits: int) -> QuantizedWeight:
        keys = packed_keys(bits)
        packed = self._variants.get(self.units[u], list(keys.values()))
        device = self.layers[u].weight.device
        return QuantizedWeight.from_packed({k: packed[key].to(device) for k, key in keys.items()},
                                           self.shapes[u], self.grid(bits))

    @torch.no_grad()
    def apply(self, config: Config | None) -> None:
        for u, layer in enumerate(self.layers):
            want = None if config is None else self.bits[config[u]]
            have = self._current[u]
            if want == have:
                continue
            if want is None:
                self._stash[u] = (have, layer.weight.data)
                weight = self._dense[u].to(layer.weight.device)
            else:
                stash, self._stash[u] = self._stash[u], None  # at most two weight copies per layer
                weight = stash[1] if stash is not None and stash[0] == want else \
                    self.quantized(u, want).dequantize(layer.weight.dtype)
            layer.weight.data = weight
            self._current[u] = want

    @classmethod
    def options_from_args(cls, args: Any) -> dict[str, Any]:
        db = getattr(args, "db", None)
        return {"db": str(Path(db).resolve()) if db else None,
                "group_rule": getattr(args, "group_rule", None) or "size",
                "overhead": bool(getattr(args, "count_overhead", False))}

    def options(self) -> dict[str, Any]:
        return {"db": str(self.db.root.resolve()), "group_rule": self.group_rule, "overhead": self.overhead,
                "bits": list(self.bits)}

    @classmethod
    def build_database(cls, decoder: Any, pool: Any, args: Any, out: Path, progress: bool) -> dict[str, Any]:
        bits = parse_bits(args.bits)
        in_features = [m.in_features for m in decoder.linear_layers().values()]
        group_size = args.group_size if args.group_size is not None else default_group_size(in_features)
        calib_bits = DEFAULT_CALIB_BITS if args.calib_bits is None else args.calib_bits
        return build_quant_database(decoder, pool, Path(out), bits, group_size, calib_bits, args.batch_size,
                                    progress=progress)

    def check_calibration(self, pool: Any) -> None:
        self.db.check_data(pool)

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
            "group_size": self.grid_size,
            "group_rule": self.group_rule,
            "level_values": list(self.bits),
            "layers_per_bitwidth": histogram,
        }

    def export(self, config: Config, out: Path, tokenizer: Any) -> dict[str, Any]:
        from ..export_quant import export_quantized

        return export_quantized(self, config, Path(out), tokenizer)
