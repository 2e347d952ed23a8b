"""Per-task model selection: each task's best epoch kept and used by evaluate/export; NaN monitors; extending an
early-stopped run with --resume."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import write_config

from recmtl.rundir import epoch_checkpoint
from recmtl.training.early_stopping import TaskMonitors
from recmtl.training.evaluate import load_run


class _Heads:
    """A stand-in for MultiTaskModel: what TaskMonitors reads (task names and heads' metric names)."""

    def __init__(self, **metric_names):
        from recmtl_plugins.heads.binary import BinaryHead
        from recmtl_plugins.heads.regression import RegressionHead
        self.task_names = list(metric_names)
        from recmtl.contracts import TaskInfo
        self.heads = {t: (BinaryHead if kind == "binary" else RegressionHead)(4, TaskInfo(t, t, kind))
                      for t, kind in metric_names.items()}


def test_each_task_keeps_its_own_best_epoch():
    model = _Heads(click="binary", rating="regression")
    mon = TaskMonitors("auto", model)
    assert mon.metric == {"click": "auc", "rating": "loss"}
    epochs = [{"click": {"auc": 0.70, "loss": 0.5}, "rating": {"rmse": 1.2, "loss": 1.5}},
              {"click": {"auc": 0.74, "loss": 0.4}, "rating": {"rmse": 1.1, "loss": 1.3}},  # click peaks
              {"click": {"auc": 0.73, "loss": 0.4}, "rating": {"rmse": 1.0, "loss": 1.1}},
              {"click": {"auc": 0.72, "loss": 0.5}, "rating": {"rmse": 0.9, "loss": 1.0}}]  # rating peaks
    moved = [mon.update(m, e) for e, m in enumerate(epochs)]
    assert moved == [["click", "rating"], ["click", "rating"], ["rating"], ["rating"]]
    assert mon.best_epoch("click") == 1 and mon.best_epoch("rating") == 3
    assert mon.summary()["click"] == {"epoch": 2, "monitor": "auc", "value": 0.74}
    # a mapping picks the metric per task; the state survives a round trip (what --resume does)
    mapped = TaskMonitors({"rating": "rmse"}, model)
    assert mapped.metric == {"click": "auc", "rating": "rmse"} and not mapped.higher["rating"]
    for e, m in enumerate(epochs[:2]):
        mapped.update(m, e)
    again = TaskMonitors({"rating": "rmse"}, model)
    again.load_state_dict(mapped.state_dict())
    assert again.update(epochs[2], 2) == ["rating"] and again.best_epoch("click") == 1


def test_a_metric_nan_on_every_epoch_falls_back_to_the_loss():
    mon = TaskMonitors("auto", _Heads(click="binary"))
    for e, loss in enumerate([0.6, 0.5, 0.55]):
        mon.update({"click": {"auc": math.nan, "loss": loss}}, e)
    assert mon.best_epoch("click") == 1 and mon.selected_by("click") == "loss"
    mon.update({"click": {"auc": 0.6, "loss": 0.7}}, 3)  # once it is defined, the metric selects
    assert mon.best_epoch("click") == 3 and mon.selected_by("click") == "auc"


def test_unknown_task_or_metric_in_a_mapping_is_a_config_error():
    from recmtl.errors import ConfigError
    with pytest.raises(ConfigError, match="'ctr', which are not tasks|\\['ctr'\\]"):
        TaskMonitors({"ctr": "auc"}, _Heads(click="binary"))
    with pytest.raises(ConfigError, match="task 'click': its head reports"):
        TaskMonitors({"click": "rmse"}, _Heads(click="binary"))


@pytest.mark.slow
def test_evaluate_and_export_score_each_task_with_its_own_epoch(cli, funnel_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir)
    run = tmp_path / "run"
    assert cli("train", cfg, "--out", run, "--set", "train.epochs=2").code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    best = metrics["task_best"]
    assert set(best) == {"click", "conversion"} and all(b["monitor"] == "auc" for b in best.values())
    kept = sorted(p.name for p in (run / "best_epochs").glob("*.pt"))
    assert kept == sorted({epoch_checkpoint(b["epoch"]).split("/")[1] for b in best.values()})  # no stale epochs
    # Give 'conversion' a different epoch: a perturbed copy of the click epoch's weights as epoch 9.
    click_epoch = best["click"]["epoch"]
    state = torch.load(run / epoch_checkpoint(click_epoch), weights_only=False)
    g = torch.Generator().manual_seed(0)
    state["model"] = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    torch.save(state, run / epoch_checkpoint(9))
    best["conversion"]["epoch"] = 9
    (run / "metrics.json").write_text(json.dumps(metrics))

    loaded = load_run(run)
    assert loaded.epochs == {"click": click_epoch, "conversion": 9}
    assert type(loaded.model).__name__ == "PerTaskModel" and len(loaded.model.models) == 2
    one = load_run(run, checkpoint=epoch_checkpoint(click_epoch))
    other = load_run(run, checkpoint=epoch_checkpoint(9))
    arrays = loaded.schema.transform(pq.read_table(funnel_dir / "test.parquet").slice(0, 500), labels=False)
    inputs = {k: torch.from_numpy(v) for k, v in arrays.inputs.items()}
    with torch.no_grad():
        got, a, b = loaded.model.predict(inputs), one.model.predict(inputs), other.model.predict(inputs)
    torch.testing.assert_close(got["click"], a["click"])
    torch.testing.assert_close(got["conversion"], b["conversion"])  # ESMM's CTCVR with its own copy's CTR
    assert not torch.allclose(got["conversion"], a["conversion"])

    r = cli("evaluate", run, funnel_dir / "test.parquet", "--json", "--save-predictions", tmp_path / "p.parquet")
    assert r.code == 0, r
    assert json.loads(r.out)["epochs"] == {"click": click_epoch, "conversion": 9}
    r = cli("export", run, "-o", tmp_path / "m.onnx")
    assert r.code == 0 and "2 copies of the network" in r.out and "--checkpoint best" in r.out, r
    assert cli("score", tmp_path / "m.onnx", funnel_dir / "test.parquet", "-o", tmp_path / "s.parquet",
               "--no-progress").code == 0
    scored, evaluated = pq.read_table(tmp_path / "s.parquet"), pq.read_table(tmp_path / "p.parquet")
    for t in ("click", "conversion"):
        np.testing.assert_allclose(scored[t].to_numpy(), evaluated[t].to_numpy(), rtol=1e-5, atol=1e-6)
    meta = {p.key: p.value for p in __import__("onnx").load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["recmtl.epochs"]) == {"click": click_epoch, "conversion": 9}
    # one network on request
    r = cli("export", run, "-o", tmp_path / "one.onnx", "--checkpoint", "best")
    assert r.code == 0 and "copies" not in r.out, r
    r = cli("evaluate", run, funnel_dir / "test.parquet", "--json", "--checkpoint", "best")
    assert r.code == 0 and len(set(json.loads(r.out)["epochs"].values())) == 1


@pytest.mark.slow
def test_a_monitor_nan_on_every_epoch_still_selects_and_finishes(cli, tmp_path):
    """GAUC over groups of one row is NaN every epoch: best.pt is chosen by the validation loss (it used to end in
    FileNotFoundError: best.pt)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 3000), ("valid", 800)):
        x = rng.integers(0, 20, n)
        click = (rng.random(n) < 0.2 + 0.03 * (x % 5)).astype(np.int64)
        pq.write_table(pa.table({"x": x, "row_id": np.arange(n), "click": click}), tmp_path / f"{split}.parquet")
    cfg = {"data": {"train": str(tmp_path / "train.parquet"), "validation": str(tmp_path / "valid.parquet")},
           "features": [{"name": "x", "kind": "categorical"}], "tasks": [{"name": "click"}],
           "tower": {"name": "shared_bottom", "bottom_units": [8], "task_units": [4]},
           "evaluation": {"group_column": "row_id"},
           "train": {"batch_size": 256, "epochs": 2, "progress": False,
                     "early_stopping": {"monitor": "click/gauc", "patience": 2}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("train", tmp_path / "c.yaml", "--out", tmp_path / "run")
    assert r.code == 0, r
    assert "is NaN on the validation data; best.pt is chosen by the validation loss" in r.err
    assert (tmp_path / "run" / "best.pt").is_file()
    assert cli("evaluate", tmp_path / "run", tmp_path / "valid.parquet").code == 0


@pytest.mark.slow
def test_resume_with_more_epochs_extends_an_early_stopped_run(cli, funnel_dir, tmp_path):
    # a learning rate so small that nothing improves after the first epoch: early stopping after epoch 2
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, optimizer={"lr": 1e-12},
                       train={"batch_size": 512, "epochs": 4, "progress": False, "early_stopping": {"patience": 1}})
    run = tmp_path / "run"
    assert cli("train", cfg, "--out", run).code == 0
    assert len(json.loads((run / "metrics.json").read_text())["history"]) == 2
    r = cli("train", cfg, "--out", run, "--resume")
    assert r.code == 0 and "nothing to train (raise train.epochs above 4" in r.err, r
    r = cli("train", cfg, "--out", run, "--resume", "--set", "train.epochs=6")
    assert r.code == 0 and "training on" in r.err, r
    assert len(json.loads((run / "metrics.json").read_text())["history"]) == 3  # one more epoch, then patience
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 6
