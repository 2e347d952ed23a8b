"""features[].max_distinct: the fit pass's vocabulary counter in bounded memory (issue #22, item 3)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_config

from recmtl.config import parse_config
from recmtl.data.parquet import ParquetSource
from recmtl.errors import ConfigError
from recmtl.registry import load_registry
from recmtl.schema import fit_schema
from recmtl.schema.fit import _VocabCounter


def _count(values: np.ndarray, cap: int | None, block: int = 1000) -> _VocabCounter:
    counter = _VocabCounter(cap)
    for i in range(0, len(values), block):
        counter.add(pa.array(values[i:i + block]))
    return counter


@pytest.mark.parametrize("min_count,max_size", [(1, None), (2, None), (1, 50), (3, 7)])
def test_below_the_cap_the_vocabulary_is_exact(min_count, max_size):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 300, 20_000)  # 300 distinct values, many ties in the counts
    exact = _count(values, None).vocabulary(min_count, max_size)
    capped = _count(values, 300)
    assert not capped.sketched
    np.testing.assert_array_equal(capped.vocabulary(min_count, max_size), exact)
    strings = pa.array(values.astype(str))
    a, b = _VocabCounter(), _VocabCounter(400)
    for i in range(0, len(strings), 999):
        a.add(strings[i:i + 999])
        b.add(strings[i:i + 999])
    np.testing.assert_array_equal(b.vocabulary(min_count, max_size), a.vocabulary(min_count, max_size))


def test_above_the_cap_the_sketch_keeps_the_well_separated_top_k():
    rng = np.random.default_rng(1)
    heavy = np.repeat(np.arange(20), np.arange(20, 0, -1) * 300)  # value v: (20 - v) * 300 times, gaps of 300
    tail = rng.integers(1_000, 1_000_000, 60_000)  # ~58k distinct values seen about once
    values = rng.permutation(np.concatenate([heavy, tail]))
    cap = 500
    counter = _count(values, cap)
    assert counter.sketched
    assert counter.decrement <= len(values) / (cap + 1)  # the error bound: 126,000 / 501 = 251 < 300
    assert max(len(p) for p in counter.parts) <= 2 * cap
    np.testing.assert_array_equal(counter.vocabulary(1, 20), _count(values, None).vocabulary(1, 20))


def _config(tmp_path, **feature):
    raw = {"data": {"train": str(tmp_path / "train.parquet"), "read_rows": 512},
           "features": [{"name": "item", "kind": "categorical", **feature}],
           "tasks": [{"name": "click", "label": "click", "head": "binary"}],
           "tower": {"name": "shared_bottom", "bottom_units": [8], "task_units": [4]}}
    return parse_config(raw, tmp_path)


def test_a_cap_below_max_size_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"item.*max_distinct \(10\) must be at least max_size \(100\)"):
        _config(tmp_path, max_size=100, max_distinct=10)
    with pytest.raises(ConfigError, match="max_distinct"):
        _config(tmp_path, hash_buckets=64, max_distinct=10)


def test_fit_pass_with_the_cap_prints_a_note(tmp_path, capsys):
    rng = np.random.default_rng(2)
    items = rng.permutation(np.concatenate([np.repeat(np.arange(5), 2_000), rng.integers(100, 10**6, 5_000)]))
    pq.write_table(pa.table({"item": items, "click": rng.integers(0, 2, len(items))}), tmp_path / "train.parquet")
    heads = {"click": load_registry().get("head", "binary")}
    cfg = _config(tmp_path, max_size=5, max_distinct=50)
    schema = fit_schema(cfg, ParquetSource(cfg.resolve(cfg.data.train), cfg.columns()), heads)
    assert sorted(schema.categorical[0].vocab.tolist()) == [0, 1, 2, 3, 4]
    assert "note: feature 'item' has more than max_distinct=50 distinct values" in capsys.readouterr().err
    cfg = _config(tmp_path, max_size=5, max_distinct=100_000)  # above the column's distinct count: exact, silent
    exact = fit_schema(cfg, ParquetSource(cfg.resolve(cfg.data.train), cfg.columns()), heads)
    assert exact.categorical[0].vocab.tolist() == schema.categorical[0].vocab.tolist()
    assert "note:" not in capsys.readouterr().err


def test_train_cli_with_the_cap(cli, funnel_dir, tmp_path):
    features = ([{"name": "user_id", "kind": "categorical", "max_size": 5, "max_distinct": 10}]
                + [{"name": n, "kind": "categorical"} for n in ["item_id", "c03"]] + [{"name": "d01", "kind": "dense"}])
    bad_cfg = write_config(tmp_path / "bad.yaml", funnel_dir, features=[{**features[0], "max_distinct": 3}, *features[1:]])
    bad = cli("train", bad_cfg, "--out", tmp_path / "bad")
    assert bad.code == 2 and "max_distinct (3) must be at least max_size (5)" in bad.err
    assert "Traceback" not in bad.err
    cfg = write_config(tmp_path / "config.yaml", funnel_dir, features=features)
    res = cli("train", cfg, "--out", tmp_path / "run", "--set", "train.epochs=1")
    assert res.code == 0, res.err
    assert "note: feature 'user_id' has more than max_distinct=10 distinct values" in res.err
