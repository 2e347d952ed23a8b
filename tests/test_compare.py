"""Negative transfer (issue 18): `recmtl compare` (cells, resumability, statistics, Δm), the `delta_m` monitor,
the TAG lookahead affinity (`train.affinity_every`) and `recmtl group`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_config

from recmtl.config import parse_config
from recmtl.data.synthetic import task_clusters
from recmtl.errors import ConfigError
from recmtl.training.affinity import lookahead_affinity, mean_affinity
from recmtl.training.compare import cell_config, delta_m, plan_cells, with_dependencies
from recmtl.training.grouping import _partitions, best_partition, config_of, partition_score


# ---- small data --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clusters_dir(tmp_path_factory) -> Path:
    """Four regression tasks in two pairs (c1_*, c2_*), correlated 0.9 within a pair, 0 across."""
    out = tmp_path_factory.mktemp("clusters")
    task_clusters(out, rows=6000, seed=0, clusters=2, per_cluster=2, within=0.9, dim=12)
    return out


def clusters_config(path: Path, data: Path, tasks: list[str], **train) -> Path:
    cfg = {"seed": 1,
           "data": {"train": str(data / "train.parquet"), "validation": str(data / "valid.parquet"),
                    "test": str(data / "test.parquet"), "shuffle_buffer": 2048, "read_rows": 2048},
           "features": [{"name": f"x{i:03d}", "kind": "dense"} for i in range(12)],
           "tasks": [{"name": t, "head": "regression"} for t in tasks],
           "tower": {"name": "shared_bottom", "bottom_units": [32], "task_units": [8]},
           "optimizer": {"lr": 0.01},
           "train": {"batch_size": 256, "epochs": 2, "progress": False, "log_every": 0, "threads": 1,
                     "early_stopping": {"monitor": "loss"}, **train}}
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---- unit: Δm, cells, config -------------------------------------------------------------------------------
def test_delta_m_is_libmtl_count_improvement():
    # LibMTL: mean over tasks of mean over metrics of (-1)^w (base - new) / base, w = 1 where higher is better
    ref = {"a": {"auc": 0.80}, "b": {"rmse": 2.0, "mae": 1.0}}
    new = {"a": {"auc": 0.84}, "b": {"rmse": 1.8, "mae": 1.1}}
    higher = {("a", "auc"): True, ("b", "rmse"): False, ("b", "mae"): False}
    expected = 100 * ((0.04 / 0.80) + ((0.2 / 2.0) + (-0.1 / 1.0)) / 2) / 2
    assert delta_m(new, ref, lambda t, m: higher[(t, m)]) == pytest.approx(expected)
    assert delta_m(ref, ref, lambda t, m: higher[(t, m)]) == 0.0


def test_cells_keep_dependencies_and_fix_monitors(funnel_dir, tmp_path):
    raw = yaml.safe_load(write_config(tmp_path / "c.yaml", funnel_dir).read_text())
    raw["train"]["early_stopping"] = {"monitor": "click/auc"}
    cfg = parse_config(raw, tmp_path)
    assert with_dependencies(cfg, ["conversion"]) == ("click", "conversion")  # ESMM reads click's score
    cells = plan_cells(cfg, 2, ["mmoe", "ple"], ["fixed"])
    names = [c.name for c in cells]
    assert names[:4] == ["single-click-s1", "single-conversion-s1", "mmoe+fixed-s1", "ple+fixed-s1"]
    assert len(cells) == 8 and {c.seed for c in cells} == {1, 2}
    conv = next(c for c in cells if c.name == "single-conversion-s2")
    assert conv.tasks == ("click", "conversion") and conv.scored == ("conversion",)
    blind = parse_config({**raw, "data": {"train": raw["data"]["train"]}}, tmp_path)
    with pytest.raises(ConfigError, match="compare needs held-out data"):
        plan_cells(blind, 1, [], [])
    one = parse_config({**raw, "tasks": [raw["tasks"][0]]}, tmp_path)
    with pytest.raises(ConfigError, match="one task .*nothing to compare"):
        plan_cells(one, 3, [], [])
    raw["tasks"] = [{"name": "click"}, {"name": "buy", "label": "conversion"}]
    cfg = parse_config(raw, tmp_path)
    single_buy = next(c for c in plan_cells(cfg, 1, [], []) if c.name == "single-buy-s1")
    assert cell_config(cfg, single_buy)["train"]["early_stopping"]["monitor"] == "auto"  # click/auc: not its task


def test_delta_m_monitor_needs_a_reference(funnel_dir, tmp_path):
    raw = yaml.safe_load(write_config(tmp_path / "c.yaml", funnel_dir).read_text())
    raw["train"]["early_stopping"] = {"monitor": "delta_m"}
    with pytest.raises(ConfigError, match="delta_m needs the single-task reference"):
        parse_config(raw, tmp_path)
    raw["train"]["early_stopping"] = {"monitor": "loss", "reference": {"click": {"auc": 0.7}}}
    with pytest.raises(ConfigError, match="applies to monitor delta_m only"):
        parse_config(raw, tmp_path)


# ---- unit: affinity and grouping ---------------------------------------------------------------------------
def test_lookahead_affinity_restores_everything_and_sees_related_tasks():
    torch.manual_seed(0)
    shared = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.2))
    heads = torch.nn.ModuleDict({t: torch.nn.Linear(8, 1) for t in ("a", "b", "c")})
    model = torch.nn.ModuleDict({"shared": shared, "heads": heads}).train()
    x = torch.randn(256, 4)
    y = {"a": x[:, 0], "b": x[:, 0] * 1.0, "c": -x[:, 0]}  # b: the same as a; c: its opposite

    def losses(inputs):
        h = model["shared"](inputs)
        return {t: ((model["heads"][t](h).squeeze(1) - y[t]) ** 2).mean() for t in y}

    now = losses(x)
    before = [p.detach().clone() for p in model.parameters()] + [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    a = lookahead_affinity(model, x, now, losses, list(shared.parameters()), ["a", "b", "c"], lr=0.05)
    after = [p.detach() for p in model.parameters()] + list(model.buffers())
    assert all(torch.equal(u, v) for u, v in zip(before, after)) and torch.equal(rng, torch.get_rng_state())
    sum(now.values()).backward()  # the graph is still usable
    assert a.shape == (3, 3) and np.isfinite(a).all()
    assert a[0, 0] > 0 and a[0, 1] > 0  # a step for a helps a and its twin b


def test_partitions_and_best_grouping():
    assert sum(1 for _ in _partitions(4, 2)) == 7 and sum(1 for _ in _partitions(10, 5)) == 42525
    blocks = np.full((6, 6), -0.1)
    for g in ([0, 3, 4], [1, 2, 5]):
        for i in g:
            for j in g:
                blocks[i, j] = 1.0
    groups, score, method = best_partition(blocks, 2)
    assert method == "exhaustive" and sorted(map(sorted, groups)) == [[0, 3, 4], [1, 2, 5]]
    assert score == pytest.approx(6.0) and partition_score(blocks, [list(range(6))]) < score
    big = np.kron(np.eye(3), np.ones((4, 4))) - 0.2  # 12 tasks in 3 blocks: greedy
    groups, _, method = best_partition(big, 3)
    assert method == "greedy" and sorted(map(sorted, groups)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(ConfigError, match="--groups 7"):
        best_partition(blocks, 7)
    names, mean = mean_affinity([{"affinity": {"a": {"a": 1, "b": 2}, "b": {"a": 3, "b": math.nan}}},
                                 {"affinity": {"a": {"a": 3, "b": 2}, "b": {"a": 1, "b": 4}}}])
    assert names == ["a", "b"] and mean.tolist() == [[2, 2], [2, 4]]


# ---- end to end --------------------------------------------------------------------------------------------
def test_compare_end_to_end_resumes_and_refuses_bad_input(cli, clusters_dir, tmp_path):
    cfg = clusters_config(tmp_path / "c.yaml", clusters_dir, ["c1_t1", "c1_t2"])
    out = tmp_path / "cmp"
    r = cli("compare", cfg, "-o", out, "--seeds", "2")
    assert r.code == 0, r
    assert "shared_bottom+fixed" in r.out and "Δm" in r.out and "rmse" in r.out
    result = json.loads((out / "compare.json").read_text())
    entry = result["variants"]["shared_bottom+fixed"]
    assert result["split"] == "test" and result["seeds"] == [1, 2] and result["primary"]["c1_t1"] == "rmse"
    task = entry["tasks"]["c1_t1"]
    single = result["single"]["c1_t1"]["rmse"]["values"]
    multi = task["metrics"]["rmse"]["values"]
    assert task["delta"]["values"] == pytest.approx([m - s for m, s in zip(multi, single)])
    assert len(task["delta"]["ci95"]) == 2 and task["negative_transfer"] in (True, False)
    assert "mae" in task["metrics"]  # every reported metric is summarised
    rel = [np.mean([-(entry["tasks"][t]["metrics"]["rmse"]["values"][i] - result["single"][t]["rmse"]["values"][i])
                    / result["single"][t]["rmse"]["values"][i] for t in ("c1_t1", "c1_t2")]) * 100 for i in range(2)]
    assert entry["delta_m_pct"]["values"] == pytest.approx(rel)
    assert set(result["reference"]) == {"c1_t1", "c1_t2"}
    assert (out / "report" / "index.html").is_file() and (out / "report" / "compare_deltas.png").is_file()
    for name in ("single-c1_t1-s1", "shared_bottom+fixed-s2"):
        assert (out / "runs" / name / "best.pt").is_file()

    base, is_compare = config_of(out, [])  # what `group --train` plans more cells from: the config in full
    assert is_compare and base.seed == 1 and base.train.threads == 1 and base.train.progress is False

    # a crashed cell (no done marker) is resumed, finished cells are skipped
    (out / "done" / "shared_bottom+fixed-s2.json").unlink()
    r = cli("compare", cfg, "-o", out, "--seeds", "2")
    assert r.code == 0 and "5 cell(s) already trained" in r.err and "training cell shared_bottom+fixed-s2" in r.err
    assert json.loads((out / "compare.json").read_text())["variants"] == result["variants"]

    # Δm as the training target, against the compare directory's single-task validation metrics
    raw = yaml.safe_load(cfg.read_text())
    raw["train"]["early_stopping"] = {"monitor": "delta_m", "reference": "cmp"}  # relative to the config file
    (tmp_path / "dm.yaml").write_text(yaml.safe_dump(raw))
    r = cli("train", tmp_path / "dm.yaml", "-o", tmp_path / "dm")
    assert r.code == 0, r
    metrics = json.loads((tmp_path / "dm" / "metrics.json").read_text())
    assert metrics["monitor"] == "delta_m" and math.isfinite(metrics["history"][0]["monitor"]["delta_m"])

    # bad input, each refused before any training
    r = cli("compare", cfg, "-o", out, "--seeds", "2", "--metric", "c1_t1=bogus")  # trained cells: no training
    assert r.code == 2 and "--metric c1_t1=bogus: task 'c1_t1' reports loss, mae, rmse" in r.err
    r = cli("compare", cfg, "-o", out, "--set", "optimizer.lr=0.02")
    assert r.code == 2 and "different config (optimizer.lr is 0.01 there and 0.02 here)" in r.err
    r = cli("compare", cfg, "-o", tmp_path / "x", "--towers", "mmoe,nope")
    assert r.code == 2 and "unknown tower 'nope'" in r.err
    r = cli("compare", cfg, "-o", tmp_path / "x", "--balancers", "pcgrad,bogus")
    assert r.code == 2 and "unknown balancer 'bogus'" in r.err
    one = clusters_config(tmp_path / "one.yaml", clusters_dir, ["c1_t1"])
    r = cli("compare", one, "-o", tmp_path / "x")
    assert r.code == 2 and "one task ('c1_t1'): nothing to compare" in r.err
    raw["train"]["early_stopping"] = {"monitor": "delta_m", "reference": {"c1_t1": {"rmse": 1.0}}}
    (tmp_path / "dm2.yaml").write_text(yaml.safe_dump(raw))
    r = cli("train", tmp_path / "dm2.yaml", "-o", tmp_path / "dm2")
    assert r.code == 2 and "no single-task metrics for task(s) c1_t2" in r.err
    assert not (tmp_path / "x").exists() and not (tmp_path / "dm2").exists()


def test_compare_workers_train_cells_in_processes(cli, clusters_dir, tmp_path):
    cfg = clusters_config(tmp_path / "c.yaml", clusters_dir, ["c1_t1", "c2_t1"], epochs=1)
    r = cli("compare", cfg, "-o", tmp_path / "cmp", "--seeds", "1", "--workers", "2")
    assert r.code == 0, r
    assert "training 3 cell(s) in 2 processes" in r.err and "(1 seed: no interval)" in r.out
    assert len(list((tmp_path / "cmp" / "done").glob("*.json"))) == 3


def test_affinity_report_and_group(cli, clusters_dir, tmp_path):
    tasks = ["c1_t1", "c1_t2", "c2_t1", "c2_t2"]
    cfg = clusters_config(tmp_path / "c.yaml", clusters_dir, tasks, affinity_every=5)
    run = tmp_path / "run"
    assert cli("train", cfg, "-o", run).code == 0
    lines = [json.loads(x) for x in (run / "affinity.jsonl").read_text().splitlines()]
    assert len(lines) == 7 and lines[0]["step"] == 5  # 2 epochs of 19 steps and set(lines[0]["affinity"]) == set(tasks)
    assert cli("report", run).code == 0
    assert (run / "report" / "affinity_matrix.png").is_file() and (run / "report" / "affinity_evolution.png").is_file()
    r = cli("group", run, "--groups", "2")
    assert r.code == 0, r
    assert "{c1_t1, c1_t2}  {c2_t1, c2_t2}" in r.out  # the two clusters
    r = cli("group", run, "--groups", "5")
    assert r.code == 2 and "--groups 5 is more than the 4 tasks" in r.err
    r = cli("group", run, "--train")
    assert r.code == 2 and "pass --out DIR" in r.err
    r = cli("group", tmp_path, "--groups", "2")
    assert r.code == 2 and "no affinity.jsonl; train with train.affinity_every" in r.err

    # --train: the groups, all-in-one and single-task cells through compare's machinery (1 seed, 1 epoch)
    r = cli("group", run, "--groups", "2", "--train", "-o", tmp_path / "grp", "--seeds", "1")
    assert r.code == 0, r
    result = json.loads((tmp_path / "grp" / "compare.json").read_text())
    assert set(result["variants"]) == {"shared_bottom+fixed", "grouped c1_t1+c1_t2|c2_t1+c2_t2"}
    assert set(result["variants"]["grouped c1_t1+c1_t2|c2_t1+c2_t2"]["tasks"]) == set(tasks)
    assert result["groups"]["groups"] == [["c1_t1", "c1_t2"], ["c2_t1", "c2_t2"]]
    assert set(result["groups"]["vs_all_in_one"]) == set(tasks) and "grouped vs all-in-one" in r.out
    assert (tmp_path / "grp" / "report" / "groups_affinity.png").is_file()
