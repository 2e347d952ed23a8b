"""Binary head (CTR, CVR, any 0/1 label): one logit, binary cross-entropy; AUC, logloss, GAUC."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recmtl import Head, TaskInfo, hookimpl
from recmtl import metrics as M


def binary_label_problem(distinct: np.ndarray) -> str | None:
    bad = [v for v in distinct.tolist() if v not in (0.0, 1.0)]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:5])
        return (f"a binary head needs 0/1 labels, found {shown}; map a column's values to 1 with "
                "`positive: [values]` in the task")
    return None


def binary_metrics(label: np.ndarray, score: np.ndarray, group: np.ndarray | None) -> dict[str, float]:
    out = {"auc": M.auc(label, score), "logloss": M.logloss(label, score)}
    if group is not None:
        out["gauc"] = M.gauc(label, score, group)
    return out


class BinaryHead(Head):
    def __init__(self, input_dim: int, task: TaskInfo) -> None:
        super().__init__(input_dim, task)
        self.linear = nn.Linear(input_dim, 1)

    def forward(self, h: torch.Tensor, upstream: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(h).squeeze(-1)

    def loss(self, output: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_row = F.binary_cross_entropy_with_logits(output, label, reduction="none")
        return (per_row * mask).sum() / mask.sum().clamp_min(1)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(output)

    @classmethod
    def label_problem(cls, distinct: np.ndarray) -> str | None:
        return binary_label_problem(distinct)

    def metrics(self, label: np.ndarray, score: np.ndarray, group: np.ndarray | None = None) -> dict[str, float]:
        return binary_metrics(label, score, group)


@hookimpl
def recmtl_register_heads() -> dict[str, type[Head]]:
    return {"binary": BinaryHead}
