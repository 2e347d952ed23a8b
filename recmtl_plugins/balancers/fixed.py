"""Fixed weights: loss = sum_t w_t * L_t with the per-task ``weight`` of the config (equal by default)."""
from __future__ import annotations

import torch

from recmtl import Balancer, hookimpl
from recmtl.gradients import LossWeightingBalancer


class FixedWeights(LossWeightingBalancer):
    def task_weights(self, losses: dict[str, torch.Tensor]) -> list[float]:
        return [float(self.weights.get(t, 1.0)) for t in self.task_names]


@hookimpl
def recmtl_register_balancers() -> dict[str, type[Balancer]]:
    return {"fixed": FixedWeights}
