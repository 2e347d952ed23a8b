"""End to end through the CLI on generated funnel data: init -> train -> evaluate."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import run_subprocess, write_config
from sklearn.metrics import roc_auc_score


def test_init_train_evaluate(cli, funnel_dir, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    r = cli("init", funnel_dir / "train.parquet", "--task", "click", "--task", "conversion", "--head", "conversion=esmm",
            "--validation", funnel_dir / "valid.parquet", "--test", funnel_dir / "test.parquet", "--group-column", "user_id",
            "-o", cfg)
    assert r.code == 0, r
    written = yaml.safe_load(cfg.read_text())
    kinds = {f["name"]: f["kind"] for f in written["features"]}
    assert kinds["user_id"] == "categorical" and kinds["c03"] == "categorical"  # int and string columns
    assert kinds["d01"] == "dense"
    assert "click" not in kinds and "conversion" not in kinds  # labels are never features
    assert [t["head"] for t in written["tasks"]] == ["binary", "esmm"]
    run = tmp_path / "run"
    r = cli("train", cfg, "--out", run, "--set", "train.epochs=2", "--set", "train.progress=false",
            "--set", "train.batch_size=256", "--set", "optimizer.lr=0.003",
            "--set", "tower.expert_units=[32]", "--set", "tower.task_units=[16]")
    assert r.code == 0, r
    for name in ("best.pt", "last.pt", "config.yaml", "schema.json", "metrics.json", "run.json"):
        assert (run / name).is_file(), name
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["history"]) == 2
    assert set(metrics["test"]) == {"click", "conversion"}
    assert metrics["test"]["click"]["auc"] > 0.65
    assert "gauc" in metrics["test"]["click"]
    r = cli("evaluate", run, funnel_dir / "test.parquet", "--json")
    assert r.code == 0, r
    ev = json.loads(r.out)["metrics"]
    assert ev["click"]["auc"] == pytest.approx(metrics["test"]["click"]["auc"], abs=1e-12)
    r = cli("evaluate", run, funnel_dir / "test.parquet", "--reference", funnel_dir / "test.truth.parquet")
    assert r.code == 0 and "reference_auc" in r.out


def test_evaluate_agrees_exactly_with_saved_predictions(cli, funnel_dir, tmp_path):
    run = tmp_path / "run"
    assert cli("train", write_config(tmp_path / "c.yaml", funnel_dir), "--out", run).code == 0
    preds = tmp_path / "pred.parquet"
    r = cli("evaluate", run, funnel_dir / "test.parquet", "--json", "--save-predictions", preds)
    assert r.code == 0, r
    ev = json.loads(r.out)["metrics"]
    table = pq.read_table(preds)
    labels = pq.read_table(funnel_dir / "test.parquet", columns=["click", "conversion"])
    assert table.num_rows == labels.num_rows
    for task in ("click", "conversion"):
        assert roc_auc_score(labels[task].to_numpy(), table[task].to_numpy()) == ev[task]["auc"]


def test_metrics_only_over_labelled_rows(cli, funnel_dir, tmp_path):
    """Conversion known only for clicked rows: null labels are masked out of loss and metrics."""
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid"):
        t = pq.read_table(funnel_dir / f"{split}.parquet")
        click = t["click"].to_numpy()
        conv = pa.array(t["conversion"].to_numpy(), mask=click == 0)
        pq.write_table(t.set_column(t.schema.get_field_index("conversion"), "conversion", conv), data / f"{split}.parquet")
    cfg = write_config(tmp_path / "c.yaml", data, tasks=[{"name": "click"}, {"name": "conversion"}])
    run = tmp_path / "run"
    assert cli("train", cfg, "--out", run).code == 0
    r = cli("evaluate", run, data / "valid.parquet", "--json", "--save-predictions", tmp_path / "p.parquet")
    ev = json.loads(r.out)["metrics"]
    valid = pq.read_table(data / "valid.parquet")
    clicked = valid["click"].to_numpy() == 1
    assert ev["conversion"]["rows"] == int(clicked.sum()) < valid.num_rows
    assert ev["click"]["rows"] == valid.num_rows
    scores = pq.read_table(tmp_path / "p.parquet")["conversion"].to_numpy()
    expected = roc_auc_score(valid["conversion"].to_numpy(zero_copy_only=False)[clicked], scores[clicked])
    assert ev["conversion"]["auc"] == pytest.approx(expected, abs=1e-12)


def test_resume_continues_from_last_checkpoint(cli, funnel_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir)
    run = tmp_path / "run"
    assert cli("train", cfg, "--out", run, "--set", "train.epochs=1").code == 0
    again = cli("train", cfg, "--out", run)
    assert again.code == 2 and "--resume" in again.err
    r = cli("train", cfg, "--out", run, "--resume", "--set", "train.epochs=3")
    assert r.code == 0, r
    assert "resuming" in r.err
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_resume_after_kill(funnel_dir, tmp_path):
    """A real interruption: kill the training process after its first checkpoint, then --resume."""
    from conftest import RECMTL
    cfg = write_config(tmp_path / "c.yaml", funnel_dir)
    raw = yaml.safe_load(cfg.read_text())
    raw["train"]["epochs"] = 50
    raw["train"]["early_stopping"] = {"patience": 0}
    cfg.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    proc = subprocess.Popen([RECMTL, "train", str(cfg), "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (run / "last.pt").exists(), proc.communicate()[1].decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(json.loads((run / "metrics.json").read_text())["history"])
    assert 1 <= done_before < 50
    r = run_subprocess("train", cfg, "--out", run, "--resume", "--set", f"train.epochs={done_before + 1}")
    assert r.returncode == 0, r.stderr[-2000:]
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, done_before + 2))


def test_early_stopping_and_monitor(cli, funnel_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir,
                       train={"batch_size": 512, "epochs": 30, "progress": False,
                              "early_stopping": {"monitor": "click/logloss", "patience": 1}},
                       optimizer={"lr": 0.05})
    run = tmp_path / "run"
    r = cli("train", cfg, "--out", run)
    assert r.code == 0, r
    m = json.loads((run / "metrics.json").read_text())
    assert m["monitor"] == "click/logloss"
    assert len(m["history"]) < 30 and "early stopping" in r.err
    losses = [h["validation"]["click"]["logloss"] for h in m["history"]]
    assert m["best_epoch"] == int(np.argmin(losses)) + 1


def test_hooks_are_called_for_a_user_plugin(cli, funnel_dir, tmp_path):
    log = tmp_path / "events.jsonl"
    plugin = tmp_path / "my_logger.py"
    plugin.write_text(f'''
import json
from recmtl import hookimpl
LOG = {str(log)!r}
def _w(**kv):
    with open(LOG, "a") as f:
        f.write(json.dumps(kv) + "\\n")
@hookimpl
def recmtl_train_start(run):
    _w(event="start", tasks=run.model.task_names)
@hookimpl
def recmtl_epoch_end(run, epoch, metrics):
    _w(event="epoch", epoch=epoch, auc=metrics["validation"]["click"]["auc"])
@hookimpl
def recmtl_checkpoint_saved(run, path, is_best):
    _w(event="ckpt", best=is_best)
@hookimpl
def recmtl_train_end(run, metrics):
    _w(event="end", best_epoch=metrics["best_epoch"])
''')
    r = cli("--plugin", plugin, "train", write_config(tmp_path / "c.yaml", funnel_dir), "--out", tmp_path / "run")
    assert r.code == 0, r
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events[0] == {"event": "start", "tasks": ["click", "conversion"]}
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    assert any(e["event"] == "ckpt" and e["best"] for e in events)
    assert events[-1]["event"] == "end"


def test_uncertainty_balancer_and_shared_bottom_train(cli, funnel_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, balancer={"name": "uncertainty"},
                       tower={"name": "shared_bottom", "bottom_units": [32], "task_units": [8]})
    r = cli("train", cfg, "--out", tmp_path / "run")
    assert r.code == 0, r
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["validation"]["click"]["auc"] > 0.6
    assert set(m["history"][-1]["weights"]) == {"click", "conversion"}


def test_mmoe_reports_gate_diagnostics(cli, funnel_dir, tmp_path):
    run = tmp_path / "run"
    assert cli("train", write_config(tmp_path / "c.yaml", funnel_dir), "--out", run).code == 0
    diag = json.loads((run / "metrics.json").read_text())["history"][-1]["diagnostics"]
    weights = diag["gate_weights"]["click"]
    assert len(weights) == 2 and abs(sum(weights) - 1) < 1e-3
    assert 0 <= diag["gate_entropy"]["conversion"] <= diag["max_entropy"] + 1e-6


def test_regression_on_mmoe_synthetic(cli, tmp_path):
    data = tmp_path / "syn"
    assert cli("datagen", "mmoe-synthetic", data, "--rows", "6000", "--correlation", "0.9", "--dim", "20").code == 0
    cfg = tmp_path / "c.yaml"
    r = cli("init", data / "train.parquet", "--task", "y1", "--task", "y2", "--validation", data / "valid.parquet", "-o", cfg)
    assert r.code == 0 and "y1 (regression)" in r.out, r
    run = tmp_path / "run"
    r = cli("train", cfg, "--out", run, "--set", "train.epochs=3", "--set", "train.progress=false",
            "--set", "train.batch_size=256", "--set", "tower.expert_units=[32]")
    assert r.code == 0, r
    m = json.loads((run / "metrics.json").read_text())
    assert m["monitor"] == "loss"
    y = pq.read_table(data / "valid.parquet")["y1"].to_numpy()
    assert m["validation"]["y1"]["rmse"] < 0.9 * y.std()


def test_string_label_with_positive_values(cli, funnel_dir, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    for split in ("train", "valid"):
        t = pq.read_table(funnel_dir / f"{split}.parquet")
        txt = pa.array(np.where(t["click"].to_numpy() == 1, "yes", "no"))
        pq.write_table(t.append_column("clicked", txt), data / f"{split}.parquet")
    cfg = write_config(tmp_path / "c.yaml", data, tasks=[{"name": "ctr", "label": "clicked", "positive": ["yes"]}])
    r = cli("train", cfg, "--out", tmp_path / "run")
    assert r.code == 0, r
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["validation"]["ctr"]["auc"] > 0.6
