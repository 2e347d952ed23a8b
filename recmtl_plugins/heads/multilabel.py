"""Multilabel head: K independent attributes (binary relevance), one sigmoid each, binary cross-entropy
over the labelled attribute values; mean AUC over attributes (and per attribute), micro/macro F1 at 0.5, and the
calibration metrics (``recmtl.metrics.calibration_metrics``) over all labelled attribute values pooled, with each
attribute's ECE and calibration ratio.

Binary relevance as in Tsoumakas & Katakis, "Multi-Label Classification: An Overview" (IJDWM 2007).
The label is either a list of 0/1 columns in the task config (``label: [even, closed_loop, ...]``; the
attributes take the column names, and a null leaves just that attribute of that row unlabelled) or one
fixed-length list column of 0/1 values (attributes ``TASK_0..TASK_{K-1}``). ``predict`` returns the K
probabilities ``[batch, K]``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn

from recmtl import Head, TaskInfo, hookimpl
from recmtl import metrics as M
from recmtl.layers import masked_mean


class MultilabelHead(Head):
    label_type = "multi"

    def __init__(self, input_dim: int, task: TaskInfo, threshold: float = 0.5) -> None:
        super().__init__(input_dim, task)
        if not task.classes:
            raise ValueError(f"task '{task.name}' names no attributes: give the label as a list of columns "
                             "or one fixed-length list column")
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.attributes = [str(a) for a in task.classes]
        self.threshold = float(threshold)
        self.linear = nn.Linear(input_dim, len(self.attributes))
        self.higher_is_better = frozenset({"auc", "micro_f1", "macro_f1", *(f"auc_{a}" for a in self.attributes)})

    def forward(self, h: torch.Tensor, upstream: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(h)  # logits [batch, K]

    def loss(self, output: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean BCE over the labelled (row, attribute) entries."""
        per_entry = F.binary_cross_entropy_with_logits(output, label, reduction="none")
        return masked_mean(per_entry, mask)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(output)

    @classmethod
    def label_problem(cls, distinct: np.ndarray) -> str | None:
        problem = M.binary_label_problem(distinct)
        return problem and problem.replace("a binary head", "a multilabel head (each attribute)")

    def metrics(self, label: np.ndarray, score: np.ndarray, group: np.ndarray | None = None) -> dict[str, float]:
        """``label`` [n, K] with NaN for unlabelled attributes. ``auc``: mean over the attributes that have
        both classes; ``micro_f1``: F1 of all labelled entries pooled; ``macro_f1``: mean per-attribute F1."""
        label = label.reshape(len(label), -1)
        score = score.reshape(len(score), -1)
        known = ~np.isnan(label)
        pred = score >= self.threshold
        out: dict[str, float] = {}
        aucs, f1s = [], []
        for k, name in enumerate(self.attributes):
            y, s, p = label[known[:, k], k], score[known[:, k], k], pred[known[:, k], k]
            out[f"auc_{name}"] = M.auc(y, s)
            aucs.append(out[f"auc_{name}"])
            f1s.append(float(f1_score(y, p, zero_division=0)) if len(y) else float("nan"))
            out[f"ece_{name}"] = M.ece(y, s)
            out[f"calibration_ratio_{name}"] = M.calibration_ratio(y, s)
        finite = [a for a in aucs if not np.isnan(a)]
        out["auc"] = float(np.mean(finite)) if finite else float("nan")
        out["micro_f1"] = float(f1_score(label[known], pred[known], zero_division=0)) if known.any() else float("nan")
        out["macro_f1"] = float(np.nanmean(f1s)) if not np.all(np.isnan(f1s)) else float("nan")
        out.update(M.calibration_metrics(label[known], score[known]))
        return out

    def metric_names(self) -> tuple[str, ...]:
        return (*(f"auc_{a}" for a in self.attributes), "auc", "micro_f1", "macro_f1", *M.CALIBRATION_METRICS,
                *(f"ece_{a}" for a in self.attributes), *(f"calibration_ratio_{a}" for a in self.attributes))


@hookimpl
def recmtl_register_heads() -> dict[str, type[Head]]:
    return {"multilabel": MultilabelHead}
