"""Sequence features (list columns, e.g. a user's recently clicked item ids): the helpers shared by training
(``recmtl.schema``) and the torch-free scoring path (``recmtl.serving.score``, ``recmtl.serving.app``).

A row keeps its LAST ``max_length`` items (the most recent), left-aligned; a null list is empty; null items
are missing values (the OOV id). The exported ONNX model takes a padded ``[batch, max_length]`` tensor whose
unused positions hold the padding sentinel (``recmtl.serving.wire.PAD_INT`` / ``PAD_STRING``).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recmtl.data.arrow import plain_array
from recmtl.errors import DataError


def is_list_type(typ: pa.DataType) -> bool:
    return pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)


def item_type(typ: pa.DataType) -> str | None:
    """``"int"`` or ``"string"`` for a list column of ints/strings, else None."""
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if not is_list_type(typ):
        return None
    value = typ.value_type
    if pa.types.is_dictionary(value):
        value = value.value_type
    if pa.types.is_integer(value) or pa.types.is_boolean(value):
        return "int"
    if pa.types.is_string(value) or pa.types.is_large_string(value):
        return "string"
    return None


def last_items(arr: pa.Array | pa.ChunkedArray, max_length: int, name: str) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """The items a row keeps (its last ``max_length``), flattened, and where each goes in a ``[n, max_length]``
    array: ``(values, rows, cols)``, rows left-aligned. Vectorised over the list offsets (no per-row Python)."""
    arr = plain_array(arr)
    if not is_list_type(arr.type):
        raise DataError(f"sequence feature '{name}': expected a list column, got {arr.type}")
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(arr)  # the items of non-null lists, in row order
    values = flat.dictionary_decode() if pa.types.is_dictionary(flat.type) else flat
    kept = np.minimum(lengths, max_length)
    ends = np.cumsum(lengths)
    first = ends - kept  # index in `flat` of each row's first kept item
    total = int(kept.sum())
    rows = np.repeat(np.arange(len(arr), dtype=np.int64), kept)
    kept_starts = np.cumsum(kept) - kept
    cols = np.arange(total, dtype=np.int64) - np.repeat(kept_starts, kept)
    src = np.repeat(first, kept) + cols
    if total != len(values):
        values = values.take(pa.array(src))
    return values, rows, cols
