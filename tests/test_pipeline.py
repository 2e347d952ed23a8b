"""Minibatching: every row exactly once per epoch, shuffled across row groups and within the buffer."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recmtl.data.parquet import ParquetSource
from recmtl.schema import DenseColumn, FittedSchema, LabelColumn
from recmtl.training.batches import blocks, minibatches


def make(tmp_path, n=1000, files=2):
    for f in range(files):
        ids = np.arange(f * n, (f + 1) * n, dtype=np.float64)
        pq.write_table(pa.table({"x": ids, "y": (ids % 2)}), tmp_path / f"part{f}.parquet", row_group_size=100)
    schema = FittedSchema([], [DenseColumn("x", 0.0, 1.0, 0.0)], [LabelColumn("t", "y")])
    return ParquetSource(str(tmp_path), ["x", "y"]), schema


def rows_of(batches):
    return np.concatenate([b.inputs["dense"][:, 0].numpy() for b in batches])


def test_folder_source_and_ordered_batches(tmp_path):
    src, schema = make(tmp_path)
    assert src.num_rows == 2000 and len(src.units) == 20
    batches = list(minibatches(blocks(src, schema, 64), 128))
    x = rows_of(batches)
    np.testing.assert_array_equal(x, np.arange(2000))
    assert [b.rows for b in batches][-1] == 2000 % 128


def test_shuffled_epoch_covers_each_row_once(tmp_path):
    src, schema = make(tmp_path)
    rng = np.random.default_rng(0)
    x = rows_of(minibatches(blocks(src, schema, 64, rng), 128, buffer_rows=500, rng=rng))
    assert sorted(x.tolist()) == list(range(2000))
    assert not np.array_equal(x, np.arange(2000))
    # rows from far-apart row groups meet in the first batch (row-group order is shuffled)
    first = x[:128]
    assert first.max() - first.min() > 200
    rng2 = np.random.default_rng(0)
    again = rows_of(minibatches(blocks(src, schema, 64, rng2), 128, buffer_rows=500, rng=rng2))
    np.testing.assert_array_equal(x, again)  # deterministic by seed


def test_glob_and_missing_paths(tmp_path):
    import pytest

    from recmtl.errors import DataError
    make(tmp_path)
    assert ParquetSource(str(tmp_path / "part*.parquet")).num_rows == 2000
    with pytest.raises(DataError, match="no files match"):
        ParquetSource(str(tmp_path / "nothing*.parquet"))
    with pytest.raises(DataError, match="no such file"):
        ParquetSource(str(tmp_path / "nothing.parquet"))
