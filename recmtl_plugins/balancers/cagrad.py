"""CAGrad: conflict-averse gradient descent.

Liu, Liu, Jin, Stone and Liu, "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021.
With ``g_0`` the average gradient, CAGrad takes the update ``d`` within a ball of radius
``c ||g_0||`` around ``g_0`` that maximises the worst task's improvement ``min_i g_i . d``. Via its dual:
``w = argmin_{w in simplex} g_w . g_0 + sqrt(phi) ||g_w||`` with ``g_w = sum_i w_i g_i`` and
``phi = c^2 ||g_0||^2``; then ``d = g_0 + (sqrt(phi) / ||g_w||) g_w``, divided by ``1 + c^2`` (the
authors' ``rescale=1``). ``c = 0`` gives plain gradient averaging; large ``c`` approaches MGDA.
The small dual over the simplex is solved with scipy's SLSQP, as in the authors' code. A task whose
shared gradient is all zero (a batch with no label for it) is left out (coefficient 0; ``g_0`` and the
dual are over the other tasks): kept, it would dilute ``g_0`` and draw the dual's weight onto a zero vector.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize

from recmtl import Balancer, hookimpl
from recmtl.gradients import GradientBalancer, leave_out_absent


def cagrad(grads: torch.Tensor, c: float = 0.5, rescale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``grads [T, N]`` -> (update direction ``[N]``, its coefficients ``[T]`` on the task gradients; 0 for
    all-zero rows)."""
    return leave_out_absent(lambda g: _cagrad(g, c, rescale), grads)


def _cagrad(grads: torch.Tensor, c: float, rescale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    num = grads.shape[0]
    gram = (grads @ grads.T).double().cpu().numpy()
    mean = np.full(num, 1.0 / num)
    radius = c * float(np.sqrt(max(mean @ gram @ mean, 0.0)) + 1e-12)  # sqrt(phi) = c ||g_0||
    w = mean
    if radius > 1e-12 and num > 1:
        def objective(x: np.ndarray) -> float:
            return float(x @ gram @ mean + radius * np.sqrt(max(x @ gram @ x, 0.0) + 1e-12))

        res = minimize(objective, mean, bounds=[(0.0, 1.0)] * num, method="SLSQP",
                       constraints=({"type": "eq", "fun": lambda x: 1.0 - x.sum()},))
        w = np.clip(res.x, 0.0, 1.0)
    gw_norm = float(np.sqrt(max(w @ gram @ w, 0.0)))
    coeffs = mean + (radius / (gw_norm + 1e-12) if radius > 1e-12 else 0.0) * w
    if rescale:
        coeffs = coeffs / (1.0 + c * c)
    coeffs_t = torch.as_tensor(coeffs).to(grads)
    return coeffs_t @ grads, coeffs_t


class CAGrad(GradientBalancer):
    """Returns each task's coefficient in ``d = sum_i coef_i g_i`` (``1/T`` each when ``c = 0``). ``c`` is
    the paper's radius (default 0.5, the authors' code default); ``rescale`` divides by ``1 + c^2``."""

    def __init__(self, task_names: list[str], weights: dict[str, float], c: float = 0.5, rescale: bool = True) -> None:
        super().__init__(task_names, weights)
        if c < 0:
            raise ValueError(f"c must be >= 0, got {c}")
        self.c, self.rescale = float(c), bool(rescale)

    def combine(self, grads, losses, sizes):
        return cagrad(grads, self.c, self.rescale)


@hookimpl
def recmtl_register_balancers() -> dict[str, type[Balancer]]:
    return {"cagrad": CAGrad}
