"""IMTL-G: impartial multi-task learning, gradient part.

Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, "Towards Impartial Multi-task Learning", ICLR 2021.
The shared update ``g = sum_t alpha_t g_t`` (``sum_t alpha_t = 1``) is chosen so that its projections
onto every task's unit gradient ``u_t = g_t / ||g_t||`` are equal (``g . u_1 = g . u_t``), in closed form:
with ``D = [g_1 - g_t]_{t>=2}`` and ``U = [u_1 - u_t]_{t>=2}`` (rows),
``alpha_{2:T} = g_1 U^T (D U^T)^{-1}`` and ``alpha_1 = 1 - sum alpha_{2:T}``.

Only the gradient part (IMTL-G) is implemented; the paper's loss part (IMTL-L, learned loss scales) is
not. A singular ``D U^T`` (parallel gradients) is handled with the pseudo-inverse. A task whose shared
gradient is all zero (a batch with no label for it) has no unit gradient: it is left out of the step
(``alpha_t = 0``, the others solved among themselves), where taken as it is it would get ``alpha_t = 1``
and zero the whole update.
"""
from __future__ import annotations

import torch

from recmtl import Balancer, hookimpl
from recmtl.gradients import GradientBalancer, leave_out_absent


def imtl_g(grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``grads [T, N]`` -> (``sum_t alpha_t g_t`` ``[N]``, ``alpha [T]``); all-zero rows get ``alpha = 0``."""
    return leave_out_absent(_imtl_g, grads)


def _imtl_g(grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed form for gradients that are all non-zero."""
    num = grads.shape[0]
    if num == 1:
        return grads[0].clone(), torch.ones(1).to(grads)
    g = grads.double()
    unit = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d = g[:1] - g[1:]
    u = unit[:1] - unit[1:]
    rest = (g[0] @ u.T) @ torch.linalg.pinv(d @ u.T)
    alpha = torch.cat([(1 - rest.sum()).unsqueeze(0), rest]).to(grads)
    return alpha @ grads, alpha


class IMTL(GradientBalancer):
    """IMTL-G; returns ``alpha`` (sums to 1 over the tasks present; for two tasks ``alpha = (||g_2||, ||g_1||) / (||g_1|| + ||g_2||)``,
    with three or more an entry can be negative)."""

    def combine(self, grads, losses, sizes):
        return imtl_g(grads)


@hookimpl
def recmtl_register_balancers() -> dict[str, type[Balancer]]:
    return {"imtl": IMTL}
