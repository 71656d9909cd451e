"""Structured pruning of a linear layer's input features in groups (heads, MLP channels).

Removing a structure (a set of input columns of an output projection, and with them the rows of the
projections that feed it) is the OBS problem with a group constraint (ZipLM, Kurtic et al. 2023; the
database of DarwinLM). For a weight ``W`` (out x in) and the damped Hessian ``H`` of its input, removing
the columns ``S`` at least output error and updating the rest optimally costs

    E(S) = tr(W[:, S] (Hinv[S, S])^-1 W[:, S]^T)   and   W <- W - W[:, S] (Hinv[S, S])^-1 Hinv[S, :],

after which ``Hinv`` loses ``S`` the same way. Removing one structure at a time, always the one of least
``E``, gives a nested removal order; the weight after any number of removals is a snapshot of the same
run, so one pass serves every level of a layer.

``activation_order`` is the training-free importance ranking (Minitron-style): structures by the L2 norm
of their inputs, no update of the remaining weights; the baseline the OBS database is measured against.
"""

from __future__ import annotations

from typing import Sequence

import torch


def structure_columns(n: int, size: int) -> torch.Tensor:
    """[n, size]: the input columns of ``n`` consecutive structures of ``size`` columns each."""
    return torch.arange(n * size).reshape(n, size)


def damped_inverse(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """(H + damp * mean(diag H) * I)^-1 in float64: thousands of rank updates follow, and a dead input
    (a zero row of H) must not make it singular."""
    h = hessian.double()
    h = h + damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(len(h), dtype=h.dtype, device=h.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


def obs_prune(weight: torch.Tensor, hessian: torch.Tensor, columns: torch.Tensor, keep: Sequence[int],
              damp: float = 0.01, chunk: int = 1) -> tuple[list[int], dict[int, torch.Tensor]]:
    """Greedy OBS removal of whole structures (see the module doc).

    ``columns``: [structures, size] input columns of each structure; ``keep``: the structure counts to
    snapshot; ``chunk``: structures removed per step (the ``chunk`` of least error, updated jointly), never
    past a snapshot. Why: every step updates the whole inverse Hessian (a 70B MLP's is 28,672^2); one at a
    time is exact greedy, a chunk trades a little accuracy for proportionally fewer steps. Returns the
    removal order (every structure, first removed first) and, for each count in ``keep``, the updated
    weight restricted to the kept structures' columns (in ascending column order), in the weight's dtype.
    """
    n = len(columns)
    w = weight.double().clone()
    hinv = damped_inverse(hessian, damp)
    alive = torch.ones(n, dtype=torch.bool, device=w.device)
    cols = columns.to(w.device)
    order: list[int] = []
    snapshots: dict[int, torch.Tensor] = {}
    wanted = set(keep)
    left = n
    while True:
        if left in wanted:
            kept = cols[alive].reshape(-1).sort().values
            snapshots[left] = w[:, kept].to(weight.dtype)
        if left == 0:
            return order, snapshots
        live = torch.nonzero(alive).flatten()
        idx = cols[live]  # [live, size]
        errors = _errors(w, hinv, idx)
        floor = max((k for k in wanted if k < left), default=0)
        take = min(chunk, left - floor)
        best = torch.argsort(errors, stable=True)[:take]
        s = idx[best].reshape(-1)
        b_inv = torch.linalg.inv(hinv[s[:, None], s[None, :]])
        w -= w[:, s] @ b_inv @ hinv[s, :]
        hinv -= hinv[:, s] @ b_inv @ hinv[s, :]
        w[:, s] = 0
        alive[live[best]] = False
        order.extend(int(i) for i in live[best])
        left -= take


def _errors(w: torch.Tensor, hinv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """E(S) of every live structure (rows of ``idx``). Single columns (MLP channels) in closed form,
    ||W[:, j]||^2 / Hinv[j, j], without gathering W per structure: that gather costs more than the update."""
    if idx.shape[1] == 1:
        j = idx[:, 0]
        return w[:, j].pow(2).sum(dim=0) / hinv.diagonal()[j]
    blocks = hinv[idx[:, :, None], idx[:, None, :]]  # [live, size, size]
    ws = w[:, idx].permute(1, 0, 2)  # [live, out, size]
    return torch.einsum("los,lst,lot->l", ws, torch.linalg.inv(blocks), ws)


def activation_order(hessian: torch.Tensor, columns: torch.Tensor) -> list[int]:
    """Structures by ascending input L2 norm (the sum of their columns' diag H): the least active go first."""
    energy = hessian.diagonal().double()[columns.to(hessian.device)].sum(dim=1)
    return [int(i) for i in torch.argsort(energy, stable=True)]


def kept_structures(order: Sequence[int], keep: int) -> list[int]:
    """The ``keep`` structures removed last in ``order``, ascending: what a level of ``keep`` keeps."""
    return sorted(order[len(order) - keep:]) if keep else []


def kept_columns(order: Sequence[int], columns: torch.Tensor, keep: int) -> torch.Tensor:
    """The ascending input columns of the structures ``kept_structures`` keeps (``columns``: [structures,
    size], consecutive structures of ascending columns, as ``structure_columns`` makes them)."""
    return columns[kept_structures(order, keep)].reshape(-1)
