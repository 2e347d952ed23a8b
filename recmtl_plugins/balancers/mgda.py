"""MGDA: the multiple-gradient descent algorithm, as a min-norm problem.

Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018. The shared
direction is the minimum-norm point of the convex hull of the task gradients,
``min_{gamma in simplex} ||sum_t gamma_t g_t||^2``, solved with the paper's Frank-Wolfe solver (exact
closed form for two tasks: ``gamma_1 = clip((g_2 - g_1) . g_2 / ||g_1 - g_2||^2, 0, 1)``). A step along it
decreases every task's loss unless the point is Pareto-stationary.

MGDA-UB (the paper's upper bound) differentiates with respect to the shared *representation* to save
backward passes. recmtl's balancer contract hands over the shared *parameters*, so this plugin solves
MGDA on the shared-parameter gradients (the exact, more expensive variant): ``on: parameters`` is the
only value. A task whose shared gradient is all zero (a batch with no label for it) is left out of the
solve (``gamma_t = 0``): as a point of the hull it would be the min-norm point and zero the whole update.
"""
from __future__ import annotations

import torch

from recmtl import Balancer, hookimpl
from recmtl.gradients import GradientBalancer, leave_out_absent

NORMALIZERS = ("none", "l2", "loss", "loss+")


def min_norm_2(v11: float, v12: float, v22: float) -> float:
    """Weight ``gamma`` on ``a`` minimising ``||gamma a + (1 - gamma) b||^2`` given ``a.a, a.b, b.b``."""
    denom = v11 + v22 - 2 * v12
    if denom <= 0:  # a == b: every point is the same
        return 0.5
    return min(max((v22 - v12) / denom, 0.0), 1.0)


def min_norm_weights(gram: torch.Tensor, max_iter: int = 250, tol: float = 1e-6) -> torch.Tensor:
    """Frank-Wolfe on the simplex for ``min gamma^T M gamma`` (``M = G G^T``), started at the best pair."""
    m = gram.to(torch.float64)
    num = m.shape[0]
    sol = torch.zeros(num, dtype=torch.float64)
    if num == 1:
        return sol + 1
    best = None
    for i in range(num):
        for j in range(i + 1, num):
            g = min_norm_2(float(m[i, i]), float(m[i, j]), float(m[j, j]))
            cost = g * g * m[i, i] + 2 * g * (1 - g) * m[i, j] + (1 - g) ** 2 * m[j, j]
            if best is None or cost < best[0]:
                best = (float(cost), i, j, g)
    _, i, j, g = best
    sol[i], sol[j] = g, 1 - g
    if num == 2:
        return sol
    for _ in range(max_iter):
        grad = m @ sol
        t = int(torch.argmin(grad))
        g = min_norm_2(float(sol @ grad), float(grad[t]), float(m[t, t]))
        new = g * sol
        new[t] += 1 - g
        if (new - sol).abs().sum() < tol:
            return new
        sol = new
    return sol


class MGDA(GradientBalancer):
    """Returns the min-norm weights ``gamma`` (they sum to 1). ``normalize`` divides each gradient before
    the solve by its L2 norm (``l2``), its loss (``loss``) or both (``loss+``); as in the authors' code the
    weights are then applied to the raw gradients."""

    def __init__(self, task_names: list[str], weights: dict[str, float], normalize: str = "none",
                 on: str = "parameters") -> None:
        super().__init__(task_names, weights)
        if normalize not in NORMALIZERS:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZERS)}, got '{normalize}'")
        if on != "parameters":
            raise ValueError("on: only 'parameters' is supported (the balancer contract receives the shared "
                             "parameters, not the shared representation that MGDA-UB needs)")
        self.normalize = normalize

    def combine(self, grads, losses, sizes):
        return leave_out_absent(self.min_norm, grads, losses)

    def min_norm(self, grads: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The min-norm direction and ``gamma`` of non-zero gradients."""
        norms = grads.norm(dim=1)
        scale = {"none": torch.ones_like(norms), "l2": norms, "loss": losses.abs(),
                 "loss+": losses.abs() * norms}[self.normalize].clamp_min(1e-12)
        g = grads / scale.unsqueeze(1)
        gamma = min_norm_weights((g @ g.T).cpu()).to(grads)
        return gamma @ grads, gamma


@hookimpl
def recmtl_register_balancers() -> dict[str, type[Balancer]]:
    return {"mgda": MGDA}
