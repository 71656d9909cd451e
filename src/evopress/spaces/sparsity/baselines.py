"""Sparsity baselines at the search's exact non-zero budget: uniform and OWL.

* Uniform: every layer at the target sparsity (SparseGPT per layer). With a database centred at the
  target this is exact; for another target it is the feasible configuration closest to uniform.
* OWL (Yin et al., 2024, "outlier weighed layerwise sparsity"), our implementation: per decoder block,
  pool the Wanda scores |W_ij| * ||x_j|| of all its linear layers and take the fraction above M times
  their mean (the block's outlier ratio, LOD). Blocks with more outliers are pruned less:
  ``s_b = target - 2*lam*(LOD_b - min)/(max - min) + mean``, where subtracting the (size-weighted)
  mean of the spread makes the allocation average exactly to the target; the spread is 2*lam wide,
  i.e. about ±lam around it. Every layer of a block gets its block's sparsity, snapped to the
  database levels by ``nearest_config`` under the exact budget. Activation norms are those stored
  in the database (dense inputs, block by block), as OWL computes them.
  As in the EvoPress paper, the whole grid lam in {0.02, 0.05, 0.08, 0.1, 0.2} x M in {3, 5, 7, 10}
  is materialised and the best variant on a shared calibration sample (``--tokens``) is kept.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..plugin import BaselineInputs

from ..problem import Config

from ..space import Space
from ..constraints import in_space
from ..random_search import best_of
from .space import SparsitySpace

OWL_LAMBDAS = (0.02, 0.05, 0.08, 0.1, 0.2)
OWL_MS = (3.0, 5.0, 7.0, 10.0)


def _sparsity(space: Space) -> SparsitySpace:
    model = space.model_space
    assert isinstance(model, SparsitySpace)
    return model


def uniform(inputs: BaselineInputs) -> Config:
    return in_space(inputs.space, _sparsity(inputs.space).uniform_config(), inputs.seed)


def outlier_ratios(space: SparsitySpace, ms: Sequence[float]) -> np.ndarray:
    """[len(ms), blocks]: per block, the fraction of its pooled Wanda scores above M x their mean."""
    out = np.zeros((len(ms), space.num_blocks))
    for b in range(space.num_blocks):
        units = [u for u, ub in enumerate(space.unit_block) if ub == b]
        scores = torch.cat([(space.dense_weight(u).float().abs() * space.input_sq_norms[u].float().sqrt()).reshape(-1)
                            for u in units])
        mean = scores.mean()
        out[:, b] = [float((scores > m * mean).float().mean()) for m in ms]
    return out


def owl_sparsities(lod: Sequence[float], target: float, lam: float, sizes: Sequence[int]) -> np.ndarray:
    """Per-block sparsity: spread 2*lam by outlier ratio (more outliers, less sparse), size-weighted mean == target."""
    lod = np.asarray(lod, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    span = lod.max() - lod.min()
    spread = 2 * lam * (lod - lod.min()) / span if span > 0 else np.zeros_like(lod)
    return target - spread + np.dot(spread, sizes) / sizes.sum()


def owl_configs(space: SparsitySpace) -> dict[tuple[float, float], Config]:
    """The configuration of every (lam, M) grid point, snapped to the database under the exact budget."""
    block_sizes = [sum(n for n, b in zip(space.numels, space.unit_block) if b == blk)
                   for blk in range(space.num_blocks)]
    configs = {}
    for m, lod in zip(OWL_MS, outlier_ratios(space, OWL_MS)):
        for lam in OWL_LAMBDAS:
            per_block = owl_sparsities(lod, space.target, lam, block_sizes)
            configs[(lam, m)] = space.nearest_config([per_block[b] for b in space.unit_block])
    return configs


def owl(inputs: BaselineInputs) -> Config:
    configs = list(dict.fromkeys(in_space(inputs.space, c, inputs.seed)
                                 for c in owl_configs(_sparsity(inputs.space)).values()))
    return best_of(inputs, configs, np.random.default_rng(inputs.seed))
