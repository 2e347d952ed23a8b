"""Nash-MTL: the update as a Nash bargaining solution.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya, "Multi-Task Learning as a Bargaining
Game", ICML 2022. The shared update is ``d = sum_t alpha_t g_t`` with ``alpha > 0`` solving
``G G^T alpha = 1 / alpha`` (element-wise), i.e. ``alpha_t (G G^T alpha)_t = 1``: every task's
directional improvement ``g_t . d`` equals ``1 / alpha_t`` (scale-invariant, Pareto-optimal).

No convex-programming package is needed: the solution is the unique minimiser of the strictly convex
``f(alpha) = 1/2 alpha^T M alpha - sum_t log alpha_t`` (its gradient is ``M alpha - 1/alpha``), found by
damped Newton steps on the T x T system (the authors solve a sequence of convex programs with cvxpy).

Scale: ``alpha`` solves the equation for ``M = G G^T`` itself, as the paper and the authors' code do. Like
them it is solved on ``M / ||M||_F`` (well-conditioned whatever the gradients' size) and divided by
``sqrt(||M||_F)`` after (the authors put the same factor into their constraint,
``alpha_t ||M||_F (M / ||M||_F alpha)_t >= 1``). So ``alpha`` scales as ``1 / ||g||``, the shared update
``d = alpha G`` does not depend on the gradients' scale (``||d||^2 = alpha^T M alpha = T`` exactly), and
the task-specific parameters get ``alpha_t``-weighted gradients, as in the authors' code.

``alpha`` is re-solved every ``update_weights_every`` steps (the steps between reuse it and cost one
backward pass), and the shared update is clipped to ``max_norm`` (the authors' default 1.0, which with
``||d|| = sqrt(T)`` sets its norm; 0 turns the clip off). With ``train.precision: fp16`` the gradients
arrive multiplied by the loss scale (``Balancer.grad_scale``), which this balancer divides out before the
solve and the clip and puts back on its direction: a scale-free ``d`` would otherwise be divided by the
loss scale when the optimiser step unscales the gradients. A task whose shared gradient is all zero (a batch with no
label for it) is left out of the step (``alpha_t = 0``, the others solved among themselves); the next step
then solves again, so that the steps reusing ``alpha`` do not leave that task out as well.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from recmtl import Balancer, hookimpl
from recmtl.gradients import GradientBalancer, present_tasks


def nash_weights(gram: np.ndarray, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """``alpha > 0`` with ``alpha_t (M alpha)_t = 1`` for a positive-definite Gram matrix ``M``: damped
    Newton on ``f``, which keeps ``alpha`` positive (a T x T solve per iteration, a few iterations)."""
    m = np.asarray(gram, dtype=np.float64)
    alpha = np.zeros(m.shape[0])
    active = np.diag(m) > 1e-20
    if not active.any():
        return alpha
    ma = m[np.ix_(active, active)]

    def f(a: np.ndarray) -> float:
        return 0.5 * float(a @ ma @ a) - float(np.log(a).sum())

    a = 1.0 / np.sqrt(np.diag(ma))  # exact when the gradients are orthogonal
    for _ in range(max_iter):
        grad = ma @ a - 1.0 / a
        if np.abs(grad * a).max() < tol:  # relative: alpha_t (M alpha)_t - 1
            break
        step = -np.linalg.solve(ma + np.diag(1.0 / (a * a)), grad)
        t, fa = 1.0, f(a)
        while t > 1e-12 and (np.any(a + t * step <= 0) or f(a + t * step) > fa + 1e-4 * t * float(grad @ step)):
            t *= 0.5
        a = a + t * step
    alpha[active] = a
    return alpha


class NashMTL(GradientBalancer):
    """Returns ``alpha`` (also used as the loss weights of the task-specific parameters, as in the
    authors' code)."""

    scale_task_specific = True

    def __init__(self, task_names: list[str], weights: dict[str, float], update_weights_every: int = 1,
                 max_norm: float = 1.0) -> None:
        super().__init__(task_names, weights)
        if int(update_weights_every) < 1:
            raise ValueError(f"update_weights_every must be >= 1, got {update_weights_every}")
        if max_norm < 0:
            raise ValueError(f"max_norm must be >= 0, got {max_norm}")
        self.every, self.max_norm = int(update_weights_every), float(max_norm)
        self.step = 0
        self.solve_next = False  # the last solve left a task out: solve again instead of reusing alpha
        self.register_buffer("alpha", torch.ones(len(task_names), dtype=torch.float64))

    def combine(self, grads, losses, sizes):
        scale = float(self.grad_scale)  # fp16's loss scale: alpha and the clip are for the true gradients
        present = present_tasks(grads)
        g = grads[present].double() / scale
        gram = g @ g.T
        norm = float(torch.linalg.matrix_norm(gram)) if len(g) else 0.0
        alpha = torch.zeros(len(grads), dtype=torch.float64)
        if norm > 0:  # solved on M / ||M||_F; alpha / sqrt(||M||_F) then solves it for M itself
            alpha[present.cpu()] = torch.as_tensor(nash_weights((gram / norm).cpu().numpy()) / math.sqrt(norm))
        self.alpha.copy_(alpha)
        self.solve_next = not bool(present.all())
        direction = alpha.to(grads) @ grads / scale
        if self.max_norm > 0:
            direction = direction * min(1.0, self.max_norm / (float(direction.norm()) + 1e-12))
        # the trainer divides every gradient by the loss scale after backward: the shared direction carries
        # it like the task-specific gradients of sum_t alpha_t L_t do
        return direction * scale, alpha

    def get_extra_state(self) -> dict:
        return {"step": self.step, "solve_next": self.solve_next}

    def set_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.solve_next = bool(state.get("solve_next", False))

    def backward(self, losses: dict[str, torch.Tensor], shared_parameters: list[nn.Parameter]) -> dict[str, float]:
        self.step += 1
        if (self.step - 1) % self.every == 0 or self.solve_next:
            return super().backward(losses, shared_parameters)
        # between updates: reuse alpha with one ordinary backward (the shared gradient is then G alpha)
        a = self.alpha.tolist()
        total = sum(ai * self.weights.get(t, 1.0) * losses[t] for ai, t in zip(a, self.task_names))
        total.backward()
        if self.max_norm > 0:
            nn.utils.clip_grad_norm_([p for p in shared_parameters if p.grad is not None],
                                     self.max_norm * float(self.grad_scale))
        return {t: ai * float(self.weights.get(t, 1.0)) for ai, t in zip(a, self.task_names)}


@hookimpl
def recmtl_register_balancers() -> dict[str, type[Balancer]]:
    return {"nash_mtl": NashMTL}
