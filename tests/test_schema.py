"""Feature schema: vocabularies, OOV/null ids, hashing, dense standardisation, labels, persistence."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recmtl.config import parse_config
from recmtl.data.parquet import ParquetSource
from recmtl.errors import DataError
from recmtl.registry import load_registry
from recmtl.schema import CategoricalColumn, FittedSchema, fit_schema
from recmtl.schema.fit import _VocabCounter

BINARY = load_registry().get("head", "binary")


def fit(tmp_path, table: pa.Table, features: list[dict], tasks=None):
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=3)
    cfg = parse_config({"data": {"train": str(tmp_path / "t.parquet"), "read_rows": 4},
                        "features": features, "tasks": tasks or [{"name": "click"}]})
    return fit_schema(cfg, ParquetSource(cfg.data.train, cfg.columns()), {t.name: BINARY for t in cfg.tasks})


def test_vocabulary_min_count_oov_and_nulls(tmp_path):
    t = pa.table({"s": ["a", "b", "a", None, "c", "a", "b", "d", "a", ""],
                  "i": pa.array([5, 5, 7, 7, 9, None, 5, 7, 5, 11], pa.int32()),
                  "click": [0, 1] * 5})
    schema = fit(tmp_path, t, [{"name": "s", "kind": "categorical", "min_count": 2},
                               {"name": "i", "kind": "categorical"}])
    s, i = schema.categorical
    assert list(s.vocab) == ["a", "b"]  # by count, rare c/d dropped
    assert s.cardinality == 3
    ids = s.ids(pa.array(["b", "a", "zzz", None, "c", ""]))
    assert ids.tolist() == [2, 1, 0, 0, 0, 0]  # the empty string is missing, like null
    assert list(i.vocab) == [5, 7, 9, 11]
    assert i.ids(pa.array([11, None, 12, 5], pa.int64())).tolist() == [4, 0, 0, 1]


def test_max_size_and_hash_buckets(tmp_path):
    t = pa.table({"s": [f"v{k % 7}" for k in range(70)], "i": list(range(70)), "click": [0, 1] * 35})
    schema = fit(tmp_path, t, [{"name": "s", "kind": "categorical", "max_size": 3},
                               {"name": "i", "kind": "categorical", "hash_buckets": 10}])
    s, i = schema.categorical
    assert len(s.vocab) == 3 and s.cardinality == 4
    assert i.cardinality == 11
    ids = i.ids(pa.array([3, 13, -7, None], pa.int64()))
    assert ids.tolist() == [4, 4, 4, 0]  # x mod 10 + 1, negatives wrap, null -> 0
    hashed = CategoricalColumn("h", "string", None, 100)
    a = hashed.ids(pa.array(["x", "y", "x", None, ""]))
    assert a[0] == a[2] and a[3] == 0 and a[4] == 0 and (a[:3] >= 1).all() and (a < 101).all()


def test_dense_fill_and_standardise(tmp_path):
    x = [1.0, 2.0, None, 3.0, float("nan"), 2.0]
    t = pa.table({"x": x, "z": [1.0] * 6, "click": [0, 1, 0, 1, 0, 1]})
    schema = fit(tmp_path, t, [{"name": "x", "kind": "dense"}, {"name": "z", "kind": "dense", "fill": "zero"}])
    d = schema.dense[0]
    assert d.mean == pytest.approx(2.0)
    assert d.std == pytest.approx(np.std([1, 2, 3, 2]))
    v = d.values(pa.array([2.0, None, 4.0]))
    assert v[0] == pytest.approx(0.0) and v[1] == pytest.approx(0.0)  # null -> mean -> 0
    assert schema.dense[1].std == 1.0  # constant column does not divide by zero


def test_transform_labels_mask_and_positive(tmp_path):
    t = pa.table({"s": ["a", "b", "a", "b"], "click": pa.array([1, None, 0, 1], pa.int64()),
                  "kind": ["buy", "view", None, "buy"]})
    schema = fit(tmp_path, t, [{"name": "s", "kind": "categorical"}],
                 tasks=[{"name": "click"}, {"name": "bought", "label": "kind", "positive": ["buy"]}])
    arrays = schema.transform(t)
    assert arrays.inputs["categorical"].shape == (4, 1)
    assert arrays.mask[:, 0].tolist() == [True, False, True, True]
    assert arrays.labels[:, 1].tolist() == [1, 0, 0, 1]
    assert arrays.mask[:, 1].tolist() == [True, True, False, True]


def test_save_load_roundtrip(tmp_path):
    t = pa.table({"s": ["a", "b", "a", "c"], "i": [1, 2, 3, 1], "x": [0.5, 1.5, 2.5, None], "click": [0, 1, 0, 1]})
    schema = fit(tmp_path, t, [{"name": "s", "kind": "categorical"}, {"name": "i", "kind": "categorical", "hash_buckets": 8},
                               {"name": "x", "kind": "dense"}])
    schema.save(tmp_path / "run")
    loaded = FittedSchema.load(tmp_path / "run")
    a, b = schema.transform(t), loaded.transform(t)
    for k in a.inputs:
        np.testing.assert_array_equal(a.inputs[k], b.inputs[k])


def test_vocab_counter_merges_across_batches():
    counter = _VocabCounter()
    rng = np.random.default_rng(0)
    values = rng.integers(0, 50, 10_000)
    for chunk in np.array_split(values, 37):
        counter.add(pa.array(chunk))
    counter.parts = [counter._merge()]  # force a merge, then keep adding
    counter.add(pa.array(values[:10]))
    vocab = counter.vocabulary(min_count=1, max_size=None)
    counts = np.bincount(np.concatenate([values, values[:10]]), minlength=50)
    assert list(vocab) == sorted(range(50), key=lambda v: (-counts[v], v))


def test_type_errors_name_the_column(tmp_path):
    t = pa.table({"x": ["a", "b"], "click": [0, 1]})
    with pytest.raises(DataError, match="feature 'x' is dense but its column has type string"):
        fit(tmp_path, t, [{"name": "x", "kind": "dense"}])
    t = pa.table({"x": [1, 2], "click": ["yes", "no"]})
    with pytest.raises(DataError, match="label column 'click'.*positive"):
        fit(tmp_path, t, [{"name": "x", "kind": "categorical"}])
