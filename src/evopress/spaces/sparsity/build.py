"""Sparsity database build: every linear layer pruned at all its levels, on dense-model inputs.

Block-sequential (``build_layerwise``): block b's Hessians come from the outputs of the dense blocks
0..b-1; nothing pruned is installed, so every level of every layer sees the same dense inputs (the
reference's "independent" database). One Hessian (one Cholesky factor) serves all levels of a layer;
levels are solved independently from the dense weight, so they are not nested. Each layer file also
keeps the input's per-feature sum of squares, which OWL and Wanda need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ...compressors.hessian import HessianAccumulator
from ...compressors.sparsegpt import magnitude_prune, sparsegpt_prune_levels, wanda_prune
from ...data import TokenPool
from ...database import single_thread
from ...errors import UserError
from ...models import Decoder
from ..layerwise import build_layerwise
from .levels import default_step, level_grid
from .storage import encode_level, level_keys, value_dtype

DEFAULT_CENTER = 0.5
DEFAULT_LEVELS = 8  # per side, as the paper's num_levels

Pruner = Callable[[torch.Tensor, HessianAccumulator, list[int], float], list[torch.Tensor]]


def _sparsegpt(weight: torch.Tensor, acc: HessianAccumulator, zeros: list[int], damp: float) -> list[torch.Tensor]:
    return sparsegpt_prune_levels(weight, acc.hessian(), zeros, damp=damp)


def _wanda(weight: torch.Tensor, acc: HessianAccumulator, zeros: list[int], damp: float) -> list[torch.Tensor]:
    norms = acc.input_sq_norms()
    return [wanda_prune(weight, norms, z) for z in zeros]


def _magnitude(weight: torch.Tensor, acc: HessianAccumulator, zeros: list[int], damp: float) -> list[torch.Tensor]:
    return [magnitude_prune(weight, z) for z in zeros]


PRUNERS: dict[str, Pruner] = {"sparsegpt": _sparsegpt, "wanda": _wanda, "magnitude": _magnitude}


def build_sparsity_database(decoder: Decoder, pool: TokenPool, out: Path, center: float = DEFAULT_CENTER,
                            levels: int = DEFAULT_LEVELS, step: int | None = None, method: str = "sparsegpt",
                            batch_size: int = 8, damp: float = 0.01, progress: bool = True) -> dict[str, Any]:
    """Prune every linear layer of every block at all its levels (see the module docstring)."""
    if method not in PRUNERS:
        raise UserError(f"unknown --method '{method}' for sparsity (choose from {', '.join(PRUNERS)})")
    if not 0 <= center <= 1:
        raise UserError(f"--center {center}: the database centre is an average sparsity in [0, 1]")
    if levels < 0:
        raise UserError(f"--levels {levels} must be >= 0")
    shapes = {name: tuple(m.weight.shape) for name, m in decoder.linear_layers().items()}
    numels = {name: o * i for name, (o, i) in shapes.items()}
    step = default_step(list(numels.values())) if step is None else step
    if step < 1:
        raise UserError(f"--step {step} must be a positive number of weights")
    grids = {name: level_grid(n, center, step, levels) for name, n in numels.items()}

    def keys(name: str) -> list[str]:
        first, zeros = grids[name]
        return [k for o in range(first, first + len(zeros)) for k in level_keys(o)] + ["input_sq_norms"]

    def solve(name: str, layer: nn.Linear, acc: HessianAccumulator) -> dict[str, torch.Tensor]:
        first, zeros = grids[name]
        with single_thread():
            variants = PRUNERS[method](layer.weight, acc, zeros, damp)
        tensors = {"input_sq_norms": acc.input_sq_norms()}
        for offset, weight in enumerate(variants, first):
            tensors.update(encode_level(offset, weight))
        return tensors

    def describe() -> dict[str, Any]:
        return {
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
            "variants": sum(len(z) for _, z in grids.values()),
            "dense_fp16_bytes": 2 * sum(numels[name] * len(z) for name, (_, z) in grids.items()),
        }

    return build_layerwise(decoder, pool, out, "sparsity", {"method": method, "grids": grids, "damp": damp},
                           keys, solve, describe, batch_size, progress)


def build(decoder: Decoder, pool: TokenPool, options: dict[str, Any], out: Path, batch_size: int,
          progress: bool) -> dict[str, Any]:
    """The plugin's builder: ``build-db --space sparsity`` options to ``build_sparsity_database``."""
    return build_sparsity_database(decoder, pool, out, options["center"], options["levels"], options["step"],
                                   options["method"], batch_size, progress=progress)
