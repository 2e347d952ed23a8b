"""Regression head: mean squared error; RMSE and MAE. With ``log1p: true`` the head is trained on
``log(1 + y)`` (durations such as watch time) and its score is mapped back with ``expm1``."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from recmtl import Head, TaskInfo, hookimpl
from recmtl import metrics as M
from recmtl.layers import masked_mean


class RegressionHead(Head):
    higher_is_better = frozenset()

    def __init__(self, input_dim: int, task: TaskInfo, log1p: bool = False) -> None:
        super().__init__(input_dim, task)
        self.log1p = bool(log1p)
        self.linear = nn.Linear(input_dim, 1)

    def forward(self, h: torch.Tensor, upstream: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(h).squeeze(-1)

    def loss(self, output: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = torch.log1p(label.clamp_min(0)) if self.log1p else label
        per_row = (output - target) ** 2
        return masked_mean(per_row, mask)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return torch.exp(output) - 1 if self.log1p else output  # expm1, in a form the ONNX exporter knows

    def metrics(self, label: np.ndarray, score: np.ndarray, group: np.ndarray | None = None) -> dict[str, float]:
        return {"rmse": M.rmse(label, score), "mae": M.mae(label, score)}

    def metric_names(self) -> tuple[str, ...]:
        return ("rmse", "mae")


@hookimpl
def recmtl_register_heads() -> dict[str, type[Head]]:
    return {"regression": RegressionHead}
