"""Prefix reuse: which block boundaries of a stage's candidates to keep, so each starts late.

All candidates of a stage share one sample, and a child differs from its parent in a few units.
Candidates run in lexicographic order of their per-block configuration; the residual stream at block
boundaries is kept for the candidates after it, so each starts at the first block where it differs from
the one before. Only the boundaries later candidates start from are kept (``read_later``): at most one
per later candidate, none in a stage of one candidate (the final or held-aside score). When that many
would not fit the cache's bytes, boundaries are kept every ``stride`` blocks.
"""

from __future__ import annotations

import math


def common_prefix(a: tuple, b: tuple) -> int:
    """How many leading blocks two candidates' per-block keys share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def read_later(shares: list[int], stride: int) -> set[int]:
    """The block boundaries of one candidate that later candidates of its stage start from.

    ``shares``: the leading blocks shared by each pair of neighbours from this candidate on
    (``shares[0]``: this one and the next).

    In lexicographic order the (k+1)-th later candidate shares ``min(shares[:k + 1])`` blocks with this
    one, and it starts at the last kept boundary within them (every ``stride``-th). Keeping just those,
    not every boundary up to ``shares[0]``, leaves the blocks run unchanged and holds at most one
    boundary per later candidate.
    """
    kept, least = set(), math.inf
    for share in shares:
        least = min(least, share)
        kept.add(least // stride * stride)
    kept.discard(0)
    return kept


def boundary_stride(blocks: int, candidates: int, boundary_bytes: int, cache_bytes: int) -> int:
    """Keep every stride-th block boundary so the cached activations fit ``cache_bytes``; ``blocks + 1``
    keeps none. At most one boundary per later candidate is kept, so a stage of few candidates keeps all
    it needs."""
    allowed = cache_bytes // max(boundary_bytes, 1)
    if allowed < 1:
        return blocks + 1
    return 1 if candidates - 1 <= allowed else max(1, math.ceil((blocks - 1) / allowed))
