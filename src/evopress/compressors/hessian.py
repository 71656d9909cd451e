"""Second-moment statistics of a linear layer's input, gathered on calibration data.

SparseGPT and GPTQ need the layer Hessian H = (2/n)·XᵀX of the reconstruction loss ||WX - W'X||², and
Wanda needs the per-feature norms ||x_j||², which are the diagonal of XᵀX. One accumulator serves all.
"""

from dataclasses import dataclass

import torch
from torch import Tensor


class HessianAccumulator:
    """Running sum of XᵀX over calibration batches, in float32.

    We keep the raw sum and the token count instead of a running mean: batches of any size can be added
    in any order, and both the Hessian and the Wanda norms are read off the same matrix.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.in_features = in_features
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_tokens = 0

    def add(self, x: Tensor) -> None:
        """Add a layer input of shape (..., in_features); every leading position counts as one token."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, accumulator expects {self.in_features}")
        x = x.detach().reshape(-1, self.in_features).to(self.xtx.device, torch.float32)
        self.xtx.addmm_(x.T, x)
        self.n_tokens += x.shape[0]

    def hessian(self) -> Tensor:
        """H = (2/n)·XᵀX, float32 (in_features × in_features)."""
        if self.n_tokens == 0:
            raise ValueError("no calibration inputs were added; the Hessian is undefined")
        return self.xtx * (2.0 / self.n_tokens)

    def input_sq_norms(self) -> Tensor:
        """Per-input-feature sum of squares over all tokens, ||x_j||² (Wanda's activation statistic)."""
        return self.xtx.diagonal().clone()


@dataclass(frozen=True)
class InverseCholesky:
    """Upper Cholesky factor of the damped inverse Hessian: H⁻¹ = upperᵀ·upper.

    Row c of `upper` (scaled by 1/upper[c, c]) is the OBS update that moves the error of fixing column c
    onto the columns after it, with the columns before it already fixed; this is why SparseGPT and GPTQ
    consume H⁻¹ in this form rather than H⁻¹ itself.
    """

    upper: Tensor  # float32, upper triangular (in × in)
    dead: Tensor  # bool (in,): inputs that were always zero on the calibration data
    damp: float  # relative damping actually used; larger than requested if Cholesky needed retries


def inverse_cholesky(H: Tensor, damp: float = 0.01, max_retries: int = 3) -> InverseCholesky:
    """Factor (H + damp·mean(diag H)·I)⁻¹ into UᵀU, fp32, without modifying `H`.

    A dead input (diag 0) has an all-zero row and column in a true XᵀX; we give it an identity entry so
    H is invertible while the feature stays decoupled from all others, and report it so callers can zero
    the weights reading it. The damping keeps the factorisation stable when there are fewer calibration
    tokens than features; if it still fails, it is raised tenfold up to `max_retries` times.
    """
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"Hessian must be a square matrix, got shape {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError("Hessian contains NaN or infinite values")
    H = H.detach().to(torch.float32, copy=True)
    dead = H.diagonal() == 0
    H[dead, :] = 0
    H[:, dead] = 0
    H.diagonal()[dead] = 1
    mean_diag = H.diagonal().mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(max_retries + 1):
        lower, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0:
                return InverseCholesky(upper, dead, damp)
        damp *= 10
    raise torch.linalg.LinAlgError(
        f"Cholesky factorisation of the damped Hessian failed even with damp={damp / 10:g}; "
        "the Hessian is not positive semi-definite (is it really (2/n)·XᵀX?)"
    )
