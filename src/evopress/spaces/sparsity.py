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

import heapq
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..compressors.hessian import HessianAccumulator
from ..compressors.packing import pack_codes, unpack_codes
from ..compressors.sparsegpt import magnitude_prune, sparsegpt_prune_levels, wanda_prune
from ..data import TokenPool
from ..database import (BuildLog, ByteLRU, Database, VariantCache, calibrate_blocks, data_fingerprint, layer_file,
                        linear_units, model_fingerprint, save_layer, single_thread, tensor_bytes)
from ..errors import UserError
from ..evolution import NoMoveError, switch
from ..io import write_json
from ..models import Decoder
from .base import Config, Problem, Space

GROUP_RULES = ("global", "size")
DEFAULT_CENTER = 0.5
DEFAULT_LEVELS = 8  # per side, as the paper's num_levels
RANDOM_WALK = 4  # random_config: switches per unit from the uniform configuration
PROFILE = "sparsity_profile.json"

Pruner = Callable[[torch.Tensor, HessianAccumulator, list[int], float], list[torch.Tensor]]


def _sparsegpt(weight: torch.Tensor, acc: HessianAccumulator, zeros: list[int], damp: float) -> list[torch.Tensor]:
    return sparsegpt_prune_levels(weight, acc.hessian(), zeros, damp=damp)


def _wanda(weight: torch.Tensor, acc: HessianAccumulator, zeros: list[int], damp: float) -> list[torch.Tensor]:
    norms = acc.input_sq_norms()
    return [wanda_prune(weight, norms, z) for z in zeros]


def _magnitude(weight: torch.Tensor, acc: HessianAccumulator, zeros: list[int], damp: float) -> list[torch.Tensor]:
    return [magnitude_prune(weight, z) for z in zeros]


PRUNERS: dict[str, Pruner] = {"sparsegpt": _sparsegpt, "wanda": _wanda, "magnitude": _magnitude}


# ----------------------------------------------------------------------------------------------
# Level arithmetic (pure functions: the budget's exactness is tested on these)


