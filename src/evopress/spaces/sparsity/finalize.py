"""Finalize a sparsity profile: each layer pruned again at its chosen zero count (``spaces/finalize.py``).

The database prunes every layer on the dense model's inputs; here each layer sees the outputs of the
blocks already pruned to the profile, with the database's pruner and damping.
"""

from __future__ import annotations

import torch

from ...database import Database, single_thread
from ..finalize import LayerJob
from ..problem import Config
from .build import PRUNERS
from .space import SparsitySpace
from .storage import decode_level, encode_level, level_keys


def sparsity_job(space: SparsitySpace, u: int, level: int) -> LayerJob:
    manifest = space.db.manifest
    offset, zeros = space.first_offsets[u] + level, space.zeros[u][level]
    mask_key, values_key = level_keys(offset)

    def solve(layer: torch.nn.Linear, acc) -> dict[str, torch.Tensor]:
        with single_thread():
            pruned = PRUNERS[manifest["method"]](layer.weight, acc, [zeros], manifest["damp"])[0]
        return encode_level(offset, pruned)

    def weight(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        device = space.device(u)
        return decode_level(tensors[mask_key].to(device), tensors[values_key].to(device), space.shapes[u],
                            torch.float32)

    return LayerJob([mask_key, values_key], solve, weight)


def finalize_jobs(space: SparsitySpace, config: Config) -> tuple[Database, dict[str, LayerJob]]:
    return space.db, {name: sparsity_job(space, u, level) for u, (name, level) in enumerate(zip(space.units, config))}
