"""Dynamic Weight Average (DWA).

Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, eq. (7). With ``K``
tasks and ``L_k(e)`` the mean training loss of task ``k`` over epoch ``e``, epoch ``t`` uses

    r_k = L_k(t-1) / L_k(t-2),        w_k = K * exp(r_k / T) / sum_i exp(r_i / T),

so a task whose loss fell less in the last epoch gets more weight; ``temperature`` ``T`` (2 in the paper)
softens the weights. The first two epochs, with no two past losses to compare, use ``w_k = 1``. The
epoch means come from ``on_epoch_end``; they are kept in the balancer's state, so ``--resume`` goes on
where it stopped. The per-task ``weight`` of the config is not used.
"""
from __future__ import annotations

import torch

from recmtl import Balancer, hookimpl
from recmtl.gradients import LossWeightingBalancer


class DynamicWeightAverage(LossWeightingBalancer):
    def __init__(self, task_names: list[str], weights: dict[str, float], temperature: float = 2.0) -> None:
        super().__init__(task_names, weights)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        k = len(task_names)
        # mean losses of the last two epochs (row 0: t-2, row 1: t-1) and how many epochs were seen
        self.register_buffer("loss_history", torch.ones(2, k, dtype=torch.float64))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def current_weights(self) -> torch.Tensor:
        """``[K]``: the weights for the epoch now running."""
        k = len(self.task_names)
        if int(self.epochs_seen) < 2:
            return torch.ones(k, dtype=torch.float64)
        ratio = self.loss_history[1] / self.loss_history[0].clamp_min(1e-12)
        return k * torch.softmax(ratio / self.temperature, dim=0)

    def task_weights(self, losses: dict[str, torch.Tensor]) -> list[float]:
        return self.current_weights().tolist()

    def on_epoch_end(self, epoch: int, train_losses: dict[str, float]) -> None:
        latest = torch.tensor([float(train_losses[t]) for t in self.task_names], dtype=torch.float64)
        self.loss_history.copy_(torch.stack([self.loss_history[1], latest]))
        self.epochs_seen += 1


@hookimpl
def recmtl_register_balancers() -> dict[str, type[Balancer]]:
    return {"dwa": DynamicWeightAverage}
