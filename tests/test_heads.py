"""Heads beyond binary: hand-computed losses and metrics (vs scikit-learn), masking, label fitting."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from recmtl import metrics as M
from recmtl.config import parse_config
from recmtl.contracts import TaskInfo
from recmtl.data.parquet import ParquetSource
from recmtl.errors import DataError, PluginError
from recmtl.registry import load_registry
from recmtl.schema import fit_schema
from recmtl.training.model import MultiTaskModel
from recmtl_plugins.heads.multiclass import MulticlassHead
from recmtl_plugins.heads.multilabel import MultilabelHead
from recmtl_plugins.heads.regression import RegressionHead

REGISTRY = load_registry()


def multiclass(k: int = 3, **params) -> MulticlassHead:
    return MulticlassHead(4, TaskInfo("digit", "digit", "multiclass", 1.0, tuple(range(k))), **params)


def multilabel(names=("a", "b", "c")) -> MultilabelHead:
    return MultilabelHead(4, TaskInfo("attrs", tuple(names), "multilabel", 1.0, tuple(names)))


def test_multiclass_loss_by_hand_and_masked_rows():
    head = multiclass()
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, -5.0, 0.0]])
    label = torch.tensor([0.0, 2.0, 1.0])
    lse0, lse1 = math.log(math.exp(2) + 2), math.log(2 + math.e)
    expected = ((lse0 - 2) + (lse1 - 0)) / 2  # -log softmax of the true class, rows 0 and 1
    loss = head.loss(logits, label, torch.tensor([1.0, 1.0, 0.0]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # the masked row's label, whatever it is, changes nothing
    assert head.loss(logits, torch.tensor([0.0, 2.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(expected, rel=1e-6)
    probs = head.predict(logits)
    assert probs.shape == (3, 3) and torch.allclose(probs.sum(1), torch.ones(3))


def test_multiclass_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    score = rng.dirichlet(np.ones(4), 300)
    score[np.arange(300), y] += rng.random(300)  # better than chance, not perfect
    score /= score.sum(1, keepdims=True)
    m = multiclass(4).metrics(y.astype(np.float64), score)
    pred = score.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["logloss"] == pytest.approx(-np.mean(np.log(score[np.arange(300), y])), rel=1e-6)
    # by hand on 4 rows: classes 0,0,1,2 predicted 0,1,1,1 -> accuracy 1/2; F1 per class:
    # 0: P=1, R=1/2 -> 2/3; 1: P=1/3, R=1 -> 1/2; 2: 0
    tiny = np.eye(3)[[0, 1, 1, 1]]
    m = multiclass().metrics(np.array([0.0, 0.0, 1.0, 2.0]), tiny)
    assert m["accuracy"] == 0.5 and m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


def test_multiclass_num_classes_must_match_the_fitted_classes():
    assert multiclass(5, num_classes=5).num_classes == 5
    with pytest.raises(ValueError, match="num_classes 4 but"):
        multiclass(5, num_classes=4)
    with pytest.raises(ValueError, match="at least 2 classes"):
        MulticlassHead(4, TaskInfo("t", "t", "multiclass", 1.0, (0,)))
    assert "int or string class labels" in MulticlassHead.label_problem(np.array([0.0, 1.5]))
    assert MulticlassHead.label_problem(np.array([0.0, 3.0])) is None
    assert MulticlassHead.label_problem(np.array([-1.0, 3.0])) is None  # class values, not ids


def test_multilabel_loss_by_hand_with_per_attribute_mask():
    head = multilabel()
    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.0, 3.0]])
    label = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])

    def bce(x: float, y: float) -> float:
        p = 1 / (1 + math.exp(-x))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))
    expected = (bce(0, 1) + bce(2, 0) + bce(0, 1) + bce(3, 0)) / 4  # the four labelled entries
    assert head.loss(logits, label, mask).item() == pytest.approx(expected, rel=1e-6)
    flipped = torch.where(mask.bool(), label, 1 - label)
    assert head.loss(logits, flipped, mask).item() == pytest.approx(expected, rel=1e-6)
    assert head.predict(logits).shape == (2, 3)


def test_multilabel_metrics_equal_sklearn_and_skip_missing_attributes():
    rng = np.random.default_rng(1)
    y = (rng.random((400, 3)) < [0.3, 0.5, 0.7]).astype(np.float64)
    score = np.clip(0.35 * y + 0.65 * rng.random((400, 3)), 0, 1)
    head = multilabel(("even", "big", "loop"))
    m = head.metrics(y, score)
    for k, name in enumerate(("even", "big", "loop")):
        assert m[f"auc_{name}"] == pytest.approx(roc_auc_score(y[:, k], score[:, k]))
    assert m["auc"] == pytest.approx(np.mean([roc_auc_score(y[:, k], score[:, k]) for k in range(3)]))
    assert m["micro_f1"] == pytest.approx(f1_score(y, score >= 0.5, average="micro"))
    assert m["macro_f1"] == pytest.approx(f1_score(y, score >= 0.5, average="macro"))
    # a missing attribute value (NaN) is left out of that attribute's metrics only
    holey = y.copy()
    holey[:100, 0] = np.nan
    m = head.metrics(holey, score)
    assert m["auc_even"] == pytest.approx(roc_auc_score(y[100:, 0], score[100:, 0]))
    assert m["auc_big"] == pytest.approx(roc_auc_score(y[:, 1], score[:, 1]))
    known = ~np.isnan(holey)
    assert m["micro_f1"] == pytest.approx(f1_score(holey[known], (score >= 0.5)[known]))
    # calibration: pooled over the labelled values, and per attribute (issue 19)
    assert m["calibration_ratio"] == pytest.approx(score[known].sum() / holey[known].sum())
    assert m["ece_big"] == pytest.approx(M.ece(y[:, 1], score[:, 1]))
    assert m["calibration_ratio_even"] == pytest.approx(score[100:, 0].sum() / y[100:, 0].sum())
    assert set(m) <= set(head.metric_names())


def test_regression_log1p_trains_on_log_target_and_predicts_in_original_units():
    head = RegressionHead(4, TaskInfo("watch", "watch", "regression"), log1p=True)
    output = torch.tensor([math.log(11.0), 0.0])  # predicts 10 and 0 seconds
    label = torch.tensor([10.0, math.e - 1])
    assert head.loss(output, label, torch.ones(2)).item() == pytest.approx((0 + 1) / 2, rel=1e-6)
    assert head.loss(output, label, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(head.predict(output), torch.tensor([10.0, 0.0]))


# ---- labels through the schema ----------------------------------------------------------------------
def config(tmp_path, tasks, features=None):
    raw = {"data": {"train": str(tmp_path / "train.parquet")},
           "features": features or [{"name": "x", "kind": "dense"}, {"name": "c", "kind": "categorical"}],
           "tasks": tasks, "tower": {"name": "shared_bottom", "bottom_units": [8], "task_units": [4]}}
    return parse_config(raw, tmp_path)


@pytest.fixture
def labelled(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    colour = np.array(["red", "green", "blue"], dtype=object)[rng.integers(0, 3, n)]
    colour[::50] = None
    tags = [[int(a), int(b)] for a, b in rng.integers(0, 2, (n, 2))]
    tags[3] = None
    pq.write_table(pa.table({
        "x": rng.normal(size=n), "c": rng.integers(0, 5, n), "colour": pa.array(colour.tolist()),
        "digit": rng.integers(0, 4, n), "a": pa.array(rng.integers(0, 2, n).astype(float), mask=rng.random(n) < 0.1),
        "b": rng.integers(0, 2, n), "tags": pa.array(tags, pa.list_(pa.int8())),
    }), tmp_path / "train.parquet")
    return tmp_path


def fitted(cfg):
    heads = {t.name: REGISTRY.get("head", t.head) for t in cfg.tasks}
    return fit_schema(cfg, ParquetSource(cfg.resolve(cfg.data.train), cfg.columns()), heads)


def test_string_classes_get_a_fitted_vocabulary_and_unknown_ones_fail(labelled):
    cfg = config(labelled, [{"name": "colour", "head": "multiclass"}, {"name": "digit", "head": "multiclass",
                                                                        "params": {"num_classes": 6}}])
    schema = fitted(cfg)
    assert schema.labels[0].classes == ["blue", "green", "red"]
    assert schema.labels[1].classes == list(range(6))  # ints: 0..max, widened by num_classes
    t = pq.read_table(labelled / "train.parquet")
    arrays = schema.transform(t)
    assert arrays.labels.shape == (400, 2)
    expect = [{"blue": 0, "green": 1, "red": 2}[v] if v else 0 for v in t["colour"].to_pylist()]
    np.testing.assert_array_equal(arrays.labels[:, 0], expect)
    assert (~arrays.mask[::50, 0]).all() and arrays.mask[1:50, 0].all()
    model = MultiTaskModel(cfg, schema, REGISTRY)
    assert model.heads["colour"].num_classes == 3 and model.heads["digit"].num_classes == 6
    bad = t.set_column(t.schema.get_field_index("colour"), "colour", pa.array(["purple"] * 400))
    with pytest.raises(DataError, match="class 'purple' was not in the training data"):
        schema.transform(bad)


def test_multilabel_from_label_columns_or_a_list_column(labelled):
    cfg = config(labelled, [{"name": "ab", "label": ["a", "b"], "head": "multilabel"},
                            {"name": "tags", "head": "multilabel"}, {"name": "digit", "head": "regression"}])
    schema = fitted(cfg)
    assert [lab.classes for lab in schema.labels[:2]] == [["a", "b"], ["tags_0", "tags_1"]]
    assert schema.label_slices() == {"ab": (0, 2, False), "tags": (2, 2, False), "digit": (4, 1, True)}
    t = pq.read_table(labelled / "train.parquet")
    arrays = schema.transform(t)
    np.testing.assert_array_equal(arrays.mask[:, 0], t["a"].is_valid().to_numpy(zero_copy_only=False))
    assert arrays.mask[:, 1].all()  # b has no nulls: a missing 'a' leaves 'b' labelled
    assert not arrays.mask[3, 2:4].any() and arrays.mask[4, 2:4].all()  # a null list: both unlabelled
    np.testing.assert_array_equal(arrays.labels[4, 2:4], t["tags"][4].as_py())
    model = MultiTaskModel(cfg, schema, REGISTRY)
    labels, mask = torch.from_numpy(arrays.labels), torch.from_numpy(arrays.mask.astype(np.float32))
    lab, _ = model.task_label(labels, mask, "tags")
    assert lab.shape == (400, 2) and torch.equal(lab, labels[:, 2:4])
    lab, _ = model.task_label(labels, mask, "digit")
    assert lab.shape == (400,)


def test_multilabel_label_checks(labelled):
    with pytest.raises(DataError, match="multilabel head .*0/1"):
        fitted(config(labelled, [{"name": "ad", "label": ["a", "digit"], "head": "multilabel"}]))
    with pytest.raises(DataError, match="takes one label column"):
        fitted(config(labelled, [{"name": "ab", "label": ["a", "b"], "head": "binary"}]))


def test_dry_run_names_a_head_with_the_wrong_number_of_class_scores(labelled):
    class Narrow(MulticlassHead):
        def predict(self, output):
            return torch.softmax(output, -1)[:, :2]

    cfg = config(labelled, [{"name": "colour", "head": "multiclass"}])
    schema = fitted(cfg)
    registry = load_registry()
    registry.tables["head"]["multiclass"] = dataclasses.replace(registry.entry("head", "multiclass"), factory=Narrow)
    with pytest.raises(PluginError, match=r"predict returned shape \(2, 2\), expected \(batch, 3\) for its 3 classes"):
        MultiTaskModel(cfg, schema, registry)


@pytest.mark.slow
def test_regression_log1p_and_multiclass_export_and_score(cli, tmp_path):
    """Watch time (log1p regression) and a string multiclass task: export parity, scores equal PyTorch's."""
    rng = np.random.default_rng(3)
    for split, n in (("train", 3000), ("valid", 500)):
        x = rng.normal(size=n)
        c = rng.integers(0, 6, n)
        watch = np.expm1(1.5 + 0.8 * x + 0.3 * (c % 3) + rng.normal(0, 0.2, n))
        genre = np.array(["drama", "news", "sport"], dtype=object)[(c + (x > 0)) % 3]
        pq.write_table(pa.table({"x": x, "c": c, "watch_time": pa.array(watch, mask=rng.random(n) < 0.1),
                                 "genre": genre.tolist()}), tmp_path / f"{split}.parquet")
    cfg = {"data": {"train": str(tmp_path / "train.parquet"), "validation": str(tmp_path / "valid.parquet")},
           "features": [{"name": "x", "kind": "dense"}, {"name": "c", "kind": "categorical"}],
           "tasks": [{"name": "watch", "label": "watch_time", "head": "regression", "params": {"log1p": True}},
                     {"name": "genre", "head": "multiclass"}],
           "encoders": {"categorical": {"name": "embedding", "dim": 4}},
           "tower": {"name": "shared_bottom", "bottom_units": [16], "task_units": [8]},
           "optimizer": {"lr": 0.01}, "train": {"batch_size": 256, "epochs": 3, "progress": False, "threads": 1}}
    (tmp_path / "c.yaml").write_text(__import__("yaml").safe_dump(cfg))
    assert cli("train", tmp_path / "c.yaml", "--out", tmp_path / "run").code == 0
    r = cli("export", tmp_path / "run", "-o", tmp_path / "m.onnx")
    assert r.code == 0 and "watch=" in r.out and "genre=" in r.out, r
    assert cli("evaluate", tmp_path / "run", tmp_path / "valid.parquet", "--save-predictions", tmp_path / "p.parquet").code == 0
    assert cli("score", tmp_path / "m.onnx", tmp_path / "valid.parquet", "-o", tmp_path / "s.parquet", "--no-progress").code == 0
    torch_scores, onnx_scores = pq.read_table(tmp_path / "p.parquet"), pq.read_table(tmp_path / "s.parquet")
    np.testing.assert_allclose(onnx_scores["watch"].to_numpy(), torch_scores["watch"].to_numpy(), rtol=1e-5, atol=1e-5)
    # expm1 of the head's output: seconds (median label ~5), not log-seconds (~1.8)
    labels = pq.read_table(tmp_path / "valid.parquet")["watch_time"].drop_null().to_numpy()
    assert abs(np.median(onnx_scores["watch"].to_numpy()) / np.median(labels) - 1) < 0.25
    np.testing.assert_allclose(np.stack(onnx_scores["genre"].to_pylist()), np.stack(torch_scores["genre"].to_pylist()), atol=1e-5)
    meta = json.loads(__import__("onnx").load(str(tmp_path / "m.onnx")).metadata_props[0].value)
    assert [t.get("classes") for t in meta["tasks"]] == [None, ["drama", "news", "sport"]]


def test_esmm_loss_matches_bce_and_lets_a_diverged_output_through():
    """ESMM's loss is binary cross-entropy on pCTCVR; a NaN output (a diverged run) gives a NaN loss, which the loop
    turns into its 'training loss became nan' error, instead of torch's 'between 0 and 1' RuntimeError."""
    import torch.nn.functional as F

    from recmtl_plugins.heads.esmm import ESMMHead
    head = ESMMHead(4, TaskInfo("conversion", "conversion", "esmm"), ctr_task="click")
    output = torch.tensor([0.1, 0.9, 0.5, 1e-9])
    label = torch.tensor([0.0, 1.0, 1.0, 0.0])
    mask = torch.ones(4, dtype=torch.bool)
    torch.testing.assert_close(head.loss(output, label, mask),
                               F.binary_cross_entropy(output.clamp(1e-7, 1 - 1e-7), label))
    assert torch.isnan(head.loss(torch.tensor([float("nan"), 0.5, 0.5, 0.5]), label, mask))
