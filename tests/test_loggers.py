"""Logger plugins: the tensorboard built-in end to end (event files read back with TensorBoard's reader), a
user's logger through --plugin, and the errors (unknown logger, missing extra)."""
from __future__ import annotations

import sys
import textwrap

import pytest
import yaml
from conftest import write_config

from recmtl.config import load_config
from recmtl.registry import load_registry


def test_tensorboard_logger_writes_epoch_step_and_report(cli, tmp_path, funnel_dir):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install 'recmtl[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, train={"batch_size": 1024, "epochs": 2, "progress": False,
                                                              "log_every": 5})
    r = cli("train", cfg, "--out", tmp_path / "run", "--logger", "tensorboard")
    assert r.code == 0, r
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train_loss/click", "validation/click/auc", "validation/conversion/auc", "weights/click",
            "gate_entropy/click", "step/losses/click", "step/cosine/click/conversion"} <= scalars
    assert [e.step for e in acc.Scalars("validation/click/auc")] == [1, 2]
    steps = [e.step for e in acc.Scalars("step/losses/click")]
    assert steps and all(s % 5 == 0 for s in steps)
    assert "report/curves" in acc.Tags()["images"]
    assert "config/text_summary" in acc.Tags()["tensors"]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["loggers"] == ["tensorboard"]


USER_LOGGER = '''
    import json
    from pathlib import Path
    from recmtl import Logger, hookimpl

    class Recorder(Logger):
        def __init__(self, path: str = "calls.jsonl") -> None:
            self.path = Path(path)

        def _log(self, **kw):
            with self.path.open("a") as f:
                f.write(json.dumps(kw) + "\\n")

        @hookimpl
        def recmtl_train_start(self, run):
            self._log(hook="start")

        @hookimpl
        def recmtl_step_logged(self, step, record):
            self._log(hook="step", step=step, losses=sorted(record["losses"]))

        @hookimpl
        def recmtl_epoch_end(self, epoch):
            self._log(hook="epoch", epoch=epoch)

        @hookimpl
        def recmtl_train_end(self, metrics):
            self._log(hook="end", best=metrics["best_epoch"])

        def close(self):
            self._log(hook="close")

    @hookimpl
    def recmtl_register_loggers():
        return {"recorder": Recorder}
'''


def test_user_logger_plugin_receives_every_hook(cli, tmp_path, funnel_dir):
    import json
    plugin = tmp_path / "recorder.py"
    plugin.write_text(textwrap.dedent(USER_LOGGER))
    calls = tmp_path / "calls.jsonl"
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, train={"batch_size": 2048, "epochs": 1, "progress": False,
                                                              "log_every": 4},
                       loggers=[{"name": "recorder", "path": str(calls)}])
    r = cli("--plugin", plugin, "train", cfg, "--out", tmp_path / "run")
    assert r.code == 0, r
    seen = [json.loads(line) for line in calls.read_text().splitlines()]
    hooks = [c["hook"] for c in seen]
    assert hooks[0] == "start" and hooks[-2:] == ["end", "close"] and "epoch" in hooks
    assert {tuple(c["losses"]) for c in seen if c["hook"] == "step"} == {("click", "conversion")}


def test_unknown_logger_and_parameter_fail_before_data(cli, tmp_path, funnel_dir):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir)
    r = cli("train", cfg, "--out", tmp_path / "run", "--logger", "tensorbord")
    assert r.code == 2 and "unknown logger 'tensorbord'" in r.err and "did you mean: tensorboard" in r.err, r
    cfg = write_config(tmp_path / "c2.yaml", funnel_dir, loggers=[{"name": "tensorboard", "logdir": "x"}])
    r = cli("train", cfg, "--out", tmp_path / "run2")
    assert r.code == 2 and "logger 'tensorboard' does not take parameter 'logdir'" in r.err, r
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_missing_extra_is_one_line_naming_pip_install(cli, tmp_path, funnel_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    cfg = write_config(tmp_path / "c.yaml", funnel_dir)
    r = cli("train", cfg, "--out", tmp_path / "run", "--logger", "tensorboard")
    assert r.code == 2, r
    assert r.err.strip() == ("recmtl: error: logger 'tensorboard' needs the tensorboard package: "
                             "pip install 'recmtl[tensorboard]'")


def test_config_loggers_accept_names_and_components(tmp_path, funnel_dir):
    cfg = load_config(write_config(tmp_path / "c.yaml", funnel_dir, loggers=["tensorboard", {"name": "mlflow",
                                                                                               "experiment": "x"}]))
    comps = cfg.logger_components()
    assert [(c.name, c.params) for c in comps] == [("tensorboard", {}), ("mlflow", {"experiment": "x"})]
    assert {"tensorboard", "mlflow"} <= set(load_registry().names("logger"))
