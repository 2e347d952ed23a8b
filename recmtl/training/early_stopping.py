"""Early stopping and model selection: ``early_stopping.monitor`` resolved into one number per epoch and a
direction (``Monitor``, which picks ``best.pt`` and, for a string monitor, when to stop), and each task's own
monitored metric (``TaskMonitors``, which picks every task's best epoch).

A NaN metric (e.g. AUC on validation rows of one class) never crashes selection: means over tasks ignore NaN,
an epoch whose monitored value is NaN does not improve, and when a monitor has been NaN on every epoch so far the
selection falls back to the validation loss, which is always defined.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from recmtl.errors import ConfigError
from recmtl.training.model import MultiTaskModel


def _mean_loss(metrics: dict[str, dict[str, float]]) -> float:
    losses = [m["loss"] for m in metrics.values() if not math.isnan(m.get("loss", math.nan))]
    return float(np.mean(losses)) if losses else math.nan


class Monitor:
    """Resolves a string ``early_stopping.monitor`` into a number per epoch and whether larger is better.
    ``auto`` is ``mean/auc`` when every head has an ``auc``, else ``loss`` (the mean of the tasks' losses)."""

    def __init__(self, spec: str, model: MultiTaskModel, reference: dict[str, dict[str, float]] | None = None) -> None:
        self.model = model
        self.reference = reference
        if spec == "delta_m":
            if not reference:
                raise ConfigError("early_stopping.monitor delta_m needs single-task reference metrics "
                                  "(early_stopping.reference: a `recmtl compare` directory or {task: {metric: value}})")
            missing = [t for t in model.task_names if t not in reference]
            if missing:
                raise ConfigError(f"early_stopping.reference has no single-task metrics for task(s) "
                                  f"{', '.join(missing)} (it has {', '.join(sorted(reference)) or 'none'})")
            self.spec, self.higher = spec, True
            return
        if spec == "auto":
            has_auc = all("auc" in h.metric_names() for h in model.heads.values())
            spec = "mean/auc" if has_auc else "loss"
        self.spec = spec
        if spec == "loss":
            self.higher = False
        else:
            if "/" not in spec:
                raise ConfigError(f"early_stopping.monitor '{spec}': use auto, loss, TASK/METRIC, mean/METRIC or a "
                                  "mapping {task: METRIC}")
            task, metric = spec.split("/", 1)
            if task != "mean" and task not in model.heads:
                raise ConfigError(f"early_stopping.monitor '{spec}': no task '{task}' (tasks: {', '.join(model.task_names)})")
            heads = model.heads.values() if task == "mean" else [model.heads[task]]
            self.higher = any(metric in h.higher_is_better for h in heads)

    def value(self, metrics: dict[str, dict[str, float]]) -> float:
        if self.spec == "delta_m":
            from recmtl.training.compare import delta_m, higher_is_better
            heads = self.model.heads
            return delta_m(metrics, {t: self.reference[t] for t in self.model.task_names},
                           lambda t, m: higher_is_better(heads[t], m))
        if self.spec == "loss":
            return _mean_loss(metrics)
        task, metric = self.spec.split("/", 1)
        if task == "mean":
            vals = [m[metric] for m in metrics.values() if metric in m]
            if not vals:
                raise ConfigError(f"early_stopping.monitor '{self.spec}': no task reports '{metric}'")
            finite = [v for v in vals if not math.isnan(v)]
            return float(np.mean(finite)) if finite else math.nan
        if metric not in metrics[task]:
            raise ConfigError(f"early_stopping.monitor '{self.spec}': task '{task}' reports {sorted(metrics[task])}")
        return float(metrics[task][metric])

    def better(self, new: float, best: float | None) -> bool:
        if best is None or math.isnan(best):
            return not math.isnan(new)
        return new > best if self.higher else new < best


def reference_metrics(reference: str | dict[str, dict[str, float]] | None,
                      tasks: list[str] = ()) -> dict[str, dict[str, float]] | None:
    """``early_stopping.reference`` as ``{task: {metric: value}}``: a mapping as given, or a ``recmtl compare``
    directory's single-task validation means of each task's primary metric (``compare.json``); every one of
    ``tasks`` must have one."""
    out = _reference(reference)
    missing = [t for t in tasks if out is not None and t not in out]
    if missing:
        raise ConfigError(f"early_stopping.reference has no single-task metrics for task(s) {', '.join(missing)} "
                          f"(it has {', '.join(sorted(out)) or 'none'})")
    return out


def _reference(reference: str | dict[str, dict[str, float]] | None) -> dict[str, dict[str, float]] | None:
    if reference is None or isinstance(reference, dict):
        return reference
    import json
    from pathlib import Path
    path = Path(reference)
    path = path / "compare.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"early_stopping.reference {reference}: no compare.json there; run `recmtl compare CONFIG "
                          f"-o {reference}` first, or give {{task: {{metric: value}}}}")
    try:
        result = json.loads(path.read_text())
        return {t: {result["primary"][t]: ms[result["primary"][t]]} for t, ms in result["reference"].items()
                if t in result["primary"] and result["primary"][t] in ms}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"early_stopping.reference {path} is not a compare.json with reference metrics ({exc})") from None


