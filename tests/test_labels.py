"""Labels: threshold positives, the per-split label summary and its checks, regression targets standardised
inside the head, multiclass classes that keep their int values; old run directories keep working."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from recmtl.config import parse_config, parse_threshold
from recmtl.contracts import TaskInfo
from recmtl.data.parquet import ParquetSource
from recmtl.errors import ConfigError, DataError
from recmtl.registry import load_registry
from recmtl.schema import FittedSchema, LabelColumn, fit_schema
from recmtl.schema.summary import Moments, format_summary, run_summary
from recmtl.training.model import MultiTaskModel
from recmtl_plugins.heads.regression import RegressionHead

REGISTRY = load_registry()


def config(tmp_path, tasks, features=None, **data):
    raw = {"data": {"train": str(tmp_path / "train.parquet"), "read_rows": 64, **data},
           "features": features or [{"name": "x", "kind": "dense"}],
           "tasks": tasks, "tower": {"name": "shared_bottom", "bottom_units": [8], "task_units": [4]}}
    return parse_config(raw, tmp_path)


def fitted(cfg):
    heads = {t.name: REGISTRY.get("head", t.head) for t in cfg.tasks}
    return fit_schema(cfg, ParquetSource(cfg.resolve(cfg.data.train), cfg.columns()), heads)


def write(tmp_path, name="train", **columns):
    pq.write_table(pa.table(columns), tmp_path / f"{name}.parquet", row_group_size=50)


# ---- threshold positives ----------------------------------------------------------------------------------
def task_config(positive):
    return parse_config({"data": {"train": "t.parquet"}, "features": [{"name": "x", "kind": "dense"}],
                         "tasks": [{"name": "liked", "label": "rating", "positive": positive}]})


def test_threshold_positive_forms_and_config_errors():
    assert parse_threshold(">0") == (">", 0.0)
    assert parse_threshold(" >= 4 ") == (">=", 4.0)
    assert parse_threshold("!=-1.5e1") == ("!=", -15.0)
    assert parse_threshold("buy") is None and parse_threshold("=>3") is None and parse_threshold("> inf") is None
    assert task_config(" >=4").tasks[0].positive == ">=4"
    assert task_config(["buy", 3]).tasks[0].positive == ["buy", 3]
    with pytest.raises(ConfigError, match=r"tasks\.0\.positive: task 'liked': positive '=>4' is neither a list .*"
                                          r"OP one of >, >=, <, <=, ==, !="):
        task_config("=>4")
    with pytest.raises(ConfigError, match=r"positive 'buy' is neither .*write a list: \[buy\]"):
        task_config("buy")
    with pytest.raises(ConfigError, match=r"positive 4 is a single value; write a list \(\[4\]\) .* such as '>=4'"):
        task_config(4)


def test_threshold_positive_values_nulls_and_nan_stay_unlabelled():
    rating = pa.array([1, 4, 5, None, 3, 4], pa.int64())
    y, mask = LabelColumn("liked", "rating", ">=4").values(rating)
    assert y.tolist() == [0, 1, 1, 0, 0, 1] and mask.tolist() == [True, True, True, False, True, True]
    seconds = pa.array([0.0, 2.5, float("nan"), None, 0.1])
    for positive, want in [(">0", [0, 1, 0, 0, 1]), (">=0.1", [0, 1, 0, 0, 1]), ("<0.2", [1, 0, 0, 0, 1]),
                           ("<=0", [1, 0, 0, 0, 0]), ("==0", [1, 0, 0, 0, 0]), ("!=0", [0, 1, 0, 0, 1])]:
        y, mask = LabelColumn("t", "s", positive).values(seconds)
        assert y.tolist() == want, positive
        assert mask.tolist() == [True, True, False, False, True], positive
    with pytest.raises(DataError, match=r"label column 'kind' of task 'buy' has type string; positive '>0' compares "
                                        r"numbers \(for values that count as 1, give a list"):
        LabelColumn("buy", "kind", ">0").values(pa.array(["a", "b"]))


def test_threshold_positive_through_the_schema_and_persisted(tmp_path):
    rng = np.random.default_rng(0)
    views = rng.poisson(1.0, 400)
    write(tmp_path, x=rng.normal(size=400), views=pa.array(views, mask=np.arange(400) % 10 == 0))
    cfg = config(tmp_path, [{"name": "viewed", "label": "views", "positive": ">0"}])
    schema = fitted(cfg)
    arrays = schema.transform(pq.read_table(tmp_path / "train.parquet"))
    np.testing.assert_array_equal(arrays.labels[:, 0], (views > 0) & (np.arange(400) % 10 != 0))
    np.testing.assert_array_equal(arrays.mask[:, 0], np.arange(400) % 10 != 0)
    assert schema.label_summary["viewed"]["positives"] == int(((views > 0) & (np.arange(400) % 10 != 0)).sum())
    schema.save(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "schema.json").read_text())["labels"][0]["positive"] == ">0"
    assert FittedSchema.load(tmp_path / "run").labels[0].positive == ">0"
    with pytest.raises(DataError, match="positive applies to heads with one value per row"):
        fitted(config(tmp_path, [{"name": "viewed", "label": "views", "head": "multiclass", "positive": ">0"}]))


def test_leak_check_refuses_a_copy_of_the_thresholded_count(tmp_path):
    rng = np.random.default_rng(1)
    views = rng.poisson(2.0, 500) * 7 + rng.integers(0, 7, 500)  # many distinct values
    write(tmp_path, x=rng.normal(size=500), views=views, views_copy=views.astype(float),
          noisy=views + rng.normal(0, 20, 500))
    task = [{"name": "viewed", "label": "views", "positive": ">13"}]
    with pytest.raises(DataError, match="feature 'views_copy' (determines|alone separates) the label of task 'viewed'"):
        fitted(config(tmp_path, task, [{"name": "x", "kind": "dense"}, {"name": "views_copy", "kind": "dense"}]))
    fitted(config(tmp_path, task, [{"name": "x", "kind": "dense"}, {"name": "noisy", "kind": "dense"}]))


# ---- the label summary and its checks ---------------------------------------------------------------------
def test_moments_merge_batches_like_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(1e6, 3.0, 10_000)  # a large mean: the pairwise update stays exact
    m = Moments()
    for part in np.array_split(x, 37):
        m.add(part)
    m.add(np.array([]))
    assert m.count == len(x) and m.mean == pytest.approx(x.mean(), rel=1e-12)
    assert m.std == pytest.approx(x.std(), rel=1e-9)
    assert (m.min, m.max) == (x.min(), x.max())


@pytest.fixture
def labelled(tmp_path):
    rng = np.random.default_rng(3)
    n = 600
    write(tmp_path, x=rng.normal(size=n), click=pa.array(rng.random(n) < 0.3, mask=np.arange(n) % 5 == 0).cast(pa.int64()),
          rating=rng.integers(1, 6, n), genre=np.array(["drama", "news", "sport"])[rng.integers(0, 3, n)].tolist(),
          a=rng.integers(0, 2, n), b=pa.array(rng.integers(0, 2, n).astype(float), mask=np.arange(n) % 4 == 0))
    return tmp_path


TASKS = [{"name": "click"}, {"name": "rating", "head": "regression"},
         {"name": "stars", "label": "rating", "head": "multiclass"}, {"name": "ab", "label": ["a", "b"], "head": "multilabel"},
         {"name": "genre", "head": "multiclass"}]


def test_fit_pass_label_summary_per_head_kind(labelled):
    schema = fitted(config(labelled, TASKS))
    t = pq.read_table(labelled / "train.parquet").to_pandas()
    s = schema.label_summary
    click = t["click"].dropna()
    assert s["click"] == {"rows": 600, "labelled": len(click), "positives": int(click.sum()),
                          "positive_rate": pytest.approx(click.mean())}
    assert s["rating"]["labelled"] == 600 and s["rating"]["mean"] == pytest.approx(t["rating"].mean())
    assert s["rating"]["std"] == pytest.approx(t["rating"].std(ddof=0)) and (s["rating"]["min"], s["rating"]["max"]) == (1, 5)
    assert s["stars"]["classes"] == {str(k): int((t["rating"] == k).sum()) for k in range(1, 6)}
    assert s["genre"]["classes"] == {g: int((t["genre"] == g).sum()) for g in ("drama", "news", "sport")}
    assert s["ab"]["labelled"] == 600
    assert s["ab"]["attributes"]["b"] == {"labelled": 450, "positives": int(t["b"].sum()),
                                          "positive_rate": pytest.approx(t["b"].mean())}
    text = format_summary({k: {"train": v} for k, v in s.items()}, {t["name"]: t.get("head", "binary") for t in TASKS})
    assert "click (binary)" in text and f"{len(click):,} of 600" in text and "% positive" in text
    assert "mean 3" in text and "± 1.4" in text and "drama: 3" in text and "1: 2" in text


def test_validation_and_test_summaries_and_checks(labelled):
    rng = np.random.default_rng(4)
    write(labelled, "valid", x=rng.normal(size=100), click=rng.integers(0, 2, 100), rating=rng.integers(1, 6, 100))
    cfg = config(labelled, [{"name": "click"}, {"name": "stars", "label": "rating", "head": "multiclass"}])
    schema = fitted(cfg)
    valid = ParquetSource(str(labelled / "valid.parquet"), cfg.columns())
    out = run_summary(schema.labels, schema.label_summary, {"validation": valid, "test": valid}, 32)
    assert list(out["click"]) == ["train", "validation", "test"]
    assert out["stars"]["test"]["labelled"] == 100 and sum(out["stars"]["test"]["classes"].values()) == 100

    def check(split, **columns):
        write(labelled, "other", x=np.zeros(len(next(iter(columns.values())))), **columns)
        src = ParquetSource(str(labelled / "other.parquet"), list(columns))
        run_summary(schema.labels, schema.label_summary, {split: src}, 32)

    with pytest.raises(DataError, match=r"task 'click' has no positive labels in the validation data "
                                        r"\(0 of 4,213 labelled rows are 1\)"):
        check("validation", click=np.zeros(4213, np.int64), rating=np.ones(4213, np.int64) + np.arange(4213) % 2)
    with pytest.raises(DataError, match=r"task 'click' has only positive labels in the validation data \(3 of 3"):
        check("validation", click=np.ones(3, np.int64), rating=np.array([1, 2, 3]))
    with pytest.raises(DataError, match=r"task 'stars' has one class \('2'\) in the validation data \(all 3 labelled"):
        check("validation", click=np.array([0, 1, 0]), rating=np.array([2, 2, 2]))
    with pytest.raises(DataError, match=r"task 'click' has no labelled rows in the validation data: column 'click' is "
                                        r"null on all 2 rows"):
        check("validation", click=pa.array([None, None], pa.int64()), rating=np.array([1, 2]))
    with pytest.raises(DataError, match=r"class 7 was not in the training data \(classes: 1, 2, 3, 4, 5\)"):
        check("test", click=np.array([0, 1]), rating=np.array([1, 7]))  # in test data too: before training
    check("test", click=np.zeros(3, np.int64), rating=np.array([2, 2, 2]))  # test labels are summarised only


def test_training_labels_with_one_class_or_none_stop_the_fit(labelled):
    rng = np.random.default_rng(5)
    n = 200
    write(labelled, x=rng.normal(size=n), never=np.zeros(n, np.int64), rating=np.full(n, 3), one=np.full(n, 2),
          a=rng.integers(0, 2, n), b=np.ones(n, np.int64), kind=["view"] * n)
    cases = [({"name": "never"}, r"task 'never' has no positive labels in the training data \(0 of 200 labelled rows"),
             ({"name": "bought", "label": "kind", "positive": ["buy"]},
              r"task 'bought' has no positive labels .*check label column 'kind' and positive: \['buy'\]"),
             ({"name": "rating", "head": "regression"},
              r"task 'rating' has one label value \(3\) on all 200 labelled rows in the training data: nothing to learn"),
             ({"name": "one", "head": "multiclass"}, r"task 'one' has one class \('2'\) in the training data"),
             ({"name": "ab", "label": ["a", "b"], "head": "multilabel"},
              r"attribute 'b' of task 'ab' has only positive labels in the training data \(200 of 200")]
    for task, message in cases:
        with pytest.raises(DataError, match=message):
            fitted(config(labelled, [task]))


def test_train_prints_the_summary_keeps_it_in_run_json_and_stops_on_bad_validation(cli, labelled):
    rng = np.random.default_rng(6)
    write(labelled, "valid", x=rng.normal(size=50), click=np.zeros(50, np.int64), rating=rng.integers(1, 6, 50))
    cfg = labelled / "c.yaml"
    raw = {"data": {"train": "train.parquet", "validation": "valid.parquet", "read_rows": 64},
           "features": [{"name": "x", "kind": "dense"}], "tasks": [{"name": "click"}, {"name": "rating", "head": "regression"}],
           "tower": {"name": "shared_bottom", "bottom_units": [8], "task_units": [4]},
           "train": {"epochs": 1, "batch_size": 64, "progress": False}}
    cfg.write_text(yaml.safe_dump(raw))
    r = cli("train", cfg, "--out", labelled / "run")
    assert r.code == 2 and "task 'click' has no positive labels in the validation data (0 of 50 labelled rows are 1)" in r.err
    assert "Traceback" not in r.err and not (labelled / "run").exists()
    write(labelled, "valid", x=rng.normal(size=50), click=rng.integers(0, 2, 50), rating=rng.integers(1, 6, 50))
    r = cli("train", cfg, "--out", labelled / "run")
    assert r.code == 0, r
    assert "labels (per task and split" in r.err and "click (binary)" in r.err and "rating (regression)" in r.err
    info = json.loads((labelled / "run" / "run.json").read_text())
    assert set(info["labels"]) == {"click", "rating"} and set(info["labels"]["click"]) == {"train", "validation"}
    assert info["labels"]["rating"]["validation"]["labelled"] == 50


# ---- regression targets standardised inside the head -----------------------------------------------------
def test_regression_head_standardises_and_predicts_in_the_label_unit():
    stats = {"count": 10, "mean": 3.0, "std": 2.0, "min": 1.0, "max": 5.0}
    head = RegressionHead(4, TaskInfo("rating", "rating", "regression", target=stats))
    output = torch.tensor([0.0, 1.0, -1.0])  # standardised predictions: 3, 5 and 1 stars
    label = torch.tensor([3.0, 4.0, 1.0])
    assert torch.allclose(head.predict(output), torch.tensor([3.0, 5.0, 1.0]))
    assert head.loss(output, label, torch.ones(3)).item() == pytest.approx((0 + 0.25 + 0) / 3)
    assert head.metrics(label.numpy(), head.predict(output).numpy())["rmse"] == pytest.approx(math.sqrt(1 / 3))
    plain = RegressionHead(4, TaskInfo("rating", "rating", "regression", target=stats), standardize=False)
    assert torch.equal(plain.predict(output), output)
    assert plain.loss(output, label, torch.ones(3)).item() == pytest.approx((9 + 9 + 4) / 3)
    # no fitted statistics (contract checks, runs trained before they were fitted): mean 0, std 1, as before
    old = RegressionHead(4, TaskInfo("rating", "rating", "regression"))
    assert torch.equal(old.predict(output), output) and old.loss(output, label, torch.ones(3)) == plain.loss(output, label, torch.ones(3))
    constant = RegressionHead(4, TaskInfo("r", "r", "regression", target={"mean": 2.0, "std": 0.0}))
    assert constant.target_std == 1.0


def test_regression_log1p_standardises_the_log_target():
    rng = np.random.default_rng(7)
    seconds = np.expm1(rng.normal(3.0, 1.0, 1000))
    logs = RegressionHead.target_values(seconds, log1p=True, standardize=True)
    np.testing.assert_allclose(logs, np.log1p(np.maximum(seconds, 0)))  # negatives clamped, as in the loss
    assert RegressionHead.target_values(seconds) is seconds
    stats = {"mean": float(logs.mean()), "std": float(logs.std())}
    head = RegressionHead(4, TaskInfo("watch", "watch", "regression", target=stats), log1p=True)
    z = torch.tensor([0.0, 1.0])
    want = np.expm1(np.array([0.0, 1.0]) * stats["std"] + stats["mean"])
    np.testing.assert_allclose(head.predict(z).numpy(), want, rtol=1e-5)
    label = torch.from_numpy(want.astype(np.float32))
    assert head.loss(z, label, torch.ones(2)).item() == pytest.approx(0.0, abs=1e-8)


def test_fit_pass_gives_the_head_its_target_statistics(labelled):
    rng = np.random.default_rng(8)
    watch = np.expm1(rng.normal(2.0, 0.5, 600))
    write(labelled, x=rng.normal(size=600), rating=pa.array(rng.integers(1, 6, 600), mask=np.arange(600) % 3 == 0),
          watch=watch)
    cfg = config(labelled, [{"name": "rating", "head": "regression"},
                            {"name": "watch", "head": "regression", "params": {"log1p": True}}])
    schema = fitted(cfg)
    rating = pq.read_table(labelled / "train.parquet")["rating"].drop_null().to_numpy()
    assert schema.labels[0].target == pytest.approx({"count": 400, "mean": rating.mean(), "std": rating.std(),
                                                     "min": 1.0, "max": 5.0})
    assert schema.labels[1].target["mean"] == pytest.approx(np.log1p(watch).mean())
    assert schema.label_summary["watch"]["mean"] == pytest.approx(watch.mean())  # the summary: the label's unit
    schema.save(labelled / "run")
    model = MultiTaskModel(cfg, FittedSchema.load(labelled / "run"), REGISTRY)
    assert model.heads["rating"].target_mean == pytest.approx(rating.mean())
    assert model.heads["watch"].target_std == pytest.approx(np.log1p(watch).std())


# ---- multiclass classes keep their values ------------------------------------------------------------------
def test_int_classes_are_the_distinct_values_mapped_to_ids(labelled):
    schema = fitted(config(labelled, [{"name": "stars", "label": "rating", "head": "multiclass"}]))
    lab = schema.labels[0]
    assert lab.classes == [1, 2, 3, 4, 5]
    y, mask = lab.class_ids(pa.array([5, 1, None, 3], pa.int64()))
    assert y.tolist() == [4, 0, 0, 2] and mask.tolist() == [True, True, False, True]
    with pytest.raises(DataError, match=r"class 0 was not in the training data \(classes: 1, 2, 3, 4, 5"):
        lab.class_ids(pa.array([0, 1]))
    assert MultiTaskModel(config(labelled, [{"name": "stars", "label": "rating", "head": "multiclass"}]),
                          schema, REGISTRY).heads["stars"].num_classes == 5


def test_num_classes_semantics(labelled):
    def classes(num_classes):
        return fitted(config(labelled, [{"name": "stars", "label": "rating", "head": "multiclass",
                                         "params": {"num_classes": num_classes}}])).labels[0].classes
    assert classes(6) == [0, 1, 2, 3, 4, 5]  # ints within 0..K-1: class ids, class 0 absent from the data
    assert classes(5) == [1, 2, 3, 4, 5]  # 5 distinct values that are not ids 0..4: the values
    with pytest.raises(DataError, match=r"params.num_classes is 4 but label column 'rating' has 5 distinct values in "
                                        r"the training data \(1, 2, 3, 4, 5\) and are not class ids 0..3"):
        classes(4)
    with pytest.raises(DataError, match=r"num_classes is 4 but label column 'genre' has 3 distinct values"):
        fitted(config(labelled, [{"name": "genre", "head": "multiclass", "params": {"num_classes": 4}}]))


def test_old_run_directories_keep_their_classes_and_unstandardised_heads(labelled):
    """schema.json from before: int classes 0..K-1 (a phantom class 0 for labels 1..5) and no target statistics."""
    cfg = config(labelled, [{"name": "stars", "label": "rating", "head": "multiclass"}, {"name": "rating", "head": "regression"}])
    schema = fitted(cfg)
    schema.save(labelled / "run")
    meta = json.loads((labelled / "run" / "schema.json").read_text())
    meta["labels"][0]["classes"] = list(range(6))
    del meta["labels"][1]["target"]
    (labelled / "run" / "schema.json").write_text(json.dumps(meta))
    old = FittedSchema.load(labelled / "run")
    assert old.labels[0].classes == [0, 1, 2, 3, 4, 5] and old.labels[1].target is None
    y, _ = old.labels[0].class_ids(pa.array([1, 5, 0]))
    assert y.tolist() == [1, 5, 0]  # ids are the values, as they were
    model = MultiTaskModel(cfg, old, REGISTRY)
    assert model.heads["stars"].num_classes == 6
    assert (model.heads["rating"].target_mean, model.heads["rating"].target_std) == (0.0, 1.0)


# ---- end to end: train, export, score -------------------------------------------------------------------
def ratings_data(path, seed=0):
    """Ratings 1..5, a view count and watch seconds driven by two features."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", 4000), ("valid", 800), ("test", 800)):
        x, c = rng.normal(size=n), rng.integers(0, 8, n)
        effect = 1.2 * x + 0.4 * (c % 4) - 0.6
        rating = np.clip(np.round(3 + effect + rng.normal(0, 0.5, n)), 1, 5).astype(np.int64)
        views = rng.poisson(np.exp(0.6 * effect))
        watch = np.expm1(4.0 + 0.8 * effect + rng.normal(0, 0.3, n))  # seconds: ~50, up to thousands
        pq.write_table(pa.table({"x": x, "c": c, "rating": pa.array(rating, mask=rng.random(n) < 0.05),
                                 "views": views, "watch": watch}), path / f"{split}.parquet")


