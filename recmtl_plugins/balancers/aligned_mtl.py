"""Aligned-MTL: aligning the principal components of the gradient system.

Senushkin, Patakin, Kuznetsov and Konushin, "Independent Component Alignment for Multi-Task Learning",
CVPR 2023. The task gradients ``G [T, N]`` are replaced by ``G' = B G`` with
``B = sqrt(lambda_min) V Lambda^{-1/2} V^T``, where ``G G^T = V Lambda V^T`` (``torch.linalg.eigh`` of the
small Gram matrix). Then ``G' G'^T = lambda_min I``: the aligned task gradients are orthogonal and of
equal norm, so the linear system has condition number 1 and no task dominates. The shared parameters
get ``sum_t g'_t``. Eigenvalues below ``max(lambda) * T * eps`` are dropped (rank-deficient systems), as
in the authors' code; ``scale`` picks the common norm: ``min`` (smallest kept eigenvalue, the paper's
choice), ``median`` or ``rmse`` (mean eigenvalue). A task whose shared gradient is all zero (a batch with no
label for it) is left out: the system is aligned over the other tasks (its zero eigenvalue would be
dropped anyway, but it would still count in the rank tolerance).
"""
from __future__ import annotations

import torch

from recmtl import Balancer, hookimpl
from recmtl.gradients import GradientBalancer, leave_out_absent

SCALES = ("min", "median", "rmse")


def align(grads: torch.Tensor, scale: str = "min") -> tuple[torch.Tensor, torch.Tensor]:
    """``grads [T, N]`` -> (aligned gradients ``B G`` ``[T, N]``, the symmetric ``B [T, T]``)."""
    gram = grads.double() @ grads.double().T
    eig, basis = torch.linalg.eigh(gram)
    tol = eig.max().clamp_min(0) * gram.shape[0] * torch.finfo(grads.dtype).eps
    keep = eig > tol
    if not keep.any():
        return torch.zeros_like(grads), torch.zeros(gram.shape, dtype=grads.dtype, device=grads.device)
    eig, basis = eig[keep], basis[:, keep]
    common = {"min": eig.min(), "median": eig.median(), "rmse": eig.mean()}[scale]
    b = (basis * (common / eig).sqrt()) @ basis.T
    b = b.to(grads)
    return b @ grads, b


class AlignedMTL(GradientBalancer):
    """Returns each task's coefficient in the combined gradient, ``sum_t g'_t = (B 1) . G``."""

    def __init__(self, task_names: list[str], weights: dict[str, float], scale: str = "min") -> None:
        super().__init__(task_names, weights)
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got '{scale}'")
        self.scale = scale

    def combine(self, grads, losses, sizes):
        return leave_out_absent(self.aligned_sum, grads)

    def aligned_sum(self, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sum_t g'_t`` and its coefficients ``B 1``."""
        _, b = align(grads, self.scale)
        coeffs = b.sum(0)
        return coeffs @ grads, coeffs


@hookimpl
def recmtl_register_balancers() -> dict[str, type[Balancer]]:
    return {"aligned_mtl": AlignedMTL}
