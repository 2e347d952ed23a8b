"""Arrow <-> numpy without copies and without pandas (pyarrow's own conversions import it: a tenth of a
second at the start of every ``recmtl score``)."""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa


def plain_array(arr: pa.Array | pa.ChunkedArray, decode_dictionary: bool = True) -> pa.Array:
    """One contiguous Arrow array (chunks combined, their dictionaries unified), dictionary-decoded unless
    ``decode_dictionary`` is False."""
    if isinstance(arr, pa.ChunkedArray):  # a single chunk as it is (combine_chunks would copy it)
        chunks = arr.chunks
        arr = chunks[0] if len(chunks) == 1 else pa.concat_arrays(chunks) if chunks else pa.nulls(0, arr.type)
    if decode_dictionary and pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


_NUMPY_TYPES = {pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
                pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.uint64(): np.uint64,
                pa.float32(): np.float32, pa.float64(): np.float64}


def numpy_dtype(arrow_type: pa.DataType) -> np.dtype:
    """The numpy dtype of a fixed-width numeric Arrow type (``DataType.to_pandas_dtype`` imports pandas)."""
    return np.dtype(_NUMPY_TYPES[arrow_type])


def numpy_view(arr: pa.Array) -> np.ndarray:
    """A read-only numpy view of a numeric Arrow array without nulls (no copy). Unlike ``Array.to_numpy`` it
    does not make pyarrow import pandas, a tenth of a second at the start of every ``recmtl score``."""
    dtype = numpy_dtype(arr.type)
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)


def arrow_view(values: np.ndarray) -> pa.Array:
    """A 1-D numeric numpy array as an Arrow array without nulls (no copy, no pandas import)."""
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def arrow_scalar(value: Any, dtype: Any) -> pa.Scalar:
    """A numeric Arrow scalar (e.g. a fill value for ``fill_null``) made without ``pa.scalar``, which imports pandas."""
    return arrow_view(np.array([value], dtype=dtype))[0]
