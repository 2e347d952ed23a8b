"""Fixed weights: loss = sum_t w_t * L_t with the per-task ``weight`` of the config (equal by default)."""
from __future__ import annotations

import torch
from torch import nn

from recmtl import Balancer, hookimpl


class FixedWeights(Balancer):
    def backward(self, losses: dict[str, torch.Tensor], shared_parameters: list[nn.Parameter]) -> dict[str, float]:
        total = sum(self.weights.get(t, 1.0) * loss for t, loss in losses.items())
        total.backward()
        return {t: float(self.weights.get(t, 1.0)) for t in losses}


@hookimpl
def recmtl_register_balancers() -> dict[str, type[Balancer]]:
    return {"fixed": FixedWeights}
