"""Sequence features (list columns): schema transform, pooling, and the CLI end to end (train, export with
parity, score, serve, init)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from recmtl.schema import SequenceColumn
from recmtl.serving.score import ModelInput, to_feeds
from recmtl.serving.wire import PAD_INT, PAD_STRING
from recmtl_plugins.encoders.sequence import SequencePoolEncoder


# ---- schema -----------------------------------------------------------------------------------------
def test_transform_keeps_the_last_items_pads_and_maps_nulls_and_unseen_values_to_oov():
    col = SequenceColumn("hist", "int", np.array([10, 20, 30, 40]), max_length=3)  # ids 1..4, OOV 0, padding 5
    arr = pa.array([[10, 20, 30, 40], None, [], [20, None, 99], [40]], pa.list_(pa.int64()))
    ids = col.sequence_ids(arr)
    assert col.padding_id == 5 == col.cardinality
    np.testing.assert_array_equal(ids, [[2, 3, 4],  # truncated: the last 3 (most recent) items
                                        [5, 5, 5],  # null list = empty
                                        [5, 5, 5],
                                        [2, 0, 0],  # null item and unseen 99 -> OOV
                                        [4, 5, 5]])
    # wider output (another feature's longer max_length): extra positions are padding
    assert col.sequence_ids(arr, 5)[0].tolist() == [2, 3, 4, 5, 5]
    # large_list and fixed_size_list behave the same; a sliced array keeps its rows
    np.testing.assert_array_equal(col.sequence_ids(arr.cast(pa.large_list(pa.int64()))), ids)
    fixed = pa.array([[10, 20], [99, 40]], pa.list_(pa.int32(), 2))
    np.testing.assert_array_equal(col.sequence_ids(fixed), [[1, 2, 5], [0, 4, 5]])
    np.testing.assert_array_equal(col.sequence_ids(arr.slice(3, 2)), ids[3:])


def test_string_sequences_and_hashing():
    col = SequenceColumn("tags", "string", np.array(["a", "b"], dtype=object), max_length=2)
    arr = pa.array([["x", "a", "b"], ["", None], None], pa.list_(pa.string()))
    np.testing.assert_array_equal(col.sequence_ids(arr), [[1, 2], [0, 0], [3, 3]])
    hashed = SequenceColumn("tags", "string", None, hash_buckets=7, max_length=2)
    out = hashed.sequence_ids(arr)
    assert hashed.padding_id == 8 and out[2].tolist() == [8, 8] and out[1].tolist() == [0, 0]
    assert ((out[0] >= 1) & (out[0] <= 7)).all()


def test_to_feeds_pads_with_the_sentinel_and_keeps_the_last_items():
    t = pa.table({"h": pa.array([[1, 2, 3], None, [None, 5]], pa.list_(pa.int64())),
                  "s": pa.array([["a"], ["b", "c", "d"], []], pa.list_(pa.string()))})
    feeds = to_feeds(t, [ModelInput("h", "int64", (2,), "sequence"), ModelInput("s", "string", (2,), "sequence")])
    null = np.iinfo(np.int64).min
    np.testing.assert_array_equal(feeds["h"], [[2, 3], [PAD_INT, PAD_INT], [null, 5]])
    assert feeds["s"].tolist() == [["a", PAD_STRING], ["c", "d"], [PAD_STRING, PAD_STRING]]


# ---- encoder ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["mean", "sum", "max"])
def test_pooling_ignores_padding(pooling):
    from recmtl import FeatureInfo
    feats = [FeatureInfo("a", "sequence", 4, {"max_length": 3}), FeatureInfo("b", "sequence", 3, {"max_length": 2})]
    enc = SequencePoolEncoder(feats, dim=2, pooling=pooling)
    w = enc.tables[0].weight.detach()  # rows: a 0..3, a's padding 4, b 0..2, b's padding 8
    x = torch.tensor([[[1, 2, 4], [0, 3, 3]],    # a: ids 1, 2; b: id 0 (b is padded to length 3 with 3)
                      [[4, 4, 4], [3, 3, 3]]])   # no items at all -> zeros
    out = enc(x)
    items_a, items_b = w[[1, 2]], w[[5]]
    reduce = {"mean": lambda e: e.mean(0), "sum": lambda e: e.sum(0), "max": lambda e: e.max(0).values}[pooling]
    torch.testing.assert_close(out[0], torch.cat([reduce(items_a), reduce(items_b)]))
    torch.testing.assert_close(out[1], torch.zeros(4))
    out.sum().backward()
    assert enc.tables[0].weight.grad.is_sparse


def test_encoder_contract():
    from recmtl.testing import check_encoder
    for pooling in ("mean", "sum", "max"):
        check_encoder(SequencePoolEncoder, pooling=pooling)


def test_config_options():
    from recmtl.config import FeatureConfig
    assert FeatureConfig(name="h", kind="sequence").max_length == 50
    with pytest.raises(ValueError, match="max_length applies to sequence"):
        FeatureConfig(name="h", kind="categorical", max_length=3)
    assert FeatureConfig(name="h", kind="sequence", hash_buckets=10, embedding_dim=4).hash_buckets == 10


# ---- end to end -------------------------------------------------------------------------------------
ITEMS = 300


def _data(path, n: int, seed: int) -> None:
    """Clicks driven mostly by the share of 'liked' items (ids < 60) in the user's history."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 15, n)
    share = rng.uniform(0, 1, n)  # the user's taste
    hist, tags = [], []
    for i in range(n):
        liked = rng.random(lengths[i]) < share[i]
        items = np.where(liked, rng.integers(0, 60, lengths[i]), rng.integers(60, ITEMS, lengths[i])).tolist()
        if i % 17 == 0:
            items = None
        elif i % 5 == 0 and items:
            items[0] = None
        hist.append(items)
        tags.append([f"t{k}" for k in rng.integers(0, 8, rng.integers(0, 4))])
    frac = np.array([0.0 if h is None or not h else np.mean([v is not None and v < 60 for v in h]) for h in hist])
    logit = -0.3 + 4.0 * (frac - 0.35)
    c = rng.integers(0, 5, n)
    d = rng.normal(size=n)
    logit += 0.2 * d + 0.1 * (c == 2)
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    pq.write_table(pa.table({
        "hist": pa.array(hist, pa.list_(pa.int64())), "tags": pa.array(tags, pa.list_(pa.string())),
        "c": pa.array([f"v{v}" for v in c]), "d": pa.array(d), "click": pa.array(click),
    }), path, row_group_size=2000)


