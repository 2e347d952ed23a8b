"""Binary head (CTR, CVR, any 0/1 label): one logit, binary cross-entropy; AUC, logloss, GAUC."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recmtl import Head, TaskInfo, hookimpl
from recmtl import metrics as M
from recmtl.layers import masked_mean


class BinaryHead(Head):
    def __init__(self, input_dim: int, task: TaskInfo) -> None:
        super().__init__(input_dim, task)
        self.linear = nn.Linear(input_dim, 1)

    def forward(self, h: torch.Tensor, upstream: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(h).squeeze(-1)

    def loss(self, output: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_row = F.binary_cross_entropy_with_logits(output, label, reduction="none")
        return masked_mean(per_row, mask)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(output)

    @classmethod
    def label_problem(cls, distinct: np.ndarray) -> str | None:
        return M.binary_label_problem(distinct)

    def metrics(self, label: np.ndarray, score: np.ndarray, group: np.ndarray | None = None) -> dict[str, float]:
        return M.binary_metrics(label, score, group)

    def metric_names(self) -> tuple[str, ...]:
        return M.BINARY_METRICS


@hookimpl
def recmtl_register_heads() -> dict[str, type[Head]]:
    return {"binary": BinaryHead}
