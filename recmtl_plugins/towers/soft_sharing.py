"""Soft parameter sharing: a full MLP per task, with an L2 penalty pulling the tasks' parameters together.

Duong, Cohn, Bird and Cook, "Low Resource Dependency Parsing: Cross-lingual Parameter Sharing in a Neural
Network Parser", ACL 2015 (the L2 distance between the two tasks' parameters as a regulariser); the name
and the framing as the soft counterpart of hard sharing follow Ruder, "An Overview of Multi-Task Learning
in Deep Neural Networks", 2017. No parameter is shared: each task has its own ``units`` MLP (all evaluated
as one batched product) and the training loss gets ``penalty x sum over layers of sum_t ||W_t - mean_s W_s||^2``
(weights and biases) through ``regularization()``. ``penalty = 0`` is independent towers; a large one
approaches hard sharing. ``diagnostics()`` reports ``parameter_distance``, the current penalty sum.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from recmtl import Tower, hookimpl
from recmtl.layers import Experts, check_units


class SoftSharing(Tower):
    def __init__(self, input_dim: int, task_names: list[str], units: list[int] = (128, 64),
                 penalty: float = 1e-3, dropout: float = 0.0) -> None:
        super().__init__(input_dim, task_names)
        units = check_units("units", units)
        if not units:
            raise ValueError("units needs at least one layer")
        if penalty < 0:
            raise ValueError(f"penalty must be non-negative, got {penalty}")
        self.penalty = float(penalty)
        self.columns = Experts(input_dim, len(task_names), units, dropout)  # one column per task

    @property
    def output_dims(self) -> dict[str, int]:
        return {t: self.columns.output_dim for t in self.task_names}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.columns(x)
        return {t: h[i] for i, t in enumerate(self.task_names)}

    def distance(self) -> torch.Tensor:
        """``sum over layers of sum_t ||W_t - mean_s W_s||^2`` (weights and biases)."""
        total = torch.zeros((), device=self.columns.biases[0].device)
        for i, bias in enumerate(self.columns.biases):
            for p in (self.columns.layer_weights(i), bias):  # [T, ...] per task
                total = total + (p - p.mean(0, keepdim=True)).pow(2).sum()
        return total

    def regularization(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.penalty == 0:
            return torch.zeros(())
        return self.penalty * self.distance()

    def shared_parameters(self) -> list[nn.Parameter]:
        return []  # nothing is shared; the penalty couples the tasks

    def diagnostics(self) -> dict[str, Any]:
        with torch.no_grad():
            return {"parameter_distance": round(float(self.distance()), 6)}


@hookimpl
def recmtl_register_towers() -> dict[str, type[Tower]]:
    return {"soft_sharing": SoftSharing}