@pytest.fixture(scope="module")
def seq_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    _data(root / "train.parquet", 8000, 0)
    _data(root / "valid.parquet", 2000, 1)
    return root


def _config(path, data, sequence: bool, **seq_options):
    features = [{"name": "c", "kind": "categorical"}, {"name": "d", "kind": "dense"}]
    if sequence:
        features += [{"name": "hist", "kind": "sequence", "max_length": 10, **seq_options},
                     {"name": "tags", "kind": "sequence", "max_length": 3, "embedding_dim": 4, **seq_options}]
    cfg = {"seed": 0, "data": {"train": str(data / "train.parquet"), "validation": str(data / "valid.parquet"),
                               "shuffle_buffer": 4096, "read_rows": 2048},
           "features": features, "tasks": [{"name": "click"}],
           "encoders": {"categorical": {"name": "embedding", "dim": 4}, "sequence": {"name": "sequence_pool", "dim": 8}},
           "tower": {"name": "shared_bottom"},
           "optimizer": {"lr": 0.01},
           "train": {"batch_size": 256, "epochs": 3, "progress": False, "threads": 1}}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def seq_run(seq_data, tmp_path_factory):
    from recmtl.cli import main
    out = tmp_path_factory.mktemp("seqrun")
    for name, sequence in (("with", True), ("without", False)):
        try:
            main(["train", str(_config(out / f"{name}.yaml", seq_data, sequence)), "--out", str(out / name)])
        except SystemExit as exc:
            assert not exc.code, exc
    return out


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_sequence_carries_signal_and_exports_scores_and_serves(cli, seq_data, seq_run, tmp_path):
    auc = {name: json.loads((seq_run / name / "metrics.json").read_text())["validation"]["click"]["auc"]
           for name in ("with", "without")}
    print("validation AUC", auc)
    assert auc["with"] > 0.75 and auc["with"] > auc["without"] + 0.1, auc

    model = tmp_path / "m.onnx"
    r = cli("export", seq_run / "with", "-o", model)
    assert r.code == 0, r
    import onnx
    m = onnx.load(str(model))
    meta = json.loads({p.key: p.value for p in m.metadata_props}["recmtl.schema"])
    inputs = {i["name"]: i for i in meta["inputs"]}
    assert inputs["hist"]["kind"] == "sequence" and inputs["hist"]["max_length"] == 10 and inputs["hist"]["shape"] == [10]
    assert inputs["hist"]["padding"] == PAD_INT and inputs["tags"]["padding"] == PAD_STRING
    assert inputs["tags"]["dtype"] == "string" and inputs["tags"]["max_length"] == 3

    # score equals PyTorch's predictions (evaluate --save-predictions) within 1e-5
    r = cli("score", model, seq_data / "valid.parquet", "-o", tmp_path / "s.parquet", "--no-progress")
    assert r.code == 0, r
    r = cli("evaluate", seq_run / "with", seq_data / "valid.parquet", "--save-predictions", tmp_path / "p.parquet")
    assert r.code == 0, r
    scored = pq.read_table(tmp_path / "s.parquet")["click"].to_numpy()
    torch_scores = pq.read_table(tmp_path / "p.parquet")["click"].to_numpy()
    np.testing.assert_allclose(scored, torch_scores, atol=1e-5)

    # serve: v1 JSON lists (fast path) and v2 padded tensors give the same scores
    from starlette.testclient import TestClient

    from recmtl.serving.app import create_app
    rows = pq.read_table(seq_data / "valid.parquet").slice(0, 20)
    with TestClient(create_app(model)) as client:
        instances = [{k: r[k] for k in ("hist", "tags", "c", "d")} for r in rows.to_pylist()]
        r = client.post("/v1/models/m/predict", json={"instances": instances})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose([p["click"] for p in r.json()["predictions"]], scored[:20], atol=1e-6)
        v2meta = client.get("/v2/models/m").json()
        assert {"name": "hist", "datatype": "INT64", "shape": [-1, 10]} in v2meta["inputs"]
        feeds = to_feeds(rows, [ModelInput(i["name"], i["dtype"], tuple(i.get("shape") or ()), i["kind"])
                                for i in meta["inputs"]])
        dtypes = {"int64": "INT64", "string": "BYTES", "float32": "FP32"}
        body = {"inputs": [{"name": i["name"], "shape": list(feeds[i["name"]].shape), "datatype": dtypes[i["dtype"]],
                            "data": [v if not isinstance(v, float) or np.isfinite(v) else 0.0
                                     for v in feeds[i["name"]].reshape(-1).tolist()]}
                           for i in meta["inputs"]]}
        out = client.post("/v2/models/m/infer", json=body)
        assert out.status_code == 200, out.text
        np.testing.assert_allclose(out.json()["outputs"][0]["data"], scored[:20], atol=1e-6)
        bad = client.post("/v1/models/m/predict", json={"instances": [{**instances[0], "hist": 5}]})
        assert bad.status_code == 400 and "hist" in bad.json()["error"]
        bad = client.post("/v1/models/m/predict", json={"instances": [{**instances[0], "hist": ["x"]}]})
        assert bad.status_code == 400 and "integers" in bad.json()["error"]

    from recmtl.serving.triton import write_triton_repo
    config = (write_triton_repo(model, tmp_path / "triton", "m") / "config.pbtxt").read_text()
    assert '{ name: "hist" data_type: TYPE_INT64 dims: [ 10 ] }' in config
    assert '{ name: "tags" data_type: TYPE_STRING dims: [ 3 ] }' in config


