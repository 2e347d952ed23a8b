"""``recmtl tune``: a real Optuna study on tiny funnel data (resume, two processes on one journal storage), the
pruning observer, the space parser, and every bad input refused before any trial."""
from __future__ import annotations

import csv

import pytest
import yaml
from conftest import write_config

from recmtl.data.synthetic import funnel
from recmtl.errors import RecmtlError

optuna = pytest.importorskip("optuna", reason="the tune extra is not installed (pip install 'recmtl[tune]')")

from recmtl.training.tune import Pruning, apply_params, metric_value, parse_space  # noqa: E402

SPACE = {"optimizer.lr": {"float": [1.0e-3, 2.0e-2], "log": True}, "tower.num_experts": {"int": [2, 3]}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """4k funnel rows and a 1-epoch config: a trial takes a second or two."""
    root = tmp_path_factory.mktemp("tune")
    funnel(root / "data", rows=4000, seed=5, categorical=6, dense=4, cardinality=20)
    cfg = write_config(root / "base.yaml", root / "data",
                       train={"batch_size": 512, "epochs": 1, "progress": False, "log_every": 0, "threads": 1})
    return root, cfg


def write_space(path, space=SPACE):
    path.write_text(yaml.safe_dump(space))
    return path


def test_tune_writes_best_config_table_plots_and_resumes(cli, tiny, tmp_path):
    root, cfg = tiny
    space = write_space(tmp_path / "space.yaml", {**SPACE, "tower.expert_units": {"choice": [[16], [24, 8]]}})
    out = tmp_path / "t"
    r = cli("tune", cfg, "--space", space, "--trials", "2", "--out", out, "--seed", "0")
    assert r.code == 0, r
    assert "0 of 2 trials done" in r.out and "trial 1 complete" in r.out and "2/2 done, best" in r.out
    best = yaml.safe_load((out / "best.yaml").read_text())
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 2 and {"params_optimizer.lr", "params_tower.num_experts"} <= set(rows[0])
    top = max(rows, key=lambda row: float(row["value"]))
    assert best["optimizer"]["lr"] == pytest.approx(float(top["params_optimizer.lr"]))
    assert best["tower"]["num_experts"] == int(top["params_tower.num_experts"])
    assert best["tower"]["expert_units"] == yaml.safe_load(top["params_tower.expert_units"])  # a list again
    assert best["data"] == yaml.safe_load(cfg.read_text())["data"]  # the base config's data, not the trial's
    assert {p.name for p in (out / "plots").glob("*.png")} >= {"history.png", "parallel_coordinate.png"}
    if __import__("importlib").util.find_spec("plotly") is not None:  # the interactive plots beside the PNGs
        html = {p.name for p in (out / "plots").glob("*.html")}
        assert html >= {"history.html", "parallel_coordinate.html", "slice.html"}, html
        assert (out / "plots" / "plotly.min.js").is_file()
        assert 'src="plotly.min.js"' in (out / "plots" / "history.html").read_text()
    assert (out / "trials" / "trial-0000" / "metrics.json").is_file()  # every trial an ordinary run directory
    # resume: the same study, one more trial to reach 3
    r = cli("tune", cfg, "--space", space, "--trials", "3", "--out", out, "--seed", "0")
    assert r.code == 0, r
    assert "2 of 3 trials done" in r.out and "trial 2 complete" in r.out and "trial 0 " not in r.out
    assert len(list(csv.DictReader((out / "trials.csv").open()))) == 3
    # the best config is a valid config, ready for recmtl train
    from recmtl.config import load_config
    assert load_config(out / "best.yaml").tower.params["num_experts"] == best["tower"]["num_experts"]


def test_two_processes_share_one_journal_study(tiny, tmp_path):
    """Optuna's distributed mode: two `recmtl tune` processes started together work on one study."""
    import subprocess

    from conftest import RECMTL
    root, cfg = tiny
    space = write_space(tmp_path / "space.yaml")
    storage = f"journal:{tmp_path / 'study.log'}"
    procs = [subprocess.Popen([RECMTL, "tune", str(cfg), "--space", str(space), "--trials", "4", "--out",
                               str(tmp_path / f"t{i}"), "--storage", storage, "--study", "shared", "--seed", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = optuna.load_study(study_name="shared", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.log"))))
    done = [t for t in study.trials if t.state.is_finished()]
    assert 4 <= len(done) <= 5  # each process stops once the study holds 4; one may finish the trial it had begun
    assert len({t.user_attrs["pid"] for t in done}) == 2, "both processes ran trials"
    assert len({t.number for t in done}) == len(done)


def test_a_killed_workers_journal_trial_is_failed_and_retried(cli, tiny, tmp_path):
    """The journal storage has no heartbeat: a RUNNING trial whose process on this machine is gone is marked FAIL
    when `recmtl tune` starts and tried again with the same parameters; a live process's trial is left alone."""
    import socket
    import subprocess
    root, cfg = tiny
    space = write_space(tmp_path / "space.yaml")
    log = tmp_path / "study.log"
    args = ["tune", cfg, "--space", space, "--out", tmp_path / "t", "--storage", f"journal:{log}", "--study", "j"]
    assert cli(*args, "--trials", "1").code == 0
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(log)))
    study = optuna.load_study(study_name="j", storage=storage)
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "120"])
    try:
        dists = {"optimizer.lr": optuna.distributions.FloatDistribution(1e-3, 2e-2, log=True),
                 "tower.num_experts": optuna.distributions.IntDistribution(2, 3)}
        for pid in (dead.pid, live.pid):  # what a worker killed (or still working) mid-trial leaves
            trial = study.ask(dists)
            trial.set_user_attr("pid", pid)
            trial.set_user_attr("host", socket.gethostname())
        r = cli(*args, "--trials", "2")
    finally:
        live.kill()
        live.wait()
    assert r.code == 0, r
    assert f"trial 1: its process {dead.pid} on this machine is gone" in r.out, r.out
    trials = optuna.load_study(study_name="j", storage=storage).trials
    assert trials[1].state == optuna.trial.TrialState.FAIL and trials[2].state == optuna.trial.TrialState.RUNNING
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retried) == 1 and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].params == trials[1].params


