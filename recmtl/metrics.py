"""Metrics over labelled rows: AUC, logloss and GAUC for binary tasks (``binary_metrics``, with the label check
``binary_label_problem``), their calibration (normalized entropy, calibration ratio, ECE over equal-mass bins,
Brier score, ``reliability`` bins for diagrams), RMSE/MAE for regression."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import brier_score_loss, log_loss, mean_absolute_error, mean_squared_error, roc_auc_score


def auc(label: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (scikit-learn); NaN when only one class is present."""
    if len(label) == 0 or np.unique(label).size < 2:
        return float("nan")
    return float(roc_auc_score(label, score))


def logloss(label: np.ndarray, score: np.ndarray) -> float:
    if len(label) == 0:
        return float("nan")
    return float(log_loss(label, np.clip(score, 1e-7, 1 - 1e-7), labels=[0, 1]))


def gauc(label: np.ndarray, score: np.ndarray, group: np.ndarray) -> float:
    """Group AUC: per-group (e.g. per-user) AUC averaged with impression-count weights, over the groups
    that have both a positive and a negative row. Ties get the average rank, as in ROC AUC."""
    frame = pd.DataFrame({"g": group, "y": label.astype(np.float64), "s": score})
    frame["r"] = frame.groupby("g", sort=False)["s"].rank(method="average")
    per = frame.assign(rp=frame["r"] * frame["y"]).groupby("g", sort=False).agg(
        n=("y", "size"), pos=("y", "sum"), rank_pos=("rp", "sum"))
    per = per[(per["pos"] > 0) & (per["pos"] < per["n"])]
    if per.empty:
        return float("nan")
    neg = per["n"] - per["pos"]
    group_auc = (per["rank_pos"] - per["pos"] * (per["pos"] + 1) / 2) / (per["pos"] * neg)
    return float(np.average(group_auc, weights=per["n"]))


def rmse(label: np.ndarray, score: np.ndarray) -> float:
    return float(np.sqrt(mean_squared_error(label, score))) if len(label) else float("nan")


def mae(label: np.ndarray, score: np.ndarray) -> float:
    return float(mean_absolute_error(label, score)) if len(label) else float("nan")


#: equal-mass bins of ``ece`` and ``reliability``
CALIBRATION_BINS = 15


def normalized_entropy(label: np.ndarray, score: np.ndarray) -> float:
    """Normalized entropy (He et al., ADKDD 2014): logloss divided by the entropy of the base rate, i.e. the logloss
    of always predicting the observed positive rate (< 1: better than that constant). NaN for a single class."""
    if len(label) == 0:
        return float("nan")
    rate = float(np.mean(label))
    if rate <= 0.0 or rate >= 1.0:
        return float("nan")
    entropy = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    return logloss(label, score) / float(entropy)


def calibration_ratio(label: np.ndarray, score: np.ndarray) -> float:
    """Sum of predicted probabilities over the number of positives (1.0: calibrated on average; 1.3: 30 % too high).
    NaN without positives."""
    positives = float(np.sum(label))
    return float(np.sum(score, dtype=np.float64) / positives) if positives > 0 else float("nan")


def brier(label: np.ndarray, score: np.ndarray) -> float:
    """Brier score: the mean squared difference between probability and 0/1 label (scikit-learn)."""
    if len(label) == 0:
        return float("nan")
    return float(brier_score_loss(label, np.clip(score, 0.0, 1.0), pos_label=1))


def reliability(label: np.ndarray, score: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, list[float]]:
    """Equal-mass bins of the rows sorted by score (at most ``bins``, about the same number of rows each; tied scores
    may straddle a boundary): per bin the mean predicted probability, the observed positive rate and the row count,
    the points of a reliability diagram."""
    n = len(label)
    if n == 0:
        return {"predicted": [], "observed": [], "count": []}
    order = np.argsort(score, kind="stable")
    parts = [p for p in np.array_split(order, min(bins, n)) if len(p)]
    s, y = np.asarray(score, np.float64), np.asarray(label, np.float64)
    return {"predicted": [float(s[p].mean()) for p in parts], "observed": [float(y[p].mean()) for p in parts],
            "count": [int(len(p)) for p in parts]}


def ece(label: np.ndarray, score: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error over equal-mass bins: the row-weighted mean of |mean predicted - observed rate|."""
    if len(label) == 0:
        return float("nan")
    r = reliability(label, score, bins)
    gap = np.abs(np.array(r["predicted"]) - np.array(r["observed"]))
    return float(np.average(gap, weights=r["count"]))


def calibration_metrics(label: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """``ne``, ``calibration_ratio``, ``ece`` and ``brier`` of probabilities ``score`` for 0/1 ``label``."""
    return {"ne": normalized_entropy(label, score), "calibration_ratio": calibration_ratio(label, score),
            "ece": ece(label, score), "brier": brier(label, score)}


#: a task whose head input has at least this share of its units dead (constant on every validation row) is warned
#: about at the end of training (``diagnostics.dead_units``; ``recmtl report`` marks it)
DEAD_SHARE = 0.5

#: the names ``calibration_metrics`` returns
CALIBRATION_METRICS = ("ne", "calibration_ratio", "ece", "brier")
#: what ``binary_metrics`` returns (``gauc`` only when the rows have groups)
BINARY_METRICS = ("auc", "logloss", "gauc", *CALIBRATION_METRICS)


def binary_metrics(label: np.ndarray, score: np.ndarray, group: np.ndarray | None = None) -> dict[str, float]:
    """AUC and logloss of probabilities ``score`` for 0/1 ``label``, GAUC when ``group`` is given, and the calibration
    metrics (``calibration_metrics``)."""
    out = {"auc": auc(label, score), "logloss": logloss(label, score)}
    if group is not None:
        out["gauc"] = gauc(label, score, group)
    out.update(calibration_metrics(label, score))
    return out


def binary_label_problem(distinct: np.ndarray, what: str = "a binary head") -> str | None:
    """What is wrong with distinct label values that should be 0/1 (None when they are)."""
    bad = [v for v in distinct.tolist() if v not in (0.0, 1.0)]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:5])
        return (f"{what} needs 0/1 labels, found {shown}; map a column's values to 1 with "
                "`positive: [values]` in the task")
    return None


def epoch_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """One epoch record (``recmtl_epoch_end``'s ``metrics``) as flat ``tag -> value`` scalars: train loss,
    validation metrics per task, balancer weights, gate entropy per gate, dead head-input units per task, seconds and
    rows/s."""
    out: dict[str, float] = {}
    for task, v in (metrics.get("train_loss") or {}).items():
        out[f"train_loss/{task}"] = v
    for task, values in (metrics.get("validation") or {}).items():
        for name, v in values.items():
            out[f"validation/{task}/{name}"] = v
    for task, v in (metrics.get("weights") or {}).items():
        out[f"weights/{task}"] = v
    for gate, v in ((metrics.get("diagnostics") or {}).get("gate_entropy") or {}).items():
        out[f"gate_entropy/{gate}"] = v
    for task, count in ((metrics.get("diagnostics") or {}).get("dead_units") or {}).items():
        if isinstance(count, list) and count:
            out[f"dead_units/{task}"] = count[0]
    for key in ("seconds", "rows_per_s"):
        if key in metrics:
            out[f"time/{key}"] = metrics[key]
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}
