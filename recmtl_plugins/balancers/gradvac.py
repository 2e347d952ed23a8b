"""GradVac: gradient vaccine.

Wang, Tsvetkov, Firat and Cao, "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
Massively Multilingual Models", ICLR 2021. PCGrad only acts when the cosine ``phi_ij`` of two gradients is
negative; GradVac keeps a per-pair target ``hat phi_ij`` (an exponential moving average of the observed
cosines, ``hat phi <- (1 - beta) hat phi + beta phi``, started at 0) and whenever ``phi_ij < hat phi_ij``
moves ``g_i`` towards ``g_j`` just enough that their cosine becomes the target:
``g_i <- g_i + ||g_i|| (hat phi sqrt(1 - phi^2) - phi sqrt(1 - hat phi^2)) / (||g_j|| sqrt(1 - hat phi^2)) g_j``.
The shared parameters get ``sum_i g_i``. This plugin works on the whole shared vector (the paper's
coarsest granularity). A task whose shared gradient is all zero (a batch with no label for it) is left out
of the step: its coefficient is 0 and the targets of its pairs stay as they are (its cosine ``0 / 0``
would otherwise pull them towards 0).
"""
from __future__ import annotations

import math

import torch

from recmtl import Balancer, hookimpl
from recmtl.gradients import GradientBalancer, SeededGenerator, leave_out_absent, present_tasks


def vaccinate(g_i: torch.Tensor, g_j: torch.Tensor, target: float) -> float:
    """Coefficient ``a`` such that ``cos(g_i + a g_j, g_j) = target`` (0 when already at or above it)."""
    ni, nj = float(g_i.norm()), float(g_j.norm())
    if ni == 0 or nj == 0:
        return 0.0
    phi = max(min(float(g_i @ g_j) / (ni * nj), 1.0), -1.0)
    if phi >= target:
        return 0.0
    return ni * (target * math.sqrt(1 - phi * phi) - phi * math.sqrt(1 - target * target)) / (
        nj * math.sqrt(max(1 - target * target, 1e-12)))


def gradvac(grads: torch.Tensor, targets: torch.Tensor, beta: float,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One GradVac step; updates ``targets [T, T]`` in place. Returns (``sum_i g_i'``, coefficients). All-zero
    rows are left out: coefficient 0, their pairs' targets unchanged, the random order drawn over the others."""
    present = present_tasks(grads)
    if bool(present.all()):
        return _gradvac(grads, targets, beta, generator)
    idx = present.nonzero().flatten()
    sub = targets[idx][:, idx]  # a copy: the present pairs' targets, updated below and written back
    out = leave_out_absent(lambda g: _gradvac(g, sub, beta, generator), grads)
    targets[idx.unsqueeze(1), idx] = sub
    return out


def _gradvac(grads: torch.Tensor, targets: torch.Tensor, beta: float,
             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    num = grads.shape[0]
    norms = grads.norm(dim=1)
    coef = torch.eye(num, dtype=grads.dtype, device=grads.device)
    for i in range(num):
        g = grads[i].clone()
        for j in torch.randperm(num, generator=generator).tolist():
            if j == i:
                continue
            phi = float(g @ grads[j]) / max(float(g.norm() * norms[j]), 1e-12)
            a = vaccinate(g, grads[j], float(targets[i, j]))
            if a:
                g += a * grads[j]
                coef[i, j] += a
            targets[i, j] = (1 - beta) * targets[i, j] + beta * phi
    coeffs = coef.sum(0)
    return coeffs @ grads, coeffs


class GradVac(SeededGenerator, GradientBalancer):
    """Returns each task's coefficient in ``sum_i g_i' = sum_j c_j g_j`` (1.0 when no cosine falls below
    its target). ``beta`` is the EMA rate of the targets (paper: 1e-2); ``seed`` fixes the random order."""

    def __init__(self, task_names: list[str], weights: dict[str, float], beta: float = 0.01, seed: int = 0) -> None:
        super().__init__(task_names, weights)
        if not 0 <= beta <= 1:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = float(beta)
        self.init_generator(seed)
        num = len(task_names)
        self.register_buffer("targets", torch.zeros(num, num, dtype=torch.float64))

    def combine(self, grads, losses, sizes):
        return gradvac(grads, self.targets, self.beta, self.generator)


@hookimpl
def recmtl_register_balancers() -> dict[str, type[Balancer]]:
    return {"gradvac": GradVac}
