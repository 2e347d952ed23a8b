"""The mlflow logger and ``recmtl export --mlflow`` against a real ``mlflow server`` (SQLite backend) on 127.0.0.1,
started once for this module and stopped at its end; read back through the MLflow client. A server that is down
never stops training."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import write_config

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'recmtl[mlflow]')")
MLFLOW_BIN = Path(sys.executable).with_name("mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not MLFLOW_BIN.is_file():
        pytest.skip("the mlflow server command is not installed (pip install 'recmtl[mlflow]')")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([str(MLFLOW_BIN), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_mlflow_logger_and_export_land_in_tracking_and_registry(cli, tmp_path, funnel_dir, server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, train={"batch_size": 2048, "epochs": 1, "progress": False,
                                                              "log_every": 4},
                       loggers=[{"name": "mlflow", "experiment": "recmtl-test", "report": False}])
    run_dir = tmp_path / "run"
    r = cli("train", cfg, "--out", run_dir)
    assert r.code == 0, r
    assert "warning: MLflow" not in r.err
    client = mlflow.MlflowClient(tracking_uri=server)
    run_id = __import__("json").loads((run_dir / "mlflow.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer.lr"] == "0.005" and run.data.params["tasks.0.name"] == "click"
    assert run.data.params["tower.name"] == "mmoe"
    auc = client.get_metric_history(run_id, "validation/click/auc")
    assert [m.step for m in auc] == [1] and 0.5 < auc[0].value <= 1
    steps = client.get_metric_history(run_id, "step/losses/click")
    assert steps and all(m.step % 4 == 0 for m in steps)
    assert client.get_metric_history(run_id, "step/cosine/click/conversion")
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "metrics.json", "schema.json", "balance.jsonl", "run.json"} <= artifacts
    assert "best.pt" not in artifacts
    # export --mlflow: MLflow's ONNX flavour, registered as a model version
    r = cli("export", run_dir, "--output", tmp_path / "model.onnx", "--mlflow", "--name", "recmtl-ctr")
    assert r.code == 0, r
    assert "registered as recmtl-ctr version 1" in r.out
    version = client.get_model_version("recmtl-ctr", "1")
    assert version.run_id == run_id
    from mlflow import onnx as mlflow_onnx
    loaded = mlflow_onnx.load_model("models:/recmtl-ctr/1")
    assert {o.name for o in loaded.graph.output} >= {"click", "conversion"}


def test_resume_continues_the_same_mlflow_run_at_the_next_steps(cli, tmp_path, funnel_dir, server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, train={"batch_size": 2048, "epochs": 1, "progress": False,
                                                              "log_every": 4},
                       loggers=[{"name": "mlflow", "experiment": "recmtl-resume", "report": False}])
    run_dir = tmp_path / "run"
    assert cli("train", cfg, "--out", run_dir).code == 0
    run_id = __import__("json").loads((run_dir / "mlflow.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri=server)
    first = [m.step for m in client.get_metric_history(run_id, "step/losses/click")]
    r = cli("train", cfg, "--out", run_dir, "--resume", "--set", "train.epochs=2")
    assert r.code == 0, r
    assert __import__("json").loads((run_dir / "mlflow.json").read_text())["run_id"] == run_id
    experiment = client.get_experiment_by_name("recmtl-resume")
    assert [x.info.run_id for x in client.search_runs([experiment.experiment_id])] == [run_id]  # no second run
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "validation/click/auc")] == [1, 2]
    steps = sorted(m.step for m in client.get_metric_history(run_id, "step/losses/click"))
    assert steps[:len(first)] == sorted(first) and len(steps) > len(first) and len(set(steps)) == len(steps)
    assert min(steps[len(first):]) > max(first)  # the second epoch's steps continue after the first's


def test_server_down_training_goes_on_with_one_warning(cli, tmp_path, funnel_dir):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, train={"batch_size": 4096, "epochs": 1, "progress": False,
                                                              "log_every": 2},
                       loggers=[{"name": "mlflow", "tracking_uri": down, "timeout": 1}])
    r = cli("train", cfg, "--out", tmp_path / "run")
    assert r.code == 0, r
    warnings = [line for line in r.err.splitlines() if "MLflow" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"warning: MLflow at {down} failed") and "training continues" in warnings[0]
    metrics = __import__("json").loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["history"]) == 1 and metrics["validation"]  # nothing lost: the run directory is complete


def test_queued_calls_are_sent_when_the_server_is_back(tmp_path):
    from recmtl_plugins.loggers.mlflow_logger import MLflowLogger

    class Flaky:
        tracking_uri = "http://flaky"

        def __init__(self):
            self.up, self.batches = False, []

        def log_batch(self, run_id, metrics=(), params=()):
            if not self.up:
                raise ConnectionError("connection refused")
            self.batches.append([(m.key, m.step) for m in metrics])

    logger = MLflowLogger(tracking_uri="http://flaky")
    logger.client, logger.run_id, logger.run_dir = Flaky(), "r1", tmp_path
    logger.recmtl_epoch_end(epoch=1, metrics={"train_loss": {"click": 0.5}})
    logger.recmtl_step_logged(step=8, record={"losses": {"click": 0.4}})
    assert not logger._flush() and len(logger.pending) == 2 and logger.warned  # no thread here: flushed by hand
    logger.client.up = True
    logger.recmtl_epoch_end(epoch=2, metrics={"train_loss": {"click": 0.3}})
    assert logger._flush() and logger.pending == []
    # queued metric calls go out merged, in order
    assert logger.client.batches == [[("train_loss/click", 1), ("step/losses/click", 8), ("train_loss/click", 2)]]


def test_a_logger_that_sees_no_run_writes_nothing(tmp_path, monkeypatch):
    """MLflow's default store is a file in the working directory: the contract check (and a run that never starts)
    must not create it."""
    from recmtl.testing import check_logger
    from recmtl_plugins.loggers.mlflow_logger import MLflowLogger
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    check_logger(MLflowLogger)
    assert list(tmp_path.iterdir()) == []
