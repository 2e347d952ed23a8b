"""The export parity check: a relative + absolute tolerance, so unbounded outputs (watch time in seconds) export."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from recmtl.export.parity import PARITY_ATOL, PARITY_RTOL, score_differences


def test_large_values_pass_by_their_relative_difference():
    # the AMX case: a regression output near 90 that differs by 1.1e-4 (1.2e-6 relative)
    d = score_differences(np.array([90.00011, 3.0], np.float32), np.array([90.0, 3.0], np.float32))
    assert d["max_abs"] > PARITY_ATOL and d["excess"] <= 0
    # seconds of watch time: 1e5 s differing in float32's last place
    want = np.array([1e5, 2.5e5], np.float32)
    assert score_differences(np.nextafter(want, np.float32(np.inf)), want)["excess"] <= 0


def test_small_values_keep_the_absolute_tolerance():
    assert score_differences(np.array([0.5 + 2e-4]), np.array([0.5]))["excess"] > 0
    assert score_differences(np.array([0.5 + 5e-5]), np.array([0.5]))["excess"] <= 0
    # a large value off by much more than float32 rounding still fails
    assert score_differences(np.array([90.01]), np.array([90.0]))["excess"] > 0
    assert PARITY_RTOL * 90 < 0.01


def test_nan_on_one_side_fails_and_on_both_sides_agrees():
    assert score_differences(np.array([np.nan, 1.0]), np.array([0.3, 1.0]))["excess"] == np.inf
    assert score_differences(np.array([0.3]), np.array([np.nan]))["excess"] == np.inf
    assert score_differences(np.array([np.nan]), np.array([np.nan]))["excess"] <= 0
    assert score_differences(np.array([], np.float32), np.array([], np.float32))["excess"] == 0


@pytest.mark.slow
def test_watch_time_in_seconds_exports_and_scores_like_pytorch(cli, tmp_path):
    """A regression target in the thousands (log1p head, predictions in seconds) passes the parity check."""
    rng = np.random.default_rng(5)
    for split, n in (("train", 2000), ("valid", 600)):
        x = rng.normal(size=n)
        c = rng.integers(0, 8, n)
        seconds = np.expm1(8.0 + 0.9 * x + 0.2 * (c % 4) + rng.normal(0, 0.2, n))  # median ~3,000 s
        pq.write_table(pa.table({"x": x, "c": c, "watch_seconds": seconds}), tmp_path / f"{split}.parquet")
    cfg = {"data": {"train": str(tmp_path / "train.parquet"), "validation": str(tmp_path / "valid.parquet")},
           "features": [{"name": "x", "kind": "dense"}, {"name": "c", "kind": "categorical"}],
           "tasks": [{"name": "watch", "label": "watch_seconds", "head": "regression", "params": {"log1p": True}}],
           "encoders": {"categorical": {"name": "embedding", "dim": 4}},
           "tower": {"name": "shared_bottom", "bottom_units": [16], "task_units": [8]},
           "optimizer": {"lr": 0.02}, "train": {"batch_size": 128, "epochs": 3, "progress": False, "threads": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli("train", tmp_path / "c.yaml", "--out", tmp_path / "run").code == 0
    r = cli("export", tmp_path / "run", "-o", tmp_path / "m.onnx")
    assert r.code == 0 and "watch=" in r.out and f"{PARITY_RTOL:g} x |score|" in r.out, r
    assert cli("evaluate", tmp_path / "run", tmp_path / "valid.parquet", "--save-predictions", tmp_path / "p.parquet").code == 0
    assert cli("score", tmp_path / "m.onnx", tmp_path / "valid.parquet", "-o", tmp_path / "s.parquet", "--no-progress").code == 0
    got, want = pq.read_table(tmp_path / "s.parquet")["watch"].to_numpy(), pq.read_table(tmp_path / "p.parquet")["watch"].to_numpy()
    assert np.median(want) > 500  # in seconds, as the labels
    np.testing.assert_allclose(got, want, rtol=PARITY_RTOL, atol=PARITY_ATOL)
