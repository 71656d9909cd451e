"""Candidate-parallel evaluation under torchrun (torch.distributed; gloo on CPU, nccl on GPUs).

Every rank runs the same search with the same seed, so all ranks draw the same children and samples.
Only fitness evaluation is split: each stage's candidates, in the evaluator's lexicographic order,
are cut into contiguous shares (neighbours share prefixes, so prefix reuse keeps working inside a
share); each rank scores its share and the scores are all-gathered. Every rank then selects the same
survivor, and because a candidate's score is computed by exactly the same operations whichever rank
runs it, the result equals a single-process run bit for bit. We split candidates rather than tokens
for that reason: a token split would sum partial KLs in a different order and could flip near-ties.
Rank 0 alone writes files. Collectives time out (``EVOPRESS_DIST_TIMEOUT``, seconds) so a dead rank
ends the run with an error instead of a hang.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .spaces.base import Config


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> str | None:
    """Join the process group torchrun describes in the environment; returns the device for this rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None
    timeout = timedelta(seconds=float(os.environ.get("EVOPRESS_DIST_TIMEOUT", "600")))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=timeout)
        return f"cuda:{local}"
    dist.init_process_group("gloo", timeout=timeout)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return "cpu"


class ShardedEvaluator:
    """Wraps an Evaluator: each rank scores a contiguous share of the sorted candidates."""

    def __init__(self, evaluator: Any):
        self.inner = evaluator

    def sample(self, tokens: int, rng: Any) -> Any:
        return self.inner.sample(tokens, rng)

    def sample_tokens(self, sample: Any) -> int:
        return self.inner.sample_tokens(sample)

    def score(self, configs: Sequence[Config], sample: Any) -> list[float]:
        n, world, me = len(configs), world_size(), rank()
        order = sorted(range(n), key=lambda i: self.inner.space.block_keys(configs[i]))
        share = order[me * n // world: (me + 1) * n // world]
        mine = self.inner.score([configs[i] for i in share], sample) if share else []
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, list(zip(share, mine)))
        scores = [0.0] * n
        for part in gathered:
            for i, s in part:
                scores[i] = s
        return scores
