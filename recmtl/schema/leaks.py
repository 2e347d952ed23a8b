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


def check_leaks(features: Iterable[FeatureConfig], sample: pa.Table, labels: list[LabelColumn]) -> None:
    """Refuse a feature that is a copy of a label or determines it exactly (a derived column)."""
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
                x = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
                leak = bool(np.allclose(x, y_l, equal_nan=False))
            if leak:
                raise DataError(
                    f"feature '{f.name}' determines the label of task '{task_name}' (column '{label}') "
                    "exactly on the training data: it is a copy of the label or derived from it, so the model "
                    f"would learn nothing usable; remove '{f.name}' from features"
                )