class BestValue:
    """The best value of one series and its epoch (0-based; -1: none yet)."""

    def __init__(self, higher: bool) -> None:
        self.higher, self.value, self.epoch = higher, math.nan, -1

    def offer(self, value: float, epoch: int) -> bool:
        if math.isnan(value):
            return False
        if self.epoch < 0 or (value > self.value if self.higher else value < self.value):
            self.value, self.epoch = value, epoch
            return True
        return False


class TaskMonitors:
    """Each task's best epoch by its own metric: from a mapping ``{task: METRIC}`` (``loss`` allowed), else the
    task's metric named by a ``TASK/METRIC`` or ``mean/METRIC`` monitor when the task reports it, else ``auc`` when
    its head has one, else the task's validation loss. A task whose metric has been NaN on every epoch so far is
    selected by its loss."""

    def __init__(self, spec: str | dict[str, str], model: MultiTaskModel) -> None:
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - set(model.task_names))
            if unknown:
                raise ConfigError(f"early_stopping.monitor names {unknown}, which are not tasks "
                                  f"(tasks: {', '.join(model.task_names)})")
        self.metric: dict[str, str] = {}
        for t in model.task_names:
            head = model.heads[t]
            names = set(head.metric_names())
            if isinstance(spec, dict) and t in spec:
                metric = spec[t].split("/", 1)[-1]
                if metric != "loss" and names and metric not in names:
                    raise ConfigError(f"early_stopping.monitor for task '{t}': its head reports "
                                      f"{', '.join(sorted(names))} and loss, not '{metric}'")
            elif isinstance(spec, str) and "/" in spec and spec.split("/", 1)[0] in ("mean", t) \
                    and spec.split("/", 1)[1] in names:
                metric = spec.split("/", 1)[1]
            elif isinstance(spec, str) and spec == "loss":
                metric = "loss"
            else:
                metric = "auc" if "auc" in names else "loss"
            self.metric[t] = metric
        self.higher = {t: m != "loss" and m in model.heads[t].higher_is_better for t, m in self.metric.items()}
        self.by_metric = {t: BestValue(self.higher[t]) for t in self.metric}
        self.by_loss = {t: BestValue(False) for t in self.metric}

    def update(self, metrics: dict[str, dict[str, float]], epoch: int) -> list[str]:
        """Offer one epoch's validation metrics; returns the tasks whose best epoch is now ``epoch``."""
        moved = []
        for t, metric in self.metric.items():
            before = self.best_epoch(t)
            self.by_metric[t].offer(float(metrics[t].get(metric, math.nan)), epoch)
            self.by_loss[t].offer(float(metrics[t].get("loss", math.nan)), epoch)
            if self.best_epoch(t) != before and self.best_epoch(t) == epoch:
                moved.append(t)
        return moved

    def best_epoch(self, task: str) -> int:
        """0-based; -1 when no epoch had a finite metric or loss."""
        best = self.by_metric[task]
        return best.epoch if best.epoch >= 0 else self.by_loss[task].epoch

    def selected_by(self, task: str) -> str:
        return self.metric[task] if self.by_metric[task].epoch >= 0 else "loss"

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per task: its best epoch (1-based), the metric that chose it and its value."""
        out = {}
        for t in self.metric:
            by = self.selected_by(t)
            best = self.by_metric[t] if by == self.metric[t] and self.by_metric[t].epoch >= 0 else self.by_loss[t]
            out[t] = {"epoch": self.best_epoch(t) + 1, "monitor": by, "value": best.value}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {t: [self.by_metric[t].value, self.by_metric[t].epoch, self.by_loss[t].value, self.by_loss[t].epoch]
                for t in self.metric}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for t, (mv, me, lv, le) in state.items():
            if t in self.metric:
                self.by_metric[t].value, self.by_metric[t].epoch = mv, me
                self.by_loss[t].value, self.by_loss[t].epoch = lv, le
