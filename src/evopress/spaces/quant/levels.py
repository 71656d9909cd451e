"""Quantization level arithmetic: bitwidth parsing, layer costs and the exact-budget dynamic programs.

Pure functions (no model, no database); see the package docstring for the accounting.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ...compressors.gptq import QuantGrid
from ...errors import UserError

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
MAX_BITS = 8  # codes are stored in uint8
SCALE_BITS = 16  # one fp16 scale per group
MAX_DP_STATES = 50_000_000  # reachable-total DP array; far above any grid whose groups divide in_features


def parse_bits(text: str | Sequence[int] | None, default: Sequence[int] = DEFAULT_BITS) -> tuple[int, ...]:
    if text is None or text == "":
        return tuple(default)
    try:
        bits = [int(b) for b in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        bits = []
    if not bits or any(not 1 <= b <= MAX_BITS for b in bits) or len(set(bits)) != len(bits):
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
    """Bits one layer takes at ``bits``; with ``overhead`` its fp16 scales and bit-wide zero points too
    (a symmetric grid stores no zero points: they are all 2^(bits-1))."""
    out, n = shape
    cost = bits * out * n
    if overhead:
        cost += out * (n // grid.group_len(n)) * (SCALE_BITS + (0 if grid.symmetric else bits))
    return cost


def packed_bytes(bits: int, shape: tuple[int, int], grid: QuantGrid) -> int:
    """Bytes one layer takes in the compressed-tensors export at ``bits`` (``export.to_compressed_tensors``).

    Codes and zero points are int32 words densely packed per row (codes along the input dimension,
    zero points along the output dimension, one row per group), scales fp16, plus the int64 shape.
    """
    out, n = shape
    return 4 * -(-n * bits // 32) * out + metadata_bytes(bits, shape, grid)


def metadata_bytes(bits: int, shape: tuple[int, int], grid: QuantGrid) -> int:
    """The part of ``packed_bytes`` besides the codes: fp16 scales, int32-packed zero points (none for a
    symmetric grid), the int64 shape."""
    out, n = shape
    groups = n // grid.group_len(n)
    zero_points = 0 if grid.symmetric else 4 * -(-out * bits // 32) * groups
    return zero_points + 2 * out * groups + 16


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
