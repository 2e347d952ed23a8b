"""ESMM head: CTCVR = CTR x CVR over the entire impression space.

Ma et al., "Entire Space Multi-Task Model: An Effective Approach for Estimating Post-Click Conversion
Rate", SIGIR 2018. The task's label is click-and-convert on every impression; the head learns pCVR from
its own tower output and multiplies by the CTR task's score (``ctr_task``), so the CVR estimate is
trained on all impressions with no sample-selection bias. The score it outputs is pCTCVR.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from recmtl import Head, TaskInfo, hookimpl
from recmtl import metrics as M
from recmtl.layers import fp32, masked_mean

EPS = 1e-7


class ESMMHead(Head):
    def __init__(self, input_dim: int, task: TaskInfo, ctr_task: str = "click") -> None:
        super().__init__(input_dim, task)
        if ctr_task == task.name:
            raise ValueError(f"ctr_task of task '{task.name}' must name another (binary) task")
        self.ctr_task = ctr_task
        self.depends_on = (ctr_task,)
        self.cvr = nn.Linear(input_dim, 1)

    def forward(self, h: torch.Tensor, upstream: dict[str, torch.Tensor]) -> torch.Tensor:
        p_cvr = torch.sigmoid(fp32(self.cvr(h).squeeze(-1)))  # fp32: in bf16 a confident pCVR rounds to 1.0
        return fp32(upstream[self.ctr_task]) * p_cvr  # pCTCVR

    def loss(self, output: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # binary cross-entropy written out: F.binary_cross_entropy raises on NaN inputs, and a diverged run must
        # reach the loop's "training loss became nan" error instead. fp32: in bf16 ``1 - EPS`` is 1.0, so a pCTCVR
        # rounded to 1.0 on a label-1 row gave ``0 * log1p(-1) = nan`` (bf16 autocast, issue 21)
        p = fp32(output).clamp(EPS, 1 - EPS)
        per_row = -(label * torch.log(p) + (1 - label) * torch.log1p(-p))
        return masked_mean(per_row, mask)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return output

    @classmethod
    def label_problem(cls, distinct: np.ndarray) -> str | None:
        bad = [v for v in distinct.tolist() if v not in (0.0, 1.0)]
        return f"an ESMM head needs 0/1 click-and-convert labels, found {bad[:5]}" if bad else None

    def metrics(self, label: np.ndarray, score: np.ndarray, group: np.ndarray | None = None) -> dict[str, float]:
        return M.binary_metrics(label, score, group)

    def metric_names(self) -> tuple[str, ...]:
        return M.BINARY_METRICS


@hookimpl
def recmtl_register_heads() -> dict[str, type[Head]]:
    return {"esmm": ESMMHead}
