"""The leak check: refuse a feature that is a copy of a label or determines it exactly."""
from __future__ import annotations

from collections.abc import Iterable

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
#: a number that separates a 0/1 label exactly is refused only when each class has at least this many rows
LEAK_MIN_CLASS_ROWS = 10


def check_leaks(features: Iterable[FeatureConfig], sample: pa.Table, labels: list[LabelColumn]) -> None:
    """Refuse a feature that is a copy of a label or determines it exactly (a derived column): a label that is a
    function of a feature with few values, a number equal to a numeric label, or a number that separates a 0/1
    label (one threshold on it gives every label, e.g. a copy of the count a ``positive: ">0"`` thresholds)."""
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
        for f in features:
            col = plain_array(sample.column(f.name)).filter(pa.array(mask))
            if col.null_count == len(col):
                continue
            codes = pc.dictionary_encode(col).indices.to_numpy(zero_copy_only=False)
            n_codes = int(np.nanmax(codes)) + 1 if len(codes) else 0
            leak = False
            if n_codes <= LEAK_MAX_DISTINCT:
                frame = pd.DataFrame({"f": codes, "y": y_l})
                leak = int(frame.groupby("f", dropna=False)["y"].nunique().max()) == 1
            elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
                x = col.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
                leak = bool(np.allclose(x, y_l, equal_nan=False)) or _separates(x, y_l)
            if leak:
                raise DataError(
                    f"feature '{f.name}' determines the label of task '{task_name}' (column '{label}') "
                    "exactly on the training data: it is a copy of the label or derived from it, so the model "
                    f"would learn nothing usable; remove '{f.name}' from features"
                )


def _separates(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether one threshold on ``x`` gives every 0/1 label ``y`` (AUC 1 or 0) on the rows where ``x`` is a number,
    with at least ``LEAK_MIN_CLASS_ROWS`` rows of each class there."""
    known = np.isfinite(x)
    if not np.isin(y, (0.0, 1.0)).all():
        return False
    pos, neg = x[known & (y == 1)], x[known & (y == 0)]
    if min(len(pos), len(neg)) < LEAK_MIN_CLASS_ROWS:
        return False
    return bool(pos.min() > neg.max() or pos.max() < neg.min())
