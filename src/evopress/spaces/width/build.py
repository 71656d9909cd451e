"""Width database build: for every unit and level, which structures stay and the updated output projection.

Block-sequential on the dense model's inputs (``build_layerwise``; nothing thinned is installed), so the
levels of any two blocks can be stitched into one profile. Per unit, one greedy removal run over its
structures (``compressors.structured``) gives a nested removal order and, at every level's width, the
output projection restricted to the kept columns, updated by OBS to make up for the removed ones. The
input projections (q/k/v, gate/up) are only sliced, never changed, so they are not stored: a layer file
holds the removal order plus one [out, kept columns] weight per intermediate level, in fp16 (bf16 for a
bf16 model). Level 0 and the full width store nothing.

``--method activation`` ranks structures by their input's L2 norm and keeps the dense columns (no update):
the training-free importance baseline (Minitron-style), measured with the same search and baselines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...compressors.hessian import HessianAccumulator
from ...compressors.structured import activation_order, kept_columns, obs_prune, structure_columns
from ...data import TokenPool
from ...database import single_thread, value_dtype
from ...errors import UserError
from ...models import Decoder
from ..layerwise import build_layerwise
from .structures import Unit, default_step, find_units

METHODS = ("obs", "activation")
ORDER = "order"


def level_key(width: int) -> str:
    return f"{width}.weight"


def stored_widths(unit: Unit) -> list[int]:
    """The widths whose weight a layer file holds: all but 0 (nothing) and the full width (the dense weight)."""
    return [w for w in unit.widths if 0 < w < unit.structures]


def chunk(structures: int) -> int:
    """Structures removed per OBS step: 1/256 of them (one below 512). Why: each step updates the whole inverse
    Hessian, so exact one-at-a-time greedy costs 28 s per SmolLM2 MLP on one CPU thread and hours per 70B
    MLP; in 256 steps it takes 5.5 s, and the output error at half the channels moved by 0.05% in our
    measurement (tests/test_width.py measures the bound on synthetic layers)."""
    return max(1, structures // 256)


def solve_unit(unit: Unit, hessian: torch.Tensor, method: str, damp: float) -> dict[str, torch.Tensor]:
    weight = unit.output.weight.detach()
    columns = structure_columns(unit.structures, unit.size)
    widths = stored_widths(unit)
    if method == "obs":
        order, snapshots = obs_prune(weight, hessian, columns, widths, damp=damp, chunk=chunk(unit.structures))
    else:
        order = activation_order(hessian, columns)
        snapshots = {w: weight[:, kept_columns(order, columns, w).to(weight.device)] for w in widths}
    dtype = value_dtype(weight.dtype)
    return {ORDER: torch.tensor(order, dtype=torch.int32),
            **{level_key(w): snapshots[w].to(dtype) for w in widths}}


def build_width_database(decoder: Decoder, pool: TokenPool, out: Path, method: str = "obs",
                         mlp_step: int | None = None, damp: float = 0.01, batch_size: int = 8,
                         progress: bool = True) -> dict[str, Any]:
    if method not in METHODS:
        raise UserError(f"unknown --method '{method}' for width (choose from {', '.join(METHODS)})")
    step = default_step(decoder) if mlp_step is None else mlp_step
    units = {u.name: u for u in find_units(decoder, step)}

    def keys(name: str) -> list[str]:
        return [ORDER] + [level_key(w) for w in stored_widths(units[name])]

    def solve(name: str, layer: nn.Linear, acc: HessianAccumulator) -> dict[str, torch.Tensor]:
        with single_thread():
            return solve_unit(units[name], acc.hessian(), method, damp)

    def describe() -> dict[str, Any]:
        return {
            "calibration": {"tokens": pool.tokens, "seq_len": pool.seq_len, "inputs": "dense model, block by block"},
            "method": method,
            "mlp_step": step,
            "damp": damp,
            "storage": "per unit: removal order + per intermediate level the output projection's kept columns in "
                       + str(value_dtype(decoder.head.weight.dtype)).removeprefix("torch."),
            "layers": {name: {"kind": u.kind, "block": u.block, "widths": list(u.widths), "size": u.size}
                       for name, u in units.items()},
        }

    return build_layerwise(decoder, pool, out, "width", {"method": method, "mlp_step": step, "damp": damp},
                           keys, solve, describe, batch_size, progress, select=lambda name: name in units)


def build(decoder: Decoder, pool: TokenPool, options: dict[str, Any], out: Path, batch_size: int,
          progress: bool) -> dict[str, Any]:
    """The plugin's builder: ``build-db --space width`` options to ``build_width_database``."""
    return build_width_database(decoder, pool, out, options["method"], options["mlp_step"], batch_size=batch_size,
                                progress=progress)
