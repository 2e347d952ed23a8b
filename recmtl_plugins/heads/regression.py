"""Regression head: mean squared error on the standardised target; RMSE and MAE in the label's unit.

The target is the label, or ``log(1 + y)`` with ``log1p: true`` (durations such as watch time). With
``standardize: true`` (the default) the head learns ``(target - mean) / std``, the mean and standard deviation
of the target over the training labels (fitted in the fit pass, ``TaskInfo.target``), so its loss is about 1
for a model that predicts the mean whatever the label's scale (a 1-5 rating, seconds, prices) and does not
dominate a summed loss or ``monitor: auto``. Scores are in the label's unit: ``z * std + mean``, then
``expm1`` with ``log1p`` — the same arithmetic in the exported ONNX model."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from recmtl import Head, TaskInfo, hookimpl
from recmtl import metrics as M
from recmtl.layers import masked_mean


class RegressionHead(Head):
    higher_is_better = frozenset()

    def __init__(self, input_dim: int, task: TaskInfo, log1p: bool = False, standardize: bool = True) -> None:
        super().__init__(input_dim, task)
        self.log1p = bool(log1p)
        self.standardize = bool(standardize)
        stats = task.target if self.standardize else {}
        mean, std = float(stats.get("mean", 0.0)), float(stats.get("std", 1.0))
        #: the target's training mean and standard deviation (0 and 1: not standardised, or fitted by no fit pass)
        self.target_mean = mean if math.isfinite(mean) else 0.0
        self.target_std = std if math.isfinite(std) and std > 0 else 1.0
        self.linear = nn.Linear(input_dim, 1)

    @classmethod
    def target_values(cls, label: np.ndarray, log1p: bool = False, **params: Any) -> np.ndarray:
        """The values the head standardises: ``log(1 + max(y, 0))`` with ``log1p``, else the labels."""
        return np.log1p(np.maximum(label, 0)) if log1p else label

    def forward(self, h: torch.Tensor, upstream: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(h).squeeze(-1)  # the standardised target

    def loss(self, output: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = torch.log1p(label.clamp_min(0)) if self.log1p else label
        per_row = (output - (target - self.target_mean) / self.target_std) ** 2
        return masked_mean(per_row, mask)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        value = output * self.target_std + self.target_mean if self.standardize else output
        return torch.exp(value) - 1 if self.log1p else value  # expm1, in a form the ONNX exporter knows

    def metrics(self, label: np.ndarray, score: np.ndarray, group: np.ndarray | None = None) -> dict[str, float]:
        return {"rmse": M.rmse(label, score), "mae": M.mae(label, score)}

    def metric_names(self) -> tuple[str, ...]:
        return ("rmse", "mae")


@hookimpl
def recmtl_register_heads() -> dict[str, type[Head]]:
    return {"regression": RegressionHead}