def test_hashed_sequences_with_max_pooling_export_with_parity(cli, seq_data, tmp_path):
    """hash_buckets (Mod for ints, MurmurHash3 for strings) and the padding sentinel in the graph."""
    cfg = _config(tmp_path / "c.yaml", seq_data, True, hash_buckets=64)
    assert cli("train", cfg, "--out", tmp_path / "run", "--set", "train.epochs=1",
               "--set", "encoders.sequence.pooling=max").code == 0
    r = cli("export", tmp_path / "run", "-o", tmp_path / "m.onnx")
    assert r.code == 0, r
    from recmtl.serving.score import Scorer
    rows = pq.read_table(seq_data / "valid.parquet").slice(0, 50)
    a = Scorer(tmp_path / "m.onnx").score(rows)["click"].to_numpy()
    # a row's items beyond max_length and its padding do not matter
    longer = rows.set_column(0, "hist", pa.array([[7] * 20 + (h or []) for h in rows["hist"].to_pylist()],
                                                 pa.list_(pa.int64())))
    b = Scorer(tmp_path / "m.onnx").score(longer)["click"].to_numpy()
    keep = np.array([len(h or []) >= 10 for h in rows["hist"].to_pylist()])
    np.testing.assert_allclose(a[keep], b[keep], atol=1e-6)


def test_init_proposes_sequence_features(cli, seq_data, tmp_path):
    r = cli("init", seq_data / "train.parquet", "--task", "click", "-o", tmp_path / "c.yaml")
    assert r.code == 0, r
    cfg = yaml.safe_load((tmp_path / "c.yaml").read_text())
    kinds = {f["name"]: f["kind"] for f in cfg["features"]}
    assert kinds == {"hist": "sequence", "tags": "sequence", "c": "categorical", "d": "dense"}
    assert cfg["encoders"]["sequence"]["name"] == "sequence_pool"


def test_a_sequence_feature_on_a_non_list_column_fails_clearly(cli, seq_data, tmp_path):
    cfg = yaml.safe_load(_config(tmp_path / "c.yaml", seq_data, False).read_text())
    cfg["features"][0]["kind"] = "sequence"  # column c holds strings, not lists
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("train", tmp_path / "c.yaml", "--out", tmp_path / "run")
    assert r.code == 2 and "feature 'c' is sequence but its column has type string; expected a list" in r.err, r
    t = pa.table({"h": pa.array([1, 2])})
    from recmtl.errors import DataError
    with pytest.raises(DataError, match="column 'h' has type int64; the model expects lists of integers"):
        to_feeds(t, [ModelInput("h", "int64", (3,), "sequence")])
