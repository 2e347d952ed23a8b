"""Each user mistake: one clear line on stderr, exit code 2, no traceback, no partial output."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import run_subprocess, write_config


def assert_clean_error(r, *needles: str) -> None:
    assert r.code == 2, r
    assert "Traceback" not in r.err, r.err
    assert r.err.startswith("recmtl: error:"), r.err
    for needle in needles:
        assert needle in r.err, (needle, r.err)


def no_run_output(run) -> bool:
    return not run.exists() or not any(run.glob("*.pt"))


def test_missing_train_file(cli, funnel_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["train"] = str(tmp_path / "nope.parquet")
    cfg.write_text(yaml.safe_dump(raw))
    r = cli("train", cfg, "--out", tmp_path / "run")
    assert_clean_error(r, "no such file or folder", "nope.parquet")
    assert not (tmp_path / "run").exists()


def test_not_parquet_and_corrupt_files(cli, funnel_dir, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    (data / "train.parquet").write_text("user_id,click\n1,0\n")
    cfg = write_config(tmp_path / "c.yaml", funnel_dir)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["train"] = str(data / "train.parquet")
    cfg.write_text(yaml.safe_dump(raw))
    assert_clean_error(cli("train", cfg, "--out", tmp_path / "run"), "not a readable Parquet file", "train.parquet")
    # a truncated Parquet file (the footer is cut off)
    good = (funnel_dir / "train.parquet").read_bytes()
    (data / "train.parquet").write_bytes(good[: len(good) // 2])
    assert_clean_error(cli("train", cfg, "--out", tmp_path / "run"), "train.parquet")
    assert no_run_output(tmp_path / "run")


def test_missing_column_names_close_matches(cli, funnel_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir)
    raw = yaml.safe_load(cfg.read_text())
    raw["features"][0]["name"] = "user_idd"
    cfg.write_text(yaml.safe_dump(raw))
    assert_clean_error(cli("train", cfg, "--out", tmp_path / "run"), "column 'user_idd' not found", "did you mean: user_id")


def test_binary_label_not_01(cli, funnel_dir, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    t = pq.read_table(funnel_dir / "train.parquet")
    t = t.set_column(t.schema.get_field_index("click"), "click", pa.array(t["click"].to_numpy().astype("int64") * 3))
    pq.write_table(t, data / "train.parquet")
    cfg = write_config(tmp_path / "c.yaml", funnel_dir)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["train"] = str(data / "train.parquet")
    cfg.write_text(yaml.safe_dump(raw))
    r = cli("train", cfg, "--out", tmp_path / "run")
    assert_clean_error(r, "label column 'click'", "0/1", "found 3")
    assert no_run_output(tmp_path / "run")


def test_task_with_no_labelled_rows(cli, funnel_dir, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    t = pq.read_table(funnel_dir / "train.parquet")
    t = t.append_column("never", pa.nulls(t.num_rows, pa.int64()))
    pq.write_table(t, data / "train.parquet")
    cfg = write_config(tmp_path / "c.yaml", data, tasks=[{"name": "click"}, {"name": "never"}])
    raw = yaml.safe_load(cfg.read_text())
    raw["data"].pop("validation")
    cfg.write_text(yaml.safe_dump(raw))
    assert_clean_error(cli("train", cfg, "--out", tmp_path / "run"), "task 'never' has no labelled rows")


@pytest.mark.parametrize("section,value,needle", [
    ("tower", {"name": "mmeo"}, "unknown tower 'mmeo' (did you mean: mmoe?)"),
    ("balancer", {"name": "gradnrm"}, "unknown balancer 'gradnrm'"),
    ("tower", {"name": "mmoe", "num_expert": 4}, "tower 'mmoe' does not take parameter 'num_expert' (did you mean: num_experts?)"),
    ("tower", {"name": "mmoe", "num_experts": 0}, "num_experts must be at least 1"),
])
def test_unknown_plugin_names_and_params(cli, funnel_dir, tmp_path, section, value, needle):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, **{section: value})
    r = cli("train", cfg, "--out", tmp_path / "run")
    assert_clean_error(r, needle)
    if "unknown" in needle:
        assert "available" in r.err and "[" in r.err  # lists what exists and who registered it
    assert no_run_output(tmp_path / "run")


def test_unknown_head(cli, funnel_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, tasks=[{"name": "click", "head": "binery"}])
    assert_clean_error(cli("train", cfg, "--out", tmp_path / "run"), "unknown head 'binery'", "binary")


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: c["train"].update(batch_size=-5), "train.batch_size"),
    (lambda c: c["train"].update(bacth_size=5), "unknown key 'train.bacth_size'"),
    (lambda c: c["train"].update(steps_per_epoch=0), "train.steps_per_epoch: Input should be greater than 0"),
    (lambda c: c["train"].update(steps_per_epoch=-3), "train.steps_per_epoch: Input should be greater than 0"),
    (lambda c: c.update(towr={"name": "mmoe"}), "unknown key 'towr'"),
    (lambda c: c["features"].append({"name": "click", "kind": "dense"}), "label of task 'click' and also a feature"),
    (lambda c: c["features"][0].update(kind="sparse"), "features.0.kind"),
    (lambda c: c["tasks"].append({"name": "click"}), "duplicate task name 'click'"),
    (lambda c: c.pop("tasks"), "missing required key 'tasks'"),
])
def test_invalid_config_values(cli, funnel_dir, tmp_path, mutate, needle):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir)
    raw = yaml.safe_load(cfg.read_text())
    mutate(raw)
    cfg.write_text(yaml.safe_dump(raw))
    assert_clean_error(cli("train", cfg, "--out", tmp_path / "run"), "invalid config", needle)


def test_label_copy_is_refused(cli, funnel_dir, tmp_path):
    """A feature derived from a label (here its negation, under another name) is refused."""
    data = tmp_path / "d"
    data.mkdir()
    t = pq.read_table(funnel_dir / "train.parquet")
    t = t.append_column("was_shown_no_click", pa.array(1 - t["click"].to_numpy().astype("int64")))
    pq.write_table(t, data / "train.parquet")
    cfg = write_config(tmp_path / "c.yaml", data)
    raw = yaml.safe_load(cfg.read_text())
    raw["features"].append({"name": "was_shown_no_click", "kind": "categorical"})
    raw["data"].pop("validation")
    cfg.write_text(yaml.safe_dump(raw))
    r = cli("train", cfg, "--out", tmp_path / "run")
    assert_clean_error(r, "feature 'was_shown_no_click' determines the label of task 'click'")
    assert no_run_output(tmp_path / "run")


def test_class_and_attribute_label_copies_are_refused(cli, tmp_path):
    """The leak check covers multiclass labels (a text class copied under another name) and each attribute
    column of a multilabel task (a 0/1 attribute turned into strings)."""
    rng = np.random.default_rng(0)
    n = 600
    shape = rng.choice(["circle", "square", "triangle"], n)
    even = rng.integers(0, 2, n)
    t = pa.table({"noise": rng.integers(0, 5, n), "shape_name": shape, "parity": np.where(even == 1, "even", "odd"),
                  "shape": shape, "even": even.astype("int8"), "big": rng.integers(0, 2, n).astype("int8")})
    pq.write_table(t, tmp_path / "train.parquet")
    for feature, task, needle in [
        ("shape_name", {"name": "shape", "head": "multiclass"}, "feature 'shape_name' determines the label of task 'shape'"),
        ("parity", {"name": "attrs", "label": ["even", "big"], "head": "multilabel"},
         "feature 'parity' determines the label of task 'attrs' (column 'even')"),
    ]:
        cfg = tmp_path / f"{feature}.yaml"
        cfg.write_text(yaml.safe_dump({
            "data": {"train": str(tmp_path / "train.parquet")},
            "features": [{"name": "noise", "kind": "categorical"}, {"name": feature, "kind": "categorical"}],
            "tasks": [task], "tower": {"name": "shared_bottom"}, "train": {"epochs": 1, "progress": False}}))
        r = cli("train", cfg, "--out", tmp_path / f"run_{feature}")
        assert_clean_error(r, needle)
        assert no_run_output(tmp_path / f"run_{feature}")


def test_wrong_feature_dtype(cli, funnel_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir)
    raw = yaml.safe_load(cfg.read_text())
    raw["features"].append({"name": "d01", "kind": "categorical"})
    raw["features"] = [f for f in raw["features"] if not (f["name"] == "d01" and f["kind"] == "dense")]
    cfg.write_text(yaml.safe_dump(raw))
    assert_clean_error(cli("train", cfg, "--out", tmp_path / "run"), "feature 'd01' is categorical", "float")


def test_config_file_problems(cli, tmp_path):
    assert_clean_error(cli("train", tmp_path / "missing.yaml", "--out", tmp_path / "r"), "config file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    assert_clean_error(cli("train", bad, "--out", tmp_path / "r"), "not valid YAML")
    assert_clean_error(cli("train", bad, "--out", tmp_path / "r", "--set", "noequals"), "")


def test_evaluate_on_non_run_dir(cli, tmp_path, funnel_dir):
    assert_clean_error(cli("evaluate", tmp_path, funnel_dir / "test.parquet"), "not a recmtl run directory")


def test_cli_errors_have_no_traceback_in_a_real_process(funnel_dir, tmp_path):
    r = run_subprocess("init", tmp_path / "missing.parquet", "--task", "click")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("recmtl: error: no such file or folder") and "Traceback" not in r.stderr