def test_pruning_observer_reports_and_prunes():
    class FakeTrial:
        def __init__(self):
            self.reports = []

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return len(self.reports) >= 2

    trial = FakeTrial()
    obs = Pruning(trial, "mean/auc", optuna)
    obs.recmtl_epoch_end(epoch=1, metrics={"validation": {"a": {"auc": 0.6}, "b": {"auc": 0.8}}})
    with pytest.raises(optuna.TrialPruned):
        obs.recmtl_epoch_end(epoch=2, metrics={"validation": {"a": {"auc": 0.5}, "b": {"auc": 0.7}}})
    assert trial.reports == [(1, pytest.approx(0.7)), (2, pytest.approx(0.6))]
    assert metric_value({"a": {"logloss": 0.3}}, "a/logloss") == 0.3 and metric_value({}, "mean/auc") is None


def test_choice_with_per_choice_spaces():
    space = parse_space({"tower": {"choice": {"mmoe": {"num_experts": {"int": [2, 8]}}, "ple": {"num_levels": {"int": [1, 2]}}}},
                         "train.batch_size": {"choice": [256, 512]}})
    raw = {"tower": {"name": "mmoe", "num_experts": 2, "expert_units": [32]}, "train": {}}
    mmoe = apply_params(raw, space, {"tower": "mmoe", "tower=mmoe:num_experts": 5, "train.batch_size": 256})
    assert mmoe["tower"] == {"name": "mmoe", "num_experts": 5, "expert_units": [32]} and mmoe["train"]["batch_size"] == 256
    ple = apply_params(raw, space, {"tower": "ple", "tower=ple:num_levels": 2, "tower=mmoe:num_experts": 5})
    assert ple["tower"] == {"name": "ple", "num_levels": 2}  # another plugin: a fresh section with its own space
    assert raw["tower"]["num_experts"] == 2  # the base is untouched
    dim = parse_space({"encoders.categorical.dim": {"choice": [8, 16]}})  # a plugin parameter, not a plugin
    assert apply_params({"encoders": {"categorical": {"name": "embedding"}}}, dim, {"encoders.categorical.dim": 8}) == \
        {"encoders": {"categorical": {"name": "embedding", "dim": 8}}}


def test_choice_of_layer_lists():
    """List values (a tower's layer widths) are offered to Optuna by label and written back as lists."""
    space = parse_space({"tower.expert_units": {"choice": [[16], [64, 32]]}})
    assert space[0].choices == ["[16]", "[64, 32]"]
    raw = {"tower": {"name": "mmoe", "expert_units": [8]}}
    assert apply_params(raw, space, {"tower.expert_units": "[64, 32]"})["tower"]["expert_units"] == [64, 32]
    with pytest.raises(RecmtlError, match="reads like the list choice"):
        parse_space({"tower.expert_units": {"choice": [[16], "[16]"]}})
    with pytest.raises(RecmtlError, match="lists of numbers/strings"):
        parse_space({"tower.expert_units": {"choice": [[[16]]]}})


