"""Dense features with a clip and a ``log1p`` transform: the numpy transform, the fitted statistics, schema.json,
the same transform in the exported ONNX graph, and an export + score round trip that equals PyTorch."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_config

from recmtl.config import FeatureConfig, parse_config
from recmtl.errors import ConfigError
from recmtl.schema import DenseColumn, FittedSchema


def test_log1p_is_signed_and_clip_comes_first():
    col = DenseColumn("x", transform="log1p", clip_low=-5.0, clip_high=1000.0, fill=7.0)
    got = col.values(pa.array([0.0, 1.0, -1.0, 1e6, -100.0, None, float("nan"), float("inf")]))
    want = np.array([0.0, np.log1p(1.0), -np.log1p(1.0), np.log1p(1000.0), -np.log1p(5.0), 7.0, 7.0, 7.0])
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6)
    # no transform, no clip: the values as before (filled, standardised)
    plain = DenseColumn("x", mean=1.0, std=2.0, fill=1.0)
    np.testing.assert_allclose(plain.values(pa.array([3, None, 5], pa.int64())), [1.0, 0.0, 2.0])


def test_config_refuses_transform_on_other_kinds_and_bad_clips():
    assert FeatureConfig(name="p", kind="dense", transform="log1p", clip=[0, 100]).clip == (0, 100)
    with pytest.raises(ValueError, match="transform/clip apply to dense features only"):
        FeatureConfig(name="c", kind="categorical", transform="log1p")
    with pytest.raises(ValueError, match=r"clip must be \[low, high\] with low <= high"):
        FeatureConfig(name="p", kind="dense", clip=[5, 1])
    raw = {"data": {"train": "t.parquet"}, "features": [{"name": "p", "kind": "dense", "transform": "log"}],
           "tasks": [{"name": "y"}]}
    with pytest.raises(ConfigError, match="features.0.transform"):
        parse_config(raw)


def _heavy_table(n: int, seed: int) -> pa.Table:
    """``views``: a log-normal count (int) whose log drives the label; ``price``: log-normal with nulls and a few
    negative refunds; ``d``: a plain normal number."""
    rng = np.random.default_rng(seed)
    views = np.floor(np.exp(rng.normal(3, 2, n))).astype(np.int64)
    price = np.exp(rng.normal(2, 1.5, n)) * np.where(rng.random(n) < 0.05, -1, 1)
    d = rng.normal(0, 1, n)
    logit = 1.2 * (np.log1p(views) - 3) + 0.5 * np.sign(price) * np.log1p(np.abs(price)) - 1 + 0.3 * d
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    return pa.table({"views": views, "price": pa.array(price, mask=rng.random(n) < 0.05), "d": d.astype(np.float32),
                     "c": rng.integers(0, 5, n), "y": y})


@pytest.fixture(scope="module")
def heavy_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("heavy")
    for split, seed, n in (("train", 0, 6000), ("valid", 1, 2000), ("test", 2, 2000)):
        pq.write_table(_heavy_table(n, seed), out / f"{split}.parquet", row_group_size=1500)
    return out


FEATURES = [{"name": "views", "kind": "dense", "transform": "log1p"},
            {"name": "price", "kind": "dense", "transform": "log1p", "clip": [-50.0, 500.0], "fill": 10},
            {"name": "d", "kind": "dense", "clip": [-2.0, 2.0]},
            {"name": "c", "kind": "categorical"}]


@pytest.fixture(scope="module")
def heavy_run(heavy_dir, tmp_path_factory):
    from recmtl.cli import main
    tmp = tmp_path_factory.mktemp("heavy_run")
    cfg = write_config(tmp / "c.yaml", heavy_dir, features=FEATURES, tasks=[{"name": "y"}],
                       tower={"name": "shared_bottom", "bottom_units": [16], "task_units": [8]},
                       train={"batch_size": 256, "epochs": 2, "progress": False, "threads": 1})
    for args in (["train", cfg, "--out", tmp / "run"], ["export", tmp / "run", "-o", tmp / "model.onnx"]):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            assert exc.code == 0
    return tmp


def test_statistics_are_those_of_the_transformed_values(heavy_run, heavy_dir):
    meta = json.loads((heavy_run / "run" / "schema.json").read_text())
    dense = {d["name"]: d for d in meta["dense"]}
    train = pq.read_table(heavy_dir / "train.parquet")
    logs = np.log1p(train["views"].to_numpy().astype(np.float64))
    assert dense["views"]["transform"] == "log1p" and dense["views"]["clip_low"] is None
    assert dense["views"]["mean"] == pytest.approx(logs.mean(), rel=1e-9)
    assert dense["views"]["std"] == pytest.approx(logs.std(), rel=1e-6)
    price = train["price"].drop_null().to_numpy()
    t = np.sign(np.clip(price, -50, 500)) * np.log1p(np.abs(np.clip(price, -50, 500)))
    assert dense["price"]["mean"] == pytest.approx(t.mean(), rel=1e-9)
    assert (dense["price"]["clip_low"], dense["price"]["clip_high"]) == (-50.0, 500.0)
    assert dense["price"]["fill"] == pytest.approx(np.log1p(10.0))  # a number fill is a raw value, transformed
    assert dense["d"]["transform"] == "none" and dense["d"]["clip_high"] == 2.0
    loaded = FittedSchema.load(heavy_run / "run")
    assert loaded.dense[1] == DenseColumn("price", dense["price"]["mean"], dense["price"]["std"], dense["price"]["fill"],
                                          "log1p", -50.0, 500.0)


def test_old_schema_json_without_the_keys_loads(heavy_run, tmp_path):
    import shutil
    run = tmp_path / "old"
    shutil.copytree(heavy_run / "run", run)
    meta = json.loads((run / "schema.json").read_text())
    for d in meta["dense"]:
        for key in ("transform", "clip_low", "clip_high"):
            del d[key]
    (run / "schema.json").write_text(json.dumps(meta))
    loaded = FittedSchema.load(run)
    assert [(d.transform, d.clip_low, d.clip_high) for d in loaded.dense] == [("none", None, None)] * 3


def test_graph_preprocessing_equals_the_numpy_twin():
    """The dense nodes alone, through onnxruntime, against ``DenseColumn.values`` on awkward values."""
    from onnx import helper

    from recmtl.export.graph import _Graph, core_input, dense_values
    cols = [DenseColumn("a", 2.0, 3.0, 0.5, "log1p"), DenseColumn("b", -1.0, 0.5, 4.0, "none", -1.0, 1.0),
            DenseColumn("c", 0.1, 2.0, -3.0, "log1p", None, 100.0), DenseColumn("e", 0.0, 1.0, 0.0)]
    g = _Graph()
    dense_values(g, cols)
    out = helper.make_tensor_value_info(core_input("dense"), onnx.TensorProto.FLOAT, ["batch", len(cols)])
    model = helper.make_model(helper.make_graph(g.nodes, "t", g.inputs, [out], g.inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    raw = np.array([0, 1e-3, -1e-3, 0.7, -0.7, 5, -5, 1e4, -1e4, 3e8, np.nan, np.inf, -np.inf], dtype=np.float32)
    got = session.run(None, {c.name: raw for c in cols})[0]
    want = np.stack([c.values(pa.array(raw)) for c in cols], axis=1)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def test_export_and_score_equal_pytorch(cli, heavy_run, heavy_dir, tmp_path):
    m = onnx.load(str(heavy_run / "model.onnx"))
    assert {"Log", "Sign", "Min", "Max"} <= {n.op_type for n in m.graph.node}
    scored = tmp_path / "s.parquet"
    r = cli("score", heavy_run / "model.onnx", heavy_dir / "test.parquet", "-o", scored, "--no-progress")
    assert r.code == 0, r
    r = cli("evaluate", heavy_run / "run", heavy_dir / "test.parquet", "--json", "--save-predictions", tmp_path / "t.parquet")
    assert r.code == 0, r
    onnx_scores = pq.read_table(scored)["y"].to_numpy()
    torch_scores = pq.read_table(tmp_path / "t.parquet")["y"].to_numpy()
    np.testing.assert_allclose(onnx_scores, torch_scores, atol=1e-5)
    assert json.loads(r.out)["metrics"]["y"]["auc"] > 0.7
