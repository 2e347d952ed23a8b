"""Early stopping: ``early_stopping.monitor`` resolved into one number per epoch and a direction."""
from __future__ import annotations

import math

import numpy as np

from recmtl.errors import ConfigError
from recmtl.training.model import MultiTaskModel


class Monitor:
    """Resolves ``early_stopping.monitor`` into a number per epoch and whether larger is better."""

    def __init__(self, spec: str, model: MultiTaskModel) -> None:
        self.model = model
        if spec == "auto":
            has_auc = all("auc" in h.metric_names() for h in model.heads.values())
            spec = "mean/auc" if has_auc else "loss"
        self.spec = spec
        if spec == "loss":
            self.higher = False
        else:
            if "/" not in spec:
                raise ConfigError(f"early_stopping.monitor '{spec}': use auto, loss, TASK/METRIC or mean/METRIC")
            task, metric = spec.split("/", 1)
            if task != "mean" and task not in model.heads:
                raise ConfigError(f"early_stopping.monitor '{spec}': no task '{task}' (tasks: {', '.join(model.task_names)})")
            heads = model.heads.values() if task == "mean" else [model.heads[task]]
            self.higher = any(metric in h.higher_is_better for h in heads)

    def value(self, metrics: dict[str, dict[str, float]]) -> float:
        if self.spec == "loss":
            return float(np.mean([m["loss"] for m in metrics.values()]))
        task, metric = self.spec.split("/", 1)
        if task == "mean":
            vals = [m[metric] for m in metrics.values() if metric in m]
            if not vals:
                raise ConfigError(f"early_stopping.monitor '{self.spec}': no task reports '{metric}'")
            return float(np.mean(vals))
        if metric not in metrics[task]:
            raise ConfigError(f"early_stopping.monitor '{self.spec}': task '{task}' reports {sorted(metrics[task])}")
        return float(metrics[task][metric])

    def better(self, new: float, best: float | None) -> bool:
        if best is None or math.isnan(best):
            return not math.isnan(new)
        return new > best if self.higher else new < best