@pytest.mark.parametrize("space,message", [
    ({"optimizer.lrr": {"float": [1e-4, 1e-2]}}, "unknown key 'optimizer.lrr'"),
    ({"encoders.categorical.dimm": {"choice": [8, 16]}}, "encoder 'embedding' does not take parameter 'dimm'"),
    ({"tower.num_expert": {"int": [2, 4]}}, "tower 'mmoe' does not take parameter 'num_expert'"),
    ({"optimizer.lr": {"float": [1e-2, 1e-4]}}, "range [0.01, 0.0001] is empty or reversed"),
    ({"optimizer.lr": {"float": [0.0, 1e-2], "log": True}}, "log: true needs LOW > 0"),
    ({"optimizer.lr": {"float": [-1.0, 1e-2]}}, "with optimizer.lr=-1.0: invalid config"),
    ({"tower.num_experts": {"int": [2.5, 4]}}, "int needs [LOW, HIGH] with two integers"),
    ({"tower.num_experts": {"int": [2, 4], "lgo": True}}, "unknown option(s) lgo for int"),
    ({"tower": {"choice": ["mmoe", "no_such_tower"]}}, "unknown tower 'no_such_tower'"),
    ({"optimizer.lr": [1e-4, 1e-2]}, "must be one of {int: [LOW, HIGH]}"),
])
def test_bad_space_is_refused_before_any_trial(cli, tiny, tmp_path, space, message):
    root, cfg = tiny
    r = cli("tune", cfg, "--space", write_space(tmp_path / "s.yaml", space), "--trials", "1", "--out", tmp_path / "t")
    assert r.code == 2 and message in r.err, r
    assert len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists(), "nothing written, no study created"


def test_trials_that_keep_failing_stop_the_study(cli, tiny, tmp_path):
    root, cfg = tiny
    # the space is fine, but every trial fails: the training data is gone (checked per trial, not up front)
    broken = yaml.safe_load(cfg.read_text())
    broken["data"]["train"] = str(tmp_path / "gone.parquet")
    base = tmp_path / "broken.yaml"
    base.write_text(yaml.safe_dump(broken))
    r = cli("tune", base, "--space", write_space(tmp_path / "s.yaml"), "--trials", "10", "--out", tmp_path / "t")
    assert r.code == 2 and "3 trials in a row failed" in r.err and "gone.parquet" in r.err, r
    assert r.out.count(" fail ") == 3


def test_bad_storage_metric_and_another_space(cli, tiny, tmp_path):
    root, cfg = tiny
    space = write_space(tmp_path / "space.yaml")
    r = cli("tune", cfg, "--space", space, "--trials", "1", "--storage", "nosuchdb://x/y", "--out", tmp_path / "t")
    assert r.code == 2 and "--storage nosuchdb://x/y: cannot open it" in r.err, r
    r = cli("tune", cfg, "--space", space, "--trials", "1", "--metric", "clik/auc", "--out", tmp_path / "t")
    assert r.code == 2 and "--metric 'clik/auc' must be mean/METRIC or TASK/METRIC" in r.err, r
    # a study created with one space refuses another: resume with the same space or rename
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    from recmtl.training.tune import fingerprint, open_storage, open_study
    open_study(open_storage(storage, optuna), "s", "maximize", "median", 0, fingerprint(SPACE, "mean/auc"), storage, optuna)
    other = write_space(tmp_path / "other.yaml", {"optimizer.lr": {"float": [1e-4, 1e-1], "log": True}})
    r = cli("tune", cfg, "--space", other, "--trials", "1", "--storage", storage, "--study", "s", "--out", tmp_path / "t")
    assert r.code == 2 and "study 's'" in r.err and "another search space" in r.err and "--study NEW_NAME" in r.err, r


def test_missing_optuna_is_one_line(cli, tiny, tmp_path, monkeypatch):
    import sys
    root, cfg = tiny
    monkeypatch.setitem(sys.modules, "optuna", None)
    r = cli("tune", cfg, "--space", write_space(tmp_path / "s.yaml"), "--trials", "1", "--out", tmp_path / "t")
    assert r.code == 2 and r.err.strip() == "recmtl: error: recmtl tune needs Optuna: pip install 'recmtl[tune]'", r
