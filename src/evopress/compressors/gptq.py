"""Weight quantization: round-to-nearest baseline and GPTQ (Frantar et al., 2023).

GPTQ quantizes a linear layer's weight W [out, in] column by column and, after each
column, spreads the rounding error over the not-yet-quantized columns so that the
layer output X Wᵀ (not W itself) is preserved. The Hessian H = XᵀX of the layer
input X tells how columns interact; everything needed is the upper Cholesky factor U
of H⁻¹, which is computed once per layer and shared across bitwidths
(`gptq_quantize_levels`), since EvoPress needs every layer at several levels.

Quantization grid: per output row and per group of `group_size` consecutive input
columns, an integer code q in [0, 2^b - 1] dequantizes to (q - zero) * scale. Scales
are stored in fp16 and zero points as integers, and all codes are computed with the
fp16 scale, so `QuantizedWeight.dequantize` reproduces exactly the values GPTQ used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .hessian import inverse_cholesky
from .packing import pack_codes, unpack_codes

_FP16_MIN = 2.0**-24  # smallest positive fp16 (subnormal): keeps scales nonzero
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantGrid:
    """Quantization format: `bits` per weight, one (scale, zero) per `group_size` input columns.

    group_size -1 or 0 means a single group per output row (per-channel). A positive
    group_size must divide in_features: partial groups would need ragged metadata and
    every layer of the models we target has in_features divisible by 128.
    symmetric uses the zero point 2^(b-1) and a scale fitted to max|w| (GPTQ's convention).
    """

    bits: int
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in 1..8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < -1:
            raise ValueError(f"group_size must be a positive int, 0 or -1, got {self.group_size!r}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group_len(self, in_features: int) -> int:
        """Number of input columns sharing one (scale, zero) for a layer with `in_features` inputs."""
        if self.group_size <= 0:
            return in_features
        if in_features % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide in_features {in_features}")
        return self.group_size


@dataclass
class QuantizedWeight:
    """A quantized [out, in] weight; codes are in the original column order."""

    codes: Tensor  # uint8 [out, in]
    scales: Tensor  # float16 [out, n_groups]
    zeros: Tensor  # uint8 [out, n_groups], integer zero points
    grid: QuantGrid

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        out, n = self.codes.shape
        n_groups = self.scales.shape[1]
        q = self.codes.view(out, n_groups, n // n_groups).float()
        w = (q - self.zeros.float()[..., None]) * self.scales.float()[..., None]
        return w.view(out, n).to(dtype)

    def to_packed(self) -> dict[str, Tensor]:
        """Compact tensors for safetensors: codes and zero points bit-packed, fp16 scales."""
        return {
            "codes": pack_codes(self.codes, self.grid.bits),
            "scales": self.scales,
            "zeros": pack_codes(self.zeros, self.grid.bits),
        }

    @classmethod
    def from_packed(cls, d: dict[str, Tensor], shape: tuple[int, int], grid: QuantGrid) -> QuantizedWeight:
        out, n = shape
        n_groups = n // grid.group_len(n)
        return cls(
            codes=unpack_codes(d["codes"], grid.bits, (out, n)),
            scales=d["scales"],
            zeros=unpack_codes(d["zeros"], grid.bits, (out, n_groups)),
            grid=grid,
        )


def _fp16_round_up(x: Tensor) -> Tensor:
    """Smallest fp16 value >= x (returned as float32).

    Rounding the scale up rather than to nearest keeps maxq * scale >= max - min, so
    the grid still spans the group's range and RTN error stays within scale / 2.
    """
    x = x.clamp(_FP16_MIN, _FP16_MAX)
    h = x.half()
    bumped = (h.view(torch.int16) + 1).view(torch.float16)  # next fp16 up (h is positive, finite)
    return torch.where(h.float() < x, bumped, h).float()


def _grid_params(w: Tensor, grid: QuantGrid) -> tuple[Tensor, Tensor]:
    """Min-max (scale, zero) over the last dim of w, as float32 tensors.

    The range is widened to include 0 so that zero is exactly representable (zeroed
    and dead weights stay exactly zero); an all-zero group gets the tiny clamp scale.
    """
    lo = w.amin(-1).clamp(max=0)
    hi = w.amax(-1).clamp(min=0)
    if grid.symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    scale = _fp16_round_up((hi - lo) / grid.maxq)
    if grid.symmetric:
        zero = torch.full_like(scale, (grid.maxq + 1) // 2)
    else:
        zero = torch.round(-lo / scale).clamp(0, grid.maxq)
    return scale, zero


def _quantize(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer codes (as float) for w on the grid (q - zero) * scale."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def _as_matrix(weight: Tensor) -> Tensor:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    return weight.detach().to(torch.float32, copy=True)


def _to_quantized(codes: Tensor, scales: Tensor, zeros: Tensor, grid: QuantGrid) -> QuantizedWeight:
    return QuantizedWeight(codes.to(torch.uint8), scales.half(), zeros.to(torch.uint8), grid)


def quantize_rtn(weight: Tensor, grid: QuantGrid) -> QuantizedWeight:
    """Round-to-nearest with min-max groups: the baseline GPTQ must beat."""
    w = _as_matrix(weight)
    out, n = w.shape
    gs = grid.group_len(n)
    wg = w.view(out, n // gs, gs)
    scales, zeros = _grid_params(wg, grid)
    codes = _quantize(wg, scales[..., None], zeros[..., None], grid.maxq)
    return _to_quantized(codes.view(out, n), scales, zeros, grid)


def _pending_cols(W: Tensor, err: Tensor, U: Tensor, c: int, end: int, i1: int, i2: int) -> Tensor:
    """Columns [c, end) of W with all error feedback so far applied.

    Columns inside the current block [i1, i2) are updated eagerly; later ones still
    miss the lazy update from the block's first c - i1 columns, so apply it here.
    """
    inside = W[:, c : min(end, i2)]
    if end <= i2:
        return inside
    later = W[:, i2:end] - err[:, : c - i1] @ U[i1:c, i2:end]
    return torch.cat([inside, later], dim=1)


def _gptq_solve(
    W: Tensor, U: Tensor, perm: Tensor, grid: QuantGrid, block_size: int, static_groups: bool
) -> QuantizedWeight:
    """One GPTQ pass over the columns of W (original order) in the order `perm`.

    U is the inverse-Hessian factor already permuted by `perm`. With static groups
    the (scale, zero) are fitted up front on the original weights, which is what makes
    act-order compatible with groups of consecutive original columns.
    """
    out, n = W.shape
    gs = grid.group_len(n)
    if static_groups:
        scales, zeros = _grid_params(W.view(out, n // gs, gs), grid)
    else:
        scales, zeros = W.new_empty(out, n // gs), W.new_empty(out, n // gs)
    W = W[:, perm]  # a copy: the solve updates it in place
    codes = torch.empty_like(W)
    group_of = (perm // gs).tolist()
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        err = W.new_zeros(out, i2 - i1)
        for c in range(i1, i2):
            g = group_of[c]
            if not static_groups and c % gs == 0:
                scales[:, g], zeros[:, g] = _grid_params(_pending_cols(W, err, U, c, c + gs, i1, i2), grid)
            w, scale, zero = W[:, c], scales[:, g], zeros[:, g]
            codes[:, c] = q = _quantize(w, scale, zero, grid.maxq)
            err[:, c - i1] = e = (w - (q - zero) * scale) / U[c, c]
            W[:, c + 1 : i2].addr_(e, U[c, c + 1 : i2], alpha=-1)
        W[:, i2:] -= err @ U[i1:i2, i2:]
    unpermuted = torch.empty_like(codes)
    unpermuted[:, perm] = codes
    return _to_quantized(unpermuted, scales, zeros, grid)


def gptq_quantize_levels(
    weight: Tensor,
    H: Tensor,
    grids: list[QuantGrid],
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> list[QuantizedWeight]:
    """GPTQ-quantize one layer to several grids, sharing one Cholesky factorisation.

    weight: [out, in]; H: [in, in] = Σ xᵀx over calibration inputs (any positive
    scaling). act_order processes columns by descending diag(H) (most salient first)
    with static groups; codes are always returned in the original column order.
    The input tensors are not modified.
    """
    W = _as_matrix(weight)
    n = W.shape[1]
    if H.shape != (n, n):
        raise ValueError(f"H must be [{n}, {n}] for weight of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    for grid in grids:
        grid.group_len(n)  # fail before the expensive factorisation
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        ic = inverse_cholesky(H[perm[:, None], perm], damp)
    else:
        perm = torch.arange(n, device=W.device)
        ic = inverse_cholesky(H, damp)
    U, dead = ic.upper, ic.dead
    W[:, perm[dead]] = 0
    return [_gptq_solve(W, U, perm, grid, block_size, static_groups=act_order) for grid in grids]


def gptq_quantize(
    weight: Tensor,
    H: Tensor,
    grid: QuantGrid,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> QuantizedWeight:
    """GPTQ-quantize one layer; see `gptq_quantize_levels`."""
    return gptq_quantize_levels(weight, H, [grid], block_size, damp, act_order)[0]
