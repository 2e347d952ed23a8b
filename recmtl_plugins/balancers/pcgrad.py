"""PCGrad: projecting conflicting gradients.

Yu, Kumar, Gupta, Levine, Hausman and Finn, "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.
For each task ``i`` (and the other tasks ``j`` in random order) a conflicting gradient is projected onto
the normal plane of the other: if ``g_i . g_j < 0`` then ``g_i <- g_i - (g_i . g_j / ||g_j||^2) g_j``
(``g_j`` is the original gradient). The shared parameters get ``sum_i g_i``; gradients that do not
conflict are left alone. A task whose shared gradient is all zero (a batch with no label for it) is left
out (coefficient 0): it changes no other gradient either way.
"""
from __future__ import annotations

import torch

from recmtl import Balancer, hookimpl
from recmtl.gradients import GradientBalancer, SeededGenerator, leave_out_absent


def pcgrad(grads: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``grads [T, N]`` -> (``sum_i g_i^PC`` ``[N]``, coefficients ``c [T]`` with ``sum_i g_i^PC = c @ grads``;
    0 for all-zero rows, and the random order is drawn over the other rows)."""
    return leave_out_absent(lambda g: _pcgrad(g, generator), grads)


def _pcgrad(grads: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    num = grads.shape[0]
    sq = (grads * grads).sum(1)
    coef = torch.eye(num, dtype=grads.dtype, device=grads.device)  # row i: g_i^PC as a combination of the g_j
    for i in range(num):
        g = grads[i].clone()
        for j in torch.randperm(num, generator=generator).tolist():
            if j == i:
                continue
            dot = g @ grads[j]
            if dot < 0 and sq[j] > 0:
                step = dot / sq[j]
                g -= step * grads[j]
                coef[i, j] -= step
    coeffs = coef.sum(0)
    return coeffs @ grads, coeffs


class PCGrad(SeededGenerator, GradientBalancer):
    """Returns, per task, its coefficient in the combined shared gradient (``sum_i g_i^PC = sum_j c_j g_j``;
    1.0 for every task when nothing conflicts). ``seed`` fixes the random projection order."""

    def __init__(self, task_names: list[str], weights: dict[str, float], seed: int = 0) -> None:
        super().__init__(task_names, weights)
        self.init_generator(seed)

    def combine(self, grads, losses, sizes):
        return pcgrad(grads, self.generator)


@hookimpl
def recmtl_register_balancers() -> dict[str, type[Balancer]]:
    return {"pcgrad": PCGrad}
