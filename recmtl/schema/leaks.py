"""The leak check: refuse a feature that is a copy of a label or determines it exactly, or that alone
separates a binary label (a count or amount the label was thresholded from); warn when it nearly does."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recmtl.config import FeatureConfig
from recmtl.data.arrow import plain_array
from recmtl.errors import DataError
from recmtl.schema.labels import LabelColumn

LEAK_SAMPLE_ROWS = 200_000
LEAK_MAX_DISTINCT = 64
#: a numeric feature whose values alone rank a binary label's rows with at least this AUC (or at most
#: 1 - it) is refused: a threshold on it gets nearly every row right, as when the label is ``count > 0``
LEAK_REFUSE_AUC = 0.999
#: ... and with at least this one it is reported as a warning (legitimate features stay far below)
LEAK_WARN_AUC = 0.98
#: rows of the sample the single-feature AUC is computed over
LEAK_AUC_ROWS = 50_000
#: a label is checked only when at least this many rows are outside its most frequent value: one positive
#: in a small sample is "determined" by whatever value it happens to have
LEAK_MIN_MINORITY = 10
#: ... and "determines exactly" needs at least this many rows per distinct feature value on average: on
#: 100 rows a 41-valued search id groups rows by chance, not by derivation
LEAK_ROWS_PER_VALUE = 10


def _warn(message: str) -> None:
    print(f"recmtl: warning: {message}", file=sys.stderr, flush=True)


def separation_auc(x: np.ndarray, y: np.ndarray) -> float:
    """The ROC AUC of ranking the rows by ``x`` alone for boolean labels ``y`` (ties: average ranks; the
    Mann-Whitney statistic); NaN with one class only."""
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = pd.Series(x).rank(method="average").to_numpy()
    return (float(ranks[y].sum()) - pos * (pos + 1) / 2) / (pos * neg)


def check_leaks(features: Iterable[FeatureConfig], sample: pa.Table, labels: list[LabelColumn],
                warn: Callable[[str], None] = _warn) -> None:
    """Refuse a feature that is a copy of a label or determines it exactly (a derived column), or a numeric
    feature with many distinct values whose single-feature AUC for a binary label is at least
    ``LEAK_REFUSE_AUC``; ``warn`` about one at ``LEAK_WARN_AUC`` or more. Only where the sample can tell:
    at least 100 labelled rows, ``LEAK_MIN_MINORITY`` outside the label's majority value, and for "determines"
    ``LEAK_ROWS_PER_VALUE`` rows per feature value."""
    checks = []  # (task, label column, label values, mask): multilabel tasks per attribute column
    for lab in labels:
        if lab.kind == "class":
            checks.append((lab.task, lab.column, *lab.class_ids(sample.column(lab.column))))
        elif lab.kind == "multi" and isinstance(lab.column, list):
            checks += [(lab.task, c, *LabelColumn(lab.task, c).values(sample.column(c))) for c in lab.column]
        elif lab.kind == "value":
            checks.append((lab.task, lab.column, *lab.values(sample.column(lab.column))))
    for task_name, label, y, mask in checks:
        if mask.sum() < 100 or len(np.unique(y[mask])) < 2:
            continue
        y_l = y[mask]
        if len(y_l) - int(np.unique(y_l, return_counts=True)[1].max()) < LEAK_MIN_MINORITY:
            continue  # too few rows outside the majority value to tell a derivation from chance
        binary = len(np.unique(y_l)) == 2
        for f in features:
            col = plain_array(sample.column(f.name)).filter(pa.array(mask))
            if col.null_count == len(col):
                continue
            codes = pc.dictionary_encode(col).indices.to_numpy(zero_copy_only=False)
            n_codes = int(np.nanmax(codes)) + 1 if len(codes) else 0
            leak = False
            if n_codes <= LEAK_MAX_DISTINCT:
                if len(codes) < LEAK_ROWS_PER_VALUE * n_codes:
                    continue  # values too rare in this sample for "determines" to mean anything
                frame = pd.DataFrame({"f": codes, "y": y_l})
                leak = int(frame.groupby("f", dropna=False)["y"].nunique().max()) == 1
            elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
                x = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
                leak = bool(np.allclose(x, y_l, equal_nan=False))
                if not leak and binary:
                    _check_separation(f.name, task_name, label, x, y_l, warn)
            if leak:
                raise DataError(
                    f"feature '{f.name}' determines the label of task '{task_name}' (column '{label}') "
                    "exactly on the training data: it is a copy of the label or derived from it, so the model "
                    f"would learn nothing usable; remove '{f.name}' from features"
                )


def _check_separation(feature: str, task: str, label: str, x: np.ndarray, y: np.ndarray,
                      warn: Callable[[str], None]) -> None:
    """The single-feature AUC test of :func:`check_leaks` for one numeric feature and one binary label."""
    valid = np.isfinite(x)
    x, y = x[valid][:LEAK_AUC_ROWS], y[valid][:LEAK_AUC_ROWS]
    if len(y) < 100:
        return
    auc = separation_auc(x, y == y.max())
    score = max(auc, 1.0 - auc)  # a feature that ranks the positives low separates them as well
    if not score >= LEAK_WARN_AUC:  # also NaN: one class only
        return
    where = f"task '{task}' (column '{label}')"
    side = "high" if auc > 0.5 else "low"
    if score >= LEAK_REFUSE_AUC:
        raise DataError(
            f"feature '{feature}' alone separates the label of {where} on the training data (AUC {score:.4f} over "
            f"{len(y):,} rows: the positives are the rows with {side} values): the label looks thresholded from "
            f"it (e.g. a count of what happened after the impression), so the model would learn nothing usable; "
            f"remove '{feature}' from features")
    warn(f"feature '{feature}' alone nearly separates the label of {where} (AUC {score:.4f} over {len(y):,} "
         f"training rows; refused from {LEAK_REFUSE_AUC}): if it is computed from the label or from what "
         f"happened after the impression, remove it from features")