def test_labels_end_to_end_train_export_score(cli, tmp_path):
    ratings_data(tmp_path)
    cfg = {"seed": 0, "data": {"train": "train.parquet", "validation": "valid.parquet", "test": "test.parquet",
                               "read_rows": 1024, "shuffle_buffer": 4096},
           "features": [{"name": "x", "kind": "dense"}, {"name": "c", "kind": "categorical"}],
           "tasks": [{"name": "stars", "label": "rating", "head": "multiclass"},
                     {"name": "rating", "head": "regression"},
                     {"name": "liked", "label": "rating", "positive": ">=4"},
                     {"name": "viewed", "label": "views", "positive": ">0"},
                     {"name": "watch", "head": "regression", "params": {"log1p": True}}],
           "encoders": {"categorical": {"name": "embedding", "dim": 4}},
           "tower": {"name": "shared_bottom", "bottom_units": [32], "task_units": [16]},
           "optimizer": {"lr": 0.01}, "train": {"batch_size": 256, "epochs": 4, "progress": False, "threads": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    r = cli("train", tmp_path / "c.yaml", "--out", run)
    assert r.code == 0, r
    assert "stars (multiclass)" in r.err and "1: " in r.err and "liked (binary)" in r.err and "mean " in r.err
    info = json.loads((run / "run.json").read_text())["labels"]
    assert list(info["stars"]["train"]["classes"]) == ["1", "2", "3", "4", "5"]
    assert set(info["viewed"]) == {"train", "validation", "test"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["monitor"] == "loss"
    first = metrics["history"][0]["train_loss"]
    # standardised targets: a 1-5 rating and seconds cost about as much as the 0/1 tasks, not 1.2 and ~10^4
    assert first["rating"] < 1.5 and first["watch"] < 1.5, first
    val = metrics["validation"]
    assert val["liked"]["auc"] > 0.9 and val["viewed"]["auc"] > 0.7, val
    assert val["stars"]["accuracy"] > 0.45 and val["rating"]["rmse"] < 0.9 and val["rating"]["mae"] < 0.75, val
    # export: parity holds with the standardisation and the int classes in the graph and the metadata
    r = cli("export", run, "-o", tmp_path / "m.onnx")
    assert r.code == 0 and "watch=" in r.out, r
    meta = json.loads(__import__("onnx").load(str(tmp_path / "m.onnx")).metadata_props[0].value)
    tasks = {t["name"]: t for t in meta["tasks"]}
    assert tasks["stars"]["classes"] == [1, 2, 3, 4, 5] and tasks["stars"]["width"] == 5
    assert cli("score", tmp_path / "m.onnx", tmp_path / "test.parquet", "-o", tmp_path / "s.parquet",
               "--no-progress").code == 0
    assert cli("evaluate", run, tmp_path / "test.parquet", "--save-predictions", tmp_path / "p.parquet").code == 0
    onnx_scores, torch_scores = pq.read_table(tmp_path / "s.parquet"), pq.read_table(tmp_path / "p.parquet")
    test = pq.read_table(tmp_path / "test.parquet")
    probs = np.stack(onnx_scores["stars"].to_pylist())
    np.testing.assert_allclose(probs, np.stack(torch_scores["stars"].to_pylist()), atol=1e-5)
    rating = test["rating"].to_numpy(zero_copy_only=False)
    known = ~np.isnan(rating)
    predicted = np.array(tasks["stars"]["classes"])[probs.argmax(1)]  # classes[k] is the class of score k
    assert np.mean(predicted[known] == rating[known]) > 0.45
    for task in ("rating", "watch"):
        np.testing.assert_allclose(onnx_scores[task].to_numpy(), torch_scores[task].to_numpy(), rtol=1e-5, atol=1e-4)
    # predictions in the label's unit: stars near the ratings' mean, seconds near the seconds' median
    assert abs(onnx_scores["rating"].to_numpy().mean() - np.nanmean(rating)) < 0.3
    watch = test["watch"].to_numpy()
    assert abs(np.median(onnx_scores["watch"].to_numpy()) / np.median(watch) - 1) < 0.25
