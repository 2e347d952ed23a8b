"""Task labels: a head's ``label_type`` read from Arrow as values, class ids or attributes, with a mask of
labelled entries."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recmtl.config import THRESHOLD_OPS, parse_threshold
from recmtl.data.arrow import plain_array
from recmtl.errors import DataError


@dataclass
class LabelColumn:
    """A task's label: float values plus a mask of labelled (non-null) entries.

    ``kind`` follows the head's ``label_type``: ``value`` (a number, or 1/0 through ``positive``: a list of
    values, or one comparison ``"OP NUMBER"`` such as ``">0"``), ``class`` (class ids 0..K-1: the position of
    the value, int or string, in the fitted ``classes``), ``multi`` (K 0/1 attributes: several columns, or one
    fixed-length list column; ``classes`` names them). ``target``: the fitted statistics of the head's
    training target (``Head.target_values``; ``count``, ``mean``, ``std``, ``min``, ``max``), value labels only.
    """

    task: str
    column: str | list[str]
    positive: list[Any] | str | None = None
    kind: str = "value"
    classes: list[Any] | None = None
    target: dict[str, float] | None = None
    _index: pd.Index | None = field(default=None, repr=False, compare=False)

    @property
    def columns(self) -> list[str]:
        return list(self.column) if isinstance(self.column, list) else [self.column]

    @property
    def width(self) -> int:
        return len(self.classes) if self.kind == "multi" else 1

    def read(self, batch: pa.RecordBatch | pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Labels ``[n, width]`` float32 and the mask ``[n, width]`` of labelled entries."""
        if self.kind == "class":
            y, mask = self.class_ids(batch.column(self.column))
        elif self.kind == "multi":
            return self.attributes(batch)
        else:
            y, mask = self.values(batch.column(self.column))
        return y[:, None], mask[:, None]

    def class_ids(self, arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Each labelled value's position in ``classes`` (a value not among them is an error)."""
        arr = plain_array(arr)
        mask = arr.is_valid().to_numpy(zero_copy_only=False)
        what = f"label column '{self.column}' of task '{self.task}'"
        if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
            if self._index is None:
                self._index = pd.Index([str(c) for c in self.classes], dtype=object)
            ids = self._index.get_indexer(arr.fill_null(str(self.classes[0])).to_numpy(zero_copy_only=False))
            unknown = (ids < 0) & mask
            if unknown.any():
                raise DataError(f"{what}: class '{arr[int(np.flatnonzero(unknown)[0])]}' was not in the training data "
                                f"(classes: {', '.join(map(str, self.classes[:20]))})")
            return np.where(mask, ids, 0).astype(np.float32), mask
        if not (pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type)):
            raise DataError(f"{what} has type {arr.type}; a class label is an int or a string")
        y = arr.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        classes = np.asarray(self.classes, dtype=np.int64)
        if len(classes) and classes[0] == 0 and classes[-1] == len(classes) - 1:  # 0..K-1: the value is the id
            ids, unknown = y, mask & ((y < 0) | (y >= len(classes)))
        else:  # sorted class values, e.g. ratings 1..5
            ids = np.minimum(np.searchsorted(classes, y), len(classes) - 1)
            unknown = mask & (classes[ids] != y)
        if unknown.any():
            shown = ", ".join(map(str, self.classes[:20])) + (", ..." if len(self.classes) > 20 else "")
            raise DataError(f"{what}: class {y[unknown][0]} was not in the training data (classes: {shown}; "
                            "params.num_classes K makes them 0..K-1)")
        return np.where(mask, ids, 0).astype(np.float32), mask

    def attributes(self, batch: pa.RecordBatch | pa.Table) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(self.column, list):
            parts = [LabelColumn(self.task, c).values(batch.column(c)) for c in self.column]
            return np.stack([p[0] for p in parts], 1), np.stack([p[1] for p in parts], 1)
        arr = plain_array(batch.column(self.column))
        n, k = len(arr), self.width
        what = f"label column '{self.column}' of task '{self.task}'"
        if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type)):
            raise DataError(f"{what} has type {arr.type}; a multilabel task takes a list of 0/1 label columns "
                            "or one fixed-length list column")
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        lengths = pc.list_value_length(arr).fill_null(k).to_numpy(zero_copy_only=False)
        if (lengths != k).any():
            raise DataError(f"{what}: every list must hold {k} attribute values, found one with "
                            f"{int(lengths[lengths != k][0])}")
        flat = pc.list_flatten(arr)
        y, m = LabelColumn(self.task, self.column).values(flat)
        y_out, m_out = np.zeros((n, k), np.float32), np.zeros((n, k), bool)
        y_out[valid], m_out[valid] = y.reshape(-1, k), m.reshape(-1, k)
        return y_out, m_out

    def values(self, arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Float values, or 1/0 through ``positive``, and the mask of labelled entries: nulls stay unlabelled, and
        so do NaN under a comparison and non-finite numbers taken as they are."""
        arr = plain_array(arr)
        mask = arr.is_valid().to_numpy(zero_copy_only=False)
        numeric = pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type)
        if isinstance(self.positive, str):  # a comparison, "OP NUMBER"
            op, threshold = parse_threshold(self.positive)
            if not numeric:
                raise DataError(f"label column '{self.column}' of task '{self.task}' has type {arr.type}; positive "
                                f"'{self.positive}' compares numbers (for values that count as 1, give a list: "
                                "positive: [value, ...])")
            x = arr.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
            mask &= ~np.isnan(x)
            with np.errstate(invalid="ignore"):
                y = THRESHOLD_OPS[op](x, threshold)
            return np.where(mask, y, False).astype(np.float32), mask
        if self.positive is not None:
            value_set = pa.array([str(v) for v in self.positive]) if (
                pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)) else pa.array(self.positive).cast(arr.type)
            y = pc.is_in(arr, value_set=value_set).to_numpy(zero_copy_only=False).astype(np.float32)
        else:
            if not numeric:
                raise DataError(
                    f"label column '{self.column}' of task '{self.task}' has type {arr.type}; "
                    "expected numbers, or set `positive: [values]` to mark which values count as 1"
                )
            y = arr.cast(pa.float32()).fill_null(0).to_numpy(zero_copy_only=False)
            finite = np.isfinite(y)
            mask &= finite
            y = np.where(finite, y, 0).astype(np.float32)
        return y, mask
