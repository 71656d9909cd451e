"""Scoring baselines for depth pruning, all at whole-block granularity.

They rank blocks from dense activations on calibration text, assuming that per-block scores add up:
exactly the assumption EvoPress does not make.

* ShortGPT (Men et al. 2024): block influence 1 - cos(h_in, h_out); drop the k least influential.
* Angular distance (Gromov et al. 2024): drop the run of k consecutive blocks whose input and output
  are closest in angle. We average the distance over all tokens rather than the last one only.

Hidden states are read between blocks, before the final norm (the reference implementation used
HF's last hidden state, which is already normed, for the last block).
"""

from __future__ import annotations

from collections import deque
import torch
import torch.nn.functional as F

from ...data import Sample, TokenPool
from ...errors import UserError
from ..plugin import BaselineInputs
from ..problem import Config
from ..space import Space
from .space import DropSpace


@torch.inference_mode()
def block_similarity(space: Space, pool: TokenPool, sample: Sample, span: int,
                     batch_size: int = 8) -> torch.Tensor:
    """Mean cosine similarity between the residual stream at boundary b and b+span, for every b, of the dense
    model (any space of it: the width space ranks blocks this way too)."""
    space.apply(None)
    L = space.num_blocks
    sums = torch.zeros(L - span + 1, dtype=torch.float64)
    count = 0
    for ids, _ in pool.batches(sample, batch_size):
        window: deque[torch.Tensor] = deque(maxlen=span + 1)
        for b, h in enumerate(space.decoder.run_blocks(ids)):
            window.append(h.float())
            if b >= span:
                sums[b - span] += F.cosine_similarity(window[0], window[-1], dim=-1).sum().double().cpu()
        count += ids.numel()
    return sums / count


def shortgpt_order(space: Space, pool: TokenPool, sample: Sample, batch_size: int = 8) -> list[int]:
    """Blocks from least to most influential by ShortGPT's block influence 1 - cos(h_in, h_out)."""
    influence = 1 - block_similarity(space, pool, sample, 1, batch_size)
    return torch.argsort(influence, stable=True).tolist()


def angular_run(space: DropSpace, pool: TokenPool, sample: Sample, k: int, batch_size: int = 8) -> range:
    """The ``k`` consecutive blocks whose input and output are closest in angle."""
    cos = block_similarity(space, pool, sample, k, batch_size).clamp(-1, 1)
    start = int(torch.argmin(torch.arccos(cos)))
    return range(start, start + k)


def _drop(inputs: BaselineInputs) -> DropSpace:
    space = inputs.space
    if not isinstance(space, DropSpace):
        raise UserError("the scoring depth baselines rank whole blocks and take no --rules")
    return space


def shortgpt(inputs: BaselineInputs) -> Config:
    space = _drop(inputs)
    drop = set(shortgpt_order(space, inputs.pool, inputs.pool.first(inputs.tokens), inputs.batch_size)[: space.k])
    return space.config_from_masks([(b in drop, b in drop) for b in range(space.num_blocks)])


def angular(inputs: BaselineInputs) -> Config:
    space = _drop(inputs)
    drop = angular_run(space, inputs.pool, inputs.pool.first(inputs.tokens), space.k, inputs.batch_size)
    return space.config_from_masks([(b in drop, b in drop) for b in range(space.num_blocks)])
