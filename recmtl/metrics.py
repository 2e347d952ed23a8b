"""Metrics over labelled rows: AUC, logloss and GAUC for binary tasks (``binary_metrics``, with the label check
``binary_label_problem``), RMSE/MAE for regression."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss, mean_absolute_error, mean_squared_error, roc_auc_score


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


#: what ``binary_metrics`` returns (``gauc`` only when the rows have groups)
BINARY_METRICS = ("auc", "logloss", "gauc")


def binary_metrics(label: np.ndarray, score: np.ndarray, group: np.ndarray | None = None) -> dict[str, float]:
    """AUC and logloss of probabilities ``score`` for 0/1 ``label``, and GAUC when ``group`` is given."""
    out = {"auc": auc(label, score), "logloss": logloss(label, score)}
    if group is not None:
        out["gauc"] = gauc(label, score, group)
    return out


def binary_label_problem(distinct: np.ndarray, what: str = "a binary head") -> str | None:
    """What is wrong with distinct label values that should be 0/1 (None when they are)."""
    bad = [v for v in distinct.tolist() if v not in (0.0, 1.0)]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:5])
        return (f"{what} needs 0/1 labels, found {shown}; map a column's values to 1 with "
                "`positive: [values]` in the task")
    return None
