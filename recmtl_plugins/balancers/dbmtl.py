"""DB-MTL: dual balancing of loss scales and gradient magnitudes.

Lin, Ye, Xu, Shi and Zhang (2023), "Dual-Balancing for Multi-Task Learning" (arXiv:2308.12029), as in
LibMTL's ``DB_MTL``. Loss-scale balancing: each task contributes ``log L_k`` instead of ``L_k``, whose
gradient ``grad L_k / L_k`` no longer depends on the loss's scale. Gradient-magnitude balancing: on the
shared parameters, ``g_k = grad log L_k`` is smoothed into an exponential moving average

    h_k <- beta_t * h_k + (1 - beta_t) * g_k,     beta_t = beta / t ** beta_sigma   (h_k = 0 at t = 0)

and the shared update is ``sum_k alpha_k h_k`` with ``alpha_k = max_j ||h_j|| / ||h_k||``: every task's
(smoothed) gradient is normalised and scaled to the largest norm among them. Task-specific parameters
(towers, heads, sparse embeddings) get the gradient of ``sum_k log L_k``. Defaults ``beta = 0.9``,
``beta_sigma = 0`` are LibMTL's. ``backward`` returns ``alpha_k``, the scale of each task's gradient.
The per-task ``weight`` of the config is not used.

A task whose shared gradient is all zero (a batch with no label for it) is left out of the step: its
``h_k`` is not updated (a zero would shrink it, and ``alpha_k`` would scale the stale remainder straight
back up to the largest norm, pushing the shared parameters along that task's past direction at full
strength on a batch that says nothing about it), ``alpha_k = 0`` and the largest norm is taken over the
other tasks. Under ``train.precision: fp16`` the averages are kept in unscaled units (the gradients are
divided by ``Balancer.grad_scale`` first and the update multiplied by it), so a change of the loss scale
does not mix units in ``h_k``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from recmtl import Balancer, hookimpl
from recmtl.gradients import backward_with_shared_gradient, present_tasks, task_gradients

EPS = 1e-8


class DualBalancing(Balancer):
    def __init__(self, task_names: list[str], weights: dict[str, float], beta: float = 0.9,
                 beta_sigma: float = 0.0) -> None:
        super().__init__(task_names, weights)
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if beta_sigma < 0:
            raise ValueError(f"beta_sigma must be >= 0, got {beta_sigma}")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.step = 0
        self.grad_ema: torch.Tensor | None = None  # [K, num_shared_values]

    def backward(self, losses: dict[str, torch.Tensor], shared_parameters: list[nn.Parameter]) -> dict[str, float]:
        log_losses = [torch.log(losses[t] + EPS) for t in self.task_names]
        scale = float(self.grad_scale)  # fp16's loss scale: h_k in unscaled units
        grads = task_gradients(log_losses, shared_parameters) / scale
        self.step += 1
        if self.grad_ema is None or self.grad_ema.shape != grads.shape:
            self.grad_ema = torch.zeros_like(grads)
        beta_t = self.beta / self.step ** self.beta_sigma
        present = present_tasks(grads).unsqueeze(1)
        ema = self.grad_ema.to(grads.device)
        self.grad_ema = torch.where(present, beta_t * ema + (1 - beta_t) * grads, ema)
        norms = self.grad_ema.norm(dim=1)
        alpha = torch.zeros_like(norms)
        if bool(present.any()):
            kept = present.squeeze(1)
            alpha[kept] = norms[kept].max() / (norms[kept] + EPS)
        combined = (alpha.unsqueeze(1) * self.grad_ema).sum(0)
        backward_with_shared_gradient(log_losses, [1.0] * len(log_losses), shared_parameters, combined * scale)
        return dict(zip(self.task_names, alpha.tolist()))

    def get_extra_state(self) -> Any:
        return {"step": self.step, "grad_ema": self.grad_ema}

    def set_extra_state(self, state: Any) -> None:
        self.step, self.grad_ema = int(state["step"]), state["grad_ema"]


@hookimpl
def recmtl_register_balancers() -> dict[str, type[Balancer]]:
    return {"dbmtl": DualBalancing}