def default_step(numels: Sequence[int]) -> int:
    """Δ = min(largest layer / 50, smallest layer / 4).

    The first term is the paper's scale (1e6 weights for 45-59M-weight MLP layers: the largest layers
    move about 2% sparsity per level); the second keeps the smallest layers (GQA k/v) at steps of at
    most 25%, so they still get a few levels. SmolLM2-135M: min(884,736/50, 110,592/4) = 17,694
    (2% for MLP, 5.3% for q/o, 16% for k/v).
    """
    return max(1, min(max(numels) // 50, min(numels) // 4))


def level_grid(numel: int, center: float, step: int, levels: int) -> tuple[int, list[int]]:
    """(first offset, zero counts) of one layer: ``round(center * numel) + l * step`` inside [0, numel]."""
    mid = round(Fraction(str(center)) * numel)
    offsets = [l for l in range(-levels, levels + 1) if 0 <= mid + l * step <= numel]
    return offsets[0], [mid + l * step for l in offsets]


def nearest_total(zeros: Sequence[Sequence[int]], step: int, target_zeros: Fraction) -> int:
    """Number of level steps above the all-minimum configuration whose total is nearest the target.

    Reachable totals are ``sum(min zeros) + k * step`` for every ``k`` from 0 to the sum of the units'
    level counts minus one, because each unit's levels are contiguous. Raises if the target lies more
    than half a step outside that range.
    """
    low = sum(z[0] for z in zeros)
    top = sum(len(z) - 1 for z in zeros)
    if target_zeros < low - Fraction(step, 2) or target_zeros > low + top * step + Fraction(step, 2):
        raise ValueError("target outside the database range")
    return min(max(round((target_zeros - low) / step), 0), top)


def sparsity_problem(numels: Sequence[int], zeros: Sequence[Sequence[int]], step: int, target_zeros: Fraction,
                     group_rule: str = "global") -> tuple[Problem, int]:
    """The search problem (costs: non-zeros per level) and its total level steps, from the level grids.

    Raises ValueError when the target is outside the grids' range (see ``nearest_total``).
    """
    steps = nearest_total(zeros, step, target_zeros)
    costs = tuple(tuple(n - z for z in zs) for n, zs in zip(numels, zeros))
    budget = sum(numels) - (sum(z[0] for z in zeros) + steps * step)
    if group_rule == "global":
        groups: tuple[tuple[int, ...], ...] = (tuple(range(len(numels))),)
    else:
        by_size: dict[int, list[int]] = {}
        for u, n in enumerate(numels):
            by_size.setdefault(n, []).append(u)
        groups = tuple(tuple(g) for g in by_size.values())
    problem = Problem(num_levels=tuple(len(z) for z in zeros), costs=costs, budget=budget, groups=groups)
    return problem, steps


def nearest_levels(zeros: Sequence[Sequence[int]], numels: Sequence[int], step: int, wanted: Sequence[float],
                   total: int) -> Config:
    """Level indices with ``sum == total`` minimising ``sum_u (z_u - wanted_u)^2 / n_u`` (n_u: layer size).

    ``wanted`` are desired zero counts. In level units the cost of unit ``u`` is convex,
    ``(l - ideal_u)^2 / n_u``, and separable, so starting from every unit's own best level and taking
    the cheapest single steps towards the required total is optimal. Dividing by ``n_u`` measures the
    error in sparsity (not weights), weighted by layer size: rounding slack goes to the large layers,
    where a step changes sparsity least.
    """
    ideal = [(w - z[0]) / step for w, z in zip(wanted, zeros)]
    config = [min(max(round(i), 0), len(z) - 1) for i, z in zip(ideal, zeros)]
    need = total - sum(config)
    sign = 1 if need > 0 else -1

    def marginal(u: int) -> float:
        lv = config[u]
        return ((lv + sign - ideal[u]) ** 2 - (lv - ideal[u]) ** 2) / numels[u]

    heap = [(marginal(u), u) for u in range(len(zeros)) if 0 <= config[u] + sign < len(zeros[u])]
    heapq.heapify(heap)
    for _ in range(abs(need)):
        _, u = heapq.heappop(heap)
        config[u] += sign
        if 0 <= config[u] + sign < len(zeros[u]):
            heapq.heappush(heap, (marginal(u), u))
    return tuple(config)


# ----------------------------------------------------------------------------------------------
# Storage: bitmask of non-zeros + their values


def value_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 for fp32/fp16 models (as the paper's database), bf16 for bf16 ones (fp16 cannot hold their range)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def level_keys(offset: int) -> tuple[str, str]:
    """Names of one level's tensors in a layer file: its packed mask and its non-zero values."""
    return f"{offset}.mask", f"{offset}.values"


def encode_level(offset: int, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = weight != 0
    mask_key, values_key = level_keys(offset)
    return {mask_key: pack_codes(mask.to(torch.uint8).reshape(-1), 1),
            values_key: weight[mask].to(value_dtype(weight.dtype))}


def decode_level(mask: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    keep = unpack_codes(mask, 1, shape).bool()
    return torch.zeros(shape, dtype=dtype, device=values.device).masked_scatter_(keep, values.to(dtype))


def build_sparsity_database(decoder: Decoder, pool: TokenPool, out: Path, center: float = DEFAULT_CENTER,
                            levels: int = DEFAULT_LEVELS, step: int | None = None, method: str = "sparsegpt",
                            batch_size: int = 8, damp: float = 0.01, progress: bool = True) -> dict[str, Any]:
    """Prune every linear layer of every block at all its levels; calibrated on dense-model inputs.

    Block-sequential (``calibrate_blocks``): block b's Hessians come from the outputs of the dense
    blocks 0..b-1; nothing pruned is installed, so every level of every layer sees the same dense
    inputs (the reference's "independent" database). One Hessian (one Cholesky factor) serves all
    levels of a layer. Each layer file also keeps the input's per-feature sum of squares, which OWL
    and Wanda need.
    """
    if method not in PRUNERS:
        raise UserError(f"unknown --method '{method}' for sparsity (choose from {', '.join(PRUNERS)})")
    if not 0 <= center <= 1:
        raise UserError(f"--target {center}: the database centre is an average sparsity in [0, 1]")
    if levels < 0:
        raise UserError(f"--levels {levels} must be >= 0")
    shapes = {name: tuple(m.weight.shape) for name, m in decoder.linear_layers().items()}
    numels = {name: o * i for name, (o, i) in shapes.items()}
    step = default_step(list(numels.values())) if step is None else step
    if step < 1:
        raise UserError(f"--step {step} must be a positive number of weights")
    grids = {name: level_grid(n, center, step, levels) for name, n in numels.items()}
    fingerprint = model_fingerprint(decoder.model)
    build = BuildLog(out, {"space": "sparsity", "model_fingerprint": fingerprint, "data_fingerprint":
                           data_fingerprint(pool), "method": method, "grids": grids, "damp": damp,
                           "dtype": str(decoder.head.weight.dtype)})
    start = time.perf_counter()

    def compress(b: int, layers: dict[str, nn.Linear], hessians: dict[str, HessianAccumulator]) -> None:
        for name, layer in layers.items():
            first, zeros = grids[name]
            keys = [k for o in range(first, first + len(zeros)) for k in level_keys(o)]
            if build.done(name, keys + ["input_sq_norms"]) is not None:
                continue  # solved before the build was interrupted
            with single_thread():
                variants = PRUNERS[method](layer.weight, hessians[name], zeros, damp)
            tensors = {"input_sq_norms": hessians[name].input_sq_norms()}
            for offset, weight in enumerate(variants, first):
                tensors.update(encode_level(offset, weight))
            save_layer(out, name, tensors)

    calibrate_blocks(decoder, pool, batch_size, compress, progress)
    size = sum(layer_file(out, name).stat().st_size for name in shapes)
    variants = sum(len(z) for _, z in grids.values())
    manifest = {
        "space": "sparsity",
        "model_fingerprint": fingerprint,
        "data": pool.source,
        "data_fingerprint": data_fingerprint(pool),
        "calibration": {"tokens": pool.tokens, "seq_len": pool.seq_len, "inputs": "dense model, block by block"},
        "method": method,
        "center": center,
        "levels": levels,
        "step": step,
        "damp": damp,
        "block_size": 128,
        "storage": "per level: 1-bit mask of the non-zeros + their values in "
                   + str(value_dtype(decoder.head.weight.dtype)).removeprefix("torch."),
        "layers": {name: {"shape": list(shapes[name]), "first_offset": grids[name][0], "zeros": grids[name][1]}
                   for name in shapes},
        "variants": variants,
        "bytes": size,
        "dense_fp16_bytes": 2 * sum(numels[name] * len(z) for name, (_, z) in grids.items()),
        "seconds": round(time.perf_counter() - start, 1),
    }
    build.finish(manifest)
    return manifest


# ----------------------------------------------------------------------------------------------
# The space


class SparsitySpace(Space):
    name = "sparsity"
    # Decoded levels, on the model's device. Why: consecutive candidates move a few layers back and
    # forth between the same levels, and on CPU decoding a level (masked_scatter_) costs ~10x a copy.
    DECODED_CACHE_BYTES = 1 << 30

    def __init__(self, decoder: Decoder, target: float, db: str | None = None, group_rule: str = "global"):
        if db is None:
            raise UserError("the sparsity space needs --db (build one with: evopress build-db --space sparsity "
                            "--target T --out DB)")
        if group_rule not in GROUP_RULES:
            raise UserError(f"unknown --group-rule '{group_rule}' for sparsity (choose from {', '.join(GROUP_RULES)})")
        if not 0 <= target <= 1:
            raise UserError(f"--target {target}: sparsity targets are average fractions of zeros in [0, 1]")
        self.decoder = decoder
        self.target = target
        self.group_rule = group_rule
        self.db = Database.open(db, self.name, decoder.model)
        manifest = self.db.manifest
        self.step: int = manifest["step"]
        self.num_blocks = decoder.num_blocks
        self.units, self.unit_block, self.layers = linear_units(decoder, self.db)
        entries = [manifest["layers"][name] for name in self.units]
        self.shapes = [tuple(e["shape"]) for e in entries]
        self.numels = [o * i for o, i in self.shapes]
        self.first_offsets = [e["first_offset"] for e in entries]
        self.zeros: list[list[int]] = [e["zeros"] for e in entries]
        self.weights = sum(self.numels)
        self.target_zeros = Fraction(str(target)) * self.weights
        try:
            self.problem, self.total_steps = sparsity_problem(self.numels, self.zeros, self.step, self.target_zeros,
                                                              group_rule)
        except ValueError:
            lo, hi = (sum(z[i] for z in self.zeros) / self.weights for i in (0, -1))
            raise UserError(f"--target {target} is outside database {self.db.root}, whose levels cover average "
                            f"sparsity {lo:.4f}..{hi:.4f} (centre {manifest['center']}); build one around the "
                            "target or with more --levels") from None
        self._variants = self._open_levels()
        self._decoded = ByteLRU(self.DECODED_CACHE_BYTES)
        self._dense = [m.weight.detach().to("cpu", copy=True) for m in self.layers]  # apply(None) restores these
        self._current: list[int | None] = [None] * len(self.units)  # level each layer holds (None: dense)

    def _level_keys(self, u: int, level: int) -> tuple[str, str]:
        return level_keys(self.first_offsets[u] + level)

    def _open_levels(self) -> VariantCache:
        """Check every layer file now; read levels on demand (``VariantCache``).

        Memory: the cache (up to ``$EVOPRESS_DB_CACHE_GB``, about 0.125 + 2 x density bytes per weight
        and level), the CPU copy of the dense linear weights (425 MB for SmolLM2-135M in fp32) and up to
        ``DECODED_CACHE_BYTES`` of decoded levels on the model's device.
        """
        # per layer: sum of x_j^2 over the database's inputs (OWL), read while each file is checked
        self.input_sq_norms = [
            self.db.check_layer(name, [k for lv in range(len(self.zeros[u])) for k in self._level_keys(u, lv)],
                                load=["input_sq_norms"])["input_sq_norms"]
            for u, name in enumerate(self.units)]
        return VariantCache(self.db)

    def dense_weight(self, u: int) -> torch.Tensor:
        return self._dense[u]

    def weight(self, u: int, level: int) -> torch.Tensor:
        """The layer's weight at a level; the caller must not modify it (it may be cached)."""
        return self._decoded.get((u, level), lambda: self._decode(u, level), tensor_bytes)

    def _decode(self, u: int, level: int) -> torch.Tensor:
        mask_key, values_key = self._level_keys(u, level)
        tensors = self._variants.get(self.units[u], (mask_key, values_key))
        mask, values = tensors[mask_key], tensors[values_key]
        device = self.layers[u].weight.device
        return decode_level(mask.to(device), values.to(device), self.shapes[u], self.layers[u].weight.dtype)

    @torch.no_grad()
    def apply(self, config: Config | None) -> None:
        for u, layer in enumerate(self.layers):
            want = None if config is None else config[u]
            if want == self._current[u]:
                continue
            layer.weight.copy_(self._dense[u] if want is None else self.weight(u, want))
            self._current[u] = want

    @classmethod
    def options_from_args(cls, args: Any) -> dict[str, Any]:
        db = getattr(args, "db", None)
        return {"db": str(Path(db).resolve()) if db else None,
                "group_rule": getattr(args, "group_rule", None) or "global"}

    def options(self) -> dict[str, Any]:
        return {"db": str(self.db.root.resolve()), "group_rule": self.group_rule}

    @classmethod
    def build_database(cls, decoder: Any, pool: Any, args: Any, out: Path, progress: bool) -> dict[str, Any]:
        center = DEFAULT_CENTER if args.target is None else args.target
        levels = DEFAULT_LEVELS if args.levels is None else args.levels
        return build_sparsity_database(decoder, pool, Path(out), center, levels, args.step,
                                       args.method or "sparsegpt", args.batch_size, progress=progress)

    def check_calibration(self, pool: Any) -> None:
        self.db.check_data(pool)

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

    def export(self, config: Config, out: Path, tokenizer: Any) -> dict[str, Any]:
        """A plain transformers checkpoint computing exactly ``config``: dense tensors with exact zeros.

        Leaves the model at ``config``. The per-layer profile goes to ``sparsity_profile.json``.
        """
        out = Path(out)
        self.apply(config)
        self.decoder.model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        report = self.budget_report(config)
        profile = {
            "space": self.name, "target": self.target, "achieved": report["achieved"],
            "method": self.db.manifest["method"], "step": self.step,
            "layers": {name: {"sparsity": s, "zeros": self.zeros[u][config[u]], "weights": self.numels[u],
                              "level": self.level_labels(u)[config[u]]}
                       for u, (name, s) in enumerate(zip(self.units, self.layer_sparsity(config)))},
        }
        write_json(out / PROFILE, profile)
        return {"out": str(out), "achieved_sparsity": round(report["achieved"], 4), "zeros": report["zeros"],
                "profile": str(out / PROFILE)}
