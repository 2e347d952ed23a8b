"""Homoscedastic uncertainty weighting.

Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
Semantics", CVPR 2018. Each task learns ``s_t = log sigma_t^2``; the loss is
``sum_t 0.5 * exp(-s_t) * L_t + 0.5 * s_t``, so noisier tasks get smaller weights. A task whose loss is 0
(a batch with no label for it) is left out of the step, ``0.5 * s_t`` included: that term alone would push
``s_t`` down on every such batch, and a task labelled in a fraction ``p`` of the batches would settle at
``1 / p`` times its weight.
"""
from __future__ import annotations

import torch
from torch import nn

from recmtl import Balancer, hookimpl


class UncertaintyWeighting(Balancer):
    def __init__(self, task_names: list[str], weights: dict[str, float], init_log_var: float = 0.0) -> None:
        super().__init__(task_names, weights)
        self.log_vars = nn.Parameter(torch.full((len(task_names),), float(init_log_var)))

    def backward(self, losses: dict[str, torch.Tensor], shared_parameters: list[nn.Parameter]) -> dict[str, float]:
        total = torch.zeros((), device=self.log_vars.device)
        for i, t in enumerate(self.task_names):
            present = losses[t].detach() != 0  # no label in the batch: a masked mean over no rows is 0
            total = total + 0.5 * torch.exp(-self.log_vars[i]) * losses[t] + 0.5 * self.log_vars[i] * present
        total.backward()
        w = (0.5 * torch.exp(-self.log_vars.detach())).tolist()
        return dict(zip(self.task_names, w))


@hookimpl
def recmtl_register_balancers() -> dict[str, type[Balancer]]:
    return {"uncertainty": UncertaintyWeighting}
