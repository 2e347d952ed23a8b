"""The dead-units diagnostic: head-input units constant on every validation row, counted for any tower (no tower
code), recorded per epoch, warned about at the end of training, shown by ``recmtl report``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_config
from test_plugins import NEW_TOWER

from recmtl.data.parquet import ParquetSource
from recmtl.training.evaluate import UnitRange, load_run, predict
from recmtl.training.loop import dead_unit_warnings, dead_units_at


def test_unit_range_counts_constant_units_and_merges_like_one_pass():
    torch.manual_seed(0)
    h = torch.relu(torch.randn(100, 6))
    h[:, 1] = 0.0  # a dead ReLU
    h[:, 4] = 0.5  # constant, not zero: the head cannot use it either
    whole = UnitRange()
    whole.update({"a": h, "b": h[:, :3].to(torch.bfloat16)})
    assert whole.dead_units() == {"a": [2, 6], "b": [1, 3]}
    # two ranks' shares (one of them empty) combine to the single pass's ranges
    parts = [UnitRange(), UnitRange(), UnitRange()]
    parts[0].update({"a": h[:37], "b": h[:37, :3]})
    parts[1].update({"a": h[37:], "b": h[37:, :3]})
    merged = UnitRange.merge(parts)
    assert merged.rows == {"a": 100, "b": 100} and merged.dead_units() == whole.dead_units()
    one = UnitRange()
    one.update({"a": h[:1]})
    assert one.dead_units() == {}  # a single row: every unit is constant, nothing to say


def test_warning_only_at_half_dead_or_more():
    history = [{"epoch": 1, "diagnostics": {"dead_units": {"a": [5, 8], "b": [1, 8]}}},
               {"epoch": 2, "diagnostics": {"dead_units": {"a": [3, 8], "b": [4, 8]}}}]
    dead = dead_units_at(history, {"a": 1, "b": 2})
    assert dead == {"a": {"epoch": 1, "dead": 5, "units": 8}, "b": {"epoch": 2, "dead": 4, "units": 8}}
    lines = dead_unit_warnings(dead, "for pepnet, gate_output: false")
    assert len(lines) == 2 and "task 'a': 5 of the 8 units" in lines[0] and "epoch 1" in lines[0]
    assert "try a wider last task layer; for pepnet, gate_output: false" in lines[0]
    assert dead_unit_warnings(dead_units_at(history, {"a": 2, "b": 1})) == []  # 3/8 and 1/8: no warning
    assert dead_units_at([{"epoch": 1}], {"a": 1}) == {}  # runs without the count (no validation, older runs)


@pytest.fixture
def dead_tower(tmp_path):
    mod = tmp_path / "my_towers.py"
    mod.write_text(NEW_TOWER)
    return mod


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dead_head_input_is_counted_warned_and_reported(cli, funnel_dir, tmp_path, dead_tower, precision):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, tower={"name": "per_task_linear", "width": 8, "dead": 6},
                       train={"batch_size": 512, "epochs": 1, "progress": False, "precision": precision})
    r = cli("--plugin", dead_tower, "train", cfg, "--out", tmp_path / "run")
    assert r.code == 0, r
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    counts = metrics["history"][0]["diagnostics"]["dead_units"]
    assert set(counts) == {"click", "conversion"}  # the forced 6 of 8, and any unit that died in training
    assert all(units == 8 and dead >= 6 for dead, units in counts.values()), counts
    assert metrics["dead_units"]["click"] == {"epoch": 1, "dead": counts["click"][0], "units": 8}
    warnings = [line for line in r.err.splitlines() if line.startswith("warning: task")]
    assert len(warnings) == 2, r.err
    assert f"task 'click': {counts['click'][0]} of the 8 units of its head input" in warnings[0]
    assert "a wider last task layer; for per_task_linear, fewer dead units" in warnings[0]
    r = cli("report", tmp_path / "run", "--out", tmp_path / "report")
    assert r.code == 0, r
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<h2>Dead units</h2>" in page and "at least half dead" in page


def test_healthy_run_has_no_warning(cli, funnel_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, train={"batch_size": 512, "epochs": 1, "progress": False})
    r = cli("train", cfg, "--out", tmp_path / "run")  # the built-in mmoe, task_units [16]
    assert r.code == 0, r
    assert "dead at epoch" not in r.err, r.err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for dead, units in metrics["history"][0]["diagnostics"]["dead_units"].values():
        assert units == 16 and dead < 8  # some dead ReLUs are normal; fewer than half: no warning
    r = cli("report", tmp_path / "run", "--out", tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<h2>Dead units</h2>" in page and "at least half dead" not in page
    # watching the head inputs changes no score
    run = load_run(tmp_path / "run")
    src = ParquetSource(str(funnel_dir / "valid.parquet"), run.config.columns())
    plain, watched = (predict(run.model, run.schema, src, 1000, units=u) for u in (False, True))
    assert plain.units is None and watched.units.rows == {t: len(plain.mask) for t in plain.scores}
    for t in plain.scores:
        assert np.array_equal(plain.scores[t], watched.scores[t])


def test_per_task_model_shows_each_task_its_own_copys_head_input():
    from torch import nn

    from recmtl.training.model import PerTaskModel

    class Copy(nn.Module):  # what PerTaskModel reads of a MultiTaskModel
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value, self.task_names, self.label_slices = value, ["a", "b"], {}
            self.encoders, self.heads = nn.ModuleDict(), nn.ModuleDict({"a": nn.Identity(), "b": nn.Identity()})

        def run(self, inputs, observe=None):
            hidden = {t: torch.full((3, 2), self.value) for t in self.task_names}
            if observe is not None:
                observe(hidden)
            return hidden, hidden

    seen = UnitRange()
    PerTaskModel([Copy(0.0), Copy(1.0)], {"a": 0, "b": 1}).run({}, seen.update)
    assert seen.rows == {"a": 3, "b": 3} and seen.low["a"].tolist() == [0.0, 0.0] and seen.low["b"].tolist() == [1.0, 1.0]
