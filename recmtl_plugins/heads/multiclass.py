"""Multiclass head: one softmax over K classes, cross-entropy; accuracy, macro-F1, multiclass logloss.

The label is an int or string column; its classes are the sorted distinct values of the training data (ratings
1..5 are 5 classes), mapped to ids ``0..K-1`` (saved in ``schema.json`` and the ONNX metadata, so class ``k``
of the score is ``classes[k]``). ``num_classes: K`` makes int labels within ``0..K-1`` the class ids
themselves, so classes absent from the training data still get a score; other labels must then have exactly K
distinct values. ``predict`` returns the class probabilities ``[batch, K]``.
Softmax regression / cross-entropy as in Bishop, *Pattern Recognition and Machine Learning* (2006), 4.3.4.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, log_loss
from torch import nn

from recmtl import Head, TaskInfo, hookimpl
from recmtl.layers import masked_mean


class MulticlassHead(Head):
    label_type = "class"
    higher_is_better = frozenset({"accuracy", "macro_f1"})

    def __init__(self, input_dim: int, task: TaskInfo, num_classes: int | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(input_dim, task)
        seen = len(task.classes)  # the fitted classes: the distinct labels, or 0..num_classes-1
        if num_classes is not None and seen and num_classes != seen:
            raise ValueError(f"num_classes {num_classes} but the label column of task '{task.name}' has {seen} "
                             f"classes ({', '.join(map(str, task.classes[:10]))}{', ...' if seen > 10 else ''})")
        self.num_classes = int(num_classes or seen)
        if self.num_classes < 2:
            raise ValueError(f"task '{task.name}' needs at least 2 classes (set num_classes, or give the label "
                             f"column more than one class), got {self.num_classes}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.linear = nn.Linear(input_dim, self.num_classes)

    def forward(self, h: torch.Tensor, upstream: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(h)  # logits [batch, K]

    def loss(self, output: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = torch.where(mask > 0, label, torch.zeros_like(label)).long()  # masked rows: any valid id
        per_row = F.cross_entropy(output, target, reduction="none", label_smoothing=self.label_smoothing)
        return masked_mean(per_row, mask)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return torch.softmax(output, dim=-1)

    @classmethod
    def label_problem(cls, distinct: np.ndarray) -> str | None:
        bad = [v for v in distinct.tolist() if v != int(v)]
        if bad:
            return f"a multiclass head needs int or string class labels, found {bad[:5]}"
        return None

    def metrics(self, label: np.ndarray, score: np.ndarray, group: np.ndarray | None = None) -> dict[str, float]:
        if len(label) == 0:
            return {"accuracy": float("nan"), "macro_f1": float("nan"), "logloss": float("nan")}
        y = label.astype(np.int64)
        pred = score.argmax(1)
        probs = np.clip(score, 1e-7, 1.0)
        return {"accuracy": float(accuracy_score(y, pred)),
                "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
                "logloss": float(log_loss(y, probs / probs.sum(1, keepdims=True), labels=np.arange(score.shape[1])))}

    def metric_names(self) -> tuple[str, ...]:
        return ("accuracy", "macro_f1", "logloss")


@hookimpl
def recmtl_register_heads() -> dict[str, type[Head]]:
    return {"multiclass": MulticlassHead}
