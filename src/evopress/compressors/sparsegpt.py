"""Unstructured pruning of one linear layer to an exact number of zeros.

Three methods, from cheapest to best: magnitude (|w|), Wanda (|w|·||x||) and SparseGPT (Frantar &
Alistarh, 2023), which prunes by OBS saliency and corrects the remaining weights for the error.

Unlike the papers, which target a sparsity fraction, every function here zeroes *exactly* `n_zeros`
weights: the evolutionary search trades non-zeros between layers under a global budget that must hold
exactly. Masks are therefore always picked by sorted indices, never by a threshold, so ties cannot
change the count. (A kept weight can still be zero if it was zero in the input.)
"""

import torch
from torch import Tensor

from .hessian import InverseCholesky, inverse_cholesky


def magnitude_prune(weight: Tensor, n_zeros: int) -> Tensor:
    """Zero the `n_zeros` weights of smallest |w| in the whole layer."""
    _check_count(weight, n_zeros)
    mask = _lowest_mask(weight.detach().float().abs(), n_zeros)
    return weight.detach().masked_fill(mask, 0)


def wanda_prune(weight: Tensor, input_sq_norms: Tensor, n_zeros: int) -> Tensor:
    """Wanda (Sun et al., 2023): zero the lowest |w_ij|·||x_j|| scores within each output row.

    Wanda compares scores per row; to hit `n_zeros` exactly, each row prunes floor or ceil of the mean
    count, the extra units going to the first rows.
    """
    _check_count(weight, n_zeros)
    n_rows, n_cols = weight.shape
    if input_sq_norms.shape != (n_cols,):
        raise ValueError(f"input_sq_norms has shape {tuple(input_sq_norms.shape)}, expected ({n_cols},)")
    norms = input_sq_norms.detach().to(weight.device, torch.float32).sqrt()
    scores = weight.detach().float().abs() * norms
    per_row = torch.tensor(_split_count(n_zeros, [n_cols] * n_rows), device=weight.device)
    pruned_ranks = torch.arange(n_cols, device=weight.device) < per_row[:, None]
    order = scores.argsort(dim=1, stable=True)
    mask = torch.zeros_like(pruned_ranks).scatter_(1, order, pruned_ranks)
    return weight.detach().masked_fill(mask, 0)


def sparsegpt_prune(
    weight: Tensor, H: Tensor, n_zeros: int, block_size: int = 128, damp: float = 0.01
) -> Tensor:
    """SparseGPT with exactly `n_zeros` zeros; returns a new tensor of the input's dtype and device."""
    return sparsegpt_prune_levels(weight, H, [n_zeros], block_size, damp)[0]


def sparsegpt_prune_levels(
    weight: Tensor, H: Tensor, zero_counts: list[int], block_size: int = 128, damp: float = 0.01
) -> list[Tensor]:
    """SparseGPT at several zero counts, each solved from the same dense weight.

    The Cholesky factor of H⁻¹ depends only on the calibration data, so one factorisation serves every
    level of the layer's database.
    """
    _check_weight(weight)
    if H.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"Hessian has shape {tuple(H.shape)}, expected {weight.shape[1]}×{weight.shape[1]}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    for n_zeros in zero_counts:
        _check_count(weight, n_zeros)
    chol = inverse_cholesky(H.to(weight.device), damp)
    return [_sparsegpt(weight, chol, n_zeros, block_size) for n_zeros in zero_counts]


def _sparsegpt(weight: Tensor, chol: InverseCholesky, n_zeros: int, block_size: int) -> Tensor:
    """Prune column blocks left to right, compensating each pruned weight on the columns after it.

    Inside a block the OBS update is applied column by column; its effect on later blocks is deferred
    and applied once per block as a matrix product (the paper's lazy batch update), which gives the same
    result with far fewer memory passes.
    """
    W = weight.detach().to(torch.float32, copy=True)
    U = chol.upper
    n_cols = W.shape[1]
    starts = range(0, n_cols, block_size)
    for start, k in zip(starts, _zeros_per_block(n_zeros, chol.dead, W.shape[0], block_size)):
        end = min(start + block_size, n_cols)
        block, U_block = W[:, start:end], U[start:end, start:end]
        diag = U_block.diagonal()
        mask = _block_mask(block, diag, chol.dead[start:end], k)
        err = torch.zeros_like(block)
        for c in range(end - start):
            err[:, c] = torch.where(mask[:, c], block[:, c] / diag[c], 0.0)
            block[:, c:] -= err[:, c, None] * U_block[c, c:]
            block[:, c].masked_fill_(mask[:, c], 0)  # exact zeros despite rounding in w - (w/d)·d
        W[:, end:] -= err @ U[start:end, end:]
    return W.to(weight.dtype)


def _block_mask(block: Tensor, diag: Tensor, dead: Tensor, k: int) -> Tensor:
    """Choose the k weights of the block whose removal raises the layer loss least, w² / U_cc².

    The choice is made jointly over all rows and columns of the block, so each block adapts its own
    mask. Dead inputs go first: the weights reading them cost nothing to remove.
    """
    saliency = block.square() / diag.square()
    saliency[:, dead] = -1
    return _lowest_mask(saliency, k)


def _zeros_per_block(n_zeros: int, dead: Tensor, n_rows: int, block_size: int) -> list[int]:
    """How many weights each column block prunes; the counts sum to exactly `n_zeros`.

    Weights on dead inputs are free to remove, so they take the budget first (spread over the blocks
    holding them); the rest is spread over the live weights proportionally to each block's size.
    """
    n_cols = dead.numel()
    starts = range(0, n_cols, block_size)
    dead_sizes = [n_rows * int(dead[s : s + block_size].sum()) for s in starts]
    live_sizes = [n_rows * min(block_size, n_cols - s) - d for s, d in zip(starts, dead_sizes)]
    n_dead_zeros = min(n_zeros, sum(dead_sizes))
    dead_counts = _split_count(n_dead_zeros, dead_sizes)
    live_counts = _split_count(n_zeros - n_dead_zeros, live_sizes)
    return [d + v for d, v in zip(dead_counts, live_counts)]


def _split_count(total: int, sizes: list[int]) -> list[int]:
    """Split `total` over buckets proportionally to `sizes`, summing exactly to `total`.

    Largest-remainder rounding in integer arithmetic: floor every share, then give one more unit to the
    buckets with the largest remainders (earlier bucket wins ties). A bucket gets a unit only if its
    remainder is positive, i.e. its floor share is below its size, so no bucket exceeds its size when
    total <= sum(sizes).
    """
    capacity = sum(sizes)
    if capacity == 0:
        return [0] * len(sizes)
    shares = [total * s // capacity for s in sizes]
    remainders = [total * s - q * capacity for s, q in zip(sizes, shares)]
    leftover = total - sum(shares)
    for b in sorted(range(len(sizes)), key=lambda b: -remainders[b])[:leftover]:
        shares[b] += 1
    return shares


def _lowest_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of exactly k entries with the lowest scores (stable sort: ties go to lower index)."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat[scores.flatten().argsort(stable=True)[:k]] = True
    return flat.view(scores.shape)


def _check_weight(weight: Tensor) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")


def _check_count(weight: Tensor, n_zeros: int) -> None:
    _check_weight(weight)
    if not 0 <= n_zeros <= weight.numel():
        raise ValueError(f"n_zeros={n_zeros} is outside [0, {weight.numel()}] (weight {tuple(weight.shape)})")
