"""``train.steps_per_epoch``: an epoch is a number of steps from one continuing stream of passes over the
training data; resume after and inside such an epoch continues at the same place of the stream."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_config

from recmtl import hookimpl
from recmtl.config import load_config
from recmtl.errors import ConfigError, DataError
from recmtl.registry import load_registry
from recmtl.rundir import LAST, RunDir
from recmtl.training.batches import Passes
from recmtl.training.loop import train

# the funnel's 16,000 training rows at 1,024 a step: 16 steps a pass (the last one 640 rows)
TRAIN = {"batch_size": 1024, "epochs": 4, "steps_per_epoch": 6, "progress": False, "threads": 1,
         "precision": "fp32", "early_stopping": {"patience": 0}}


def pass_items(lengths: list[int]):
    def make(p: int, skip: int) -> list[tuple[int, int]]:
        return [(p, i) for i in range(skip, lengths[p])]
    return make


def test_passes_continue_into_the_next_pass_and_from_a_saved_position():
    stream = Passes(pass_items([3, 2, 4, 4]))
    first = [next(stream) for _ in range(4)]
    assert first == [(0, 0), (0, 1), (0, 2), (1, 0)] and stream.position == [1, 1]
    rest = [next(stream) for _ in range(5)]
    assert rest == [(1, 1), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert stream.position == [2, 4]  # the pass's end is found on the next step
    again = Passes(pass_items([3, 2, 4, 4]), 1, 1)  # a checkpoint's position
    assert [next(again) for _ in range(5)] == rest and again.position == [2, 4]
    assert next(Passes(pass_items([3, 2, 4, 4]), 2, 4)) == (3, 0)  # saved at a pass's very end


def test_a_pass_without_batches_is_a_data_error():
    stream = Passes(pass_items([2, 0]), what="training data t.parquet")
    assert [next(stream) for _ in range(2)] == [(0, 0), (0, 1)]
    with pytest.raises(DataError, match="training data t.parquet produced no batches"):
        next(stream)


def config_file(tmp_path: Path, funnel_dir: Path, **train: object) -> Path:
    return write_config(tmp_path / "c.yaml", funnel_dir, train={**TRAIN, **train})


def history(run: Path) -> list[dict]:
    return json.loads((run / "metrics.json").read_text())["history"]


def test_an_epoch_is_its_steps_taken_across_passes(cli, funnel_dir, tmp_path):
    r = cli("train", config_file(tmp_path, funnel_dir), "--out", tmp_path / "run")
    assert r.code == 0, r.err
    assert "an epoch = 6 steps (train.steps_per_epoch) = 0.38 passes" in r.err
    h = history(tmp_path / "run")
    assert [(e["epoch"], e["steps"], e["pass"], e["pass_steps"]) for e in h] == [
        (1, 6, 1, 6), (2, 6, 1, 12), (3, 6, 2, 2), (4, 6, 2, 8)]
    assert [e["rows"] for e in h] == [6144, 6144, 5 * 1024 + 640, 6144]  # epoch 3 holds pass 1's last batch
    assert all("validation" in e for e in h)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["best_epoch"] >= 1
    r = cli("report", tmp_path / "run")  # reads the per-epoch history as it is
    assert r.code == 0 and (tmp_path / "run" / "report" / "curves.png").is_file(), r.err


def test_early_stopping_counts_these_epochs(cli, funnel_dir, tmp_path):
    # lr 0: nothing improves after the first epoch, so patience 2 stops after epoch 3 (mid-pass: step 18)
    cfg = config_file(tmp_path, funnel_dir, epochs=10, early_stopping={"patience": 2})
    raw = yaml.safe_load(cfg.read_text())
    raw["optimizer"]["lr"] = 1e-12
    cfg.write_text(yaml.safe_dump(raw))
    r = cli("train", cfg, "--out", tmp_path / "run")
    assert r.code == 0, r.err
    assert "did not improve for 2 epochs" in r.err
    assert [e["pass_steps"] for e in history(tmp_path / "run")] == [6, 12, 2]


class Interrupt(Exception):
    pass


class StopAt:
    """Raises once ``last.pt`` was saved inside 0-based ``epoch`` after ``steps`` of its steps, as a kill would."""

    def __init__(self, epoch: int, steps: int) -> None:
        self.epoch, self.steps = epoch, steps

    @hookimpl
    def recmtl_checkpoint_saved(self, run, path, is_best):
        state = torch.load(path, weights_only=False) if not is_best else {}
        inside = state.get("in_epoch") or {}
        if inside.get("epoch") == self.epoch and inside.get("steps") == self.steps:
            raise Interrupt


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = RunDir(a).load_checkpoint(LAST)["model"], RunDir(b).load_checkpoint(LAST)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ha, hb = history(a), history(b)
    for key in ("train_loss", "validation", "rows", "pass", "pass_steps"):
        assert [e[key] for e in ha] == [e[key] for e in hb], key


def test_resume_after_and_inside_an_epoch_takes_the_same_batches(funnel_dir, tmp_path, capsys):
    cfg = config_file(tmp_path, funnel_dir, checkpoint_every=2)
    registry = load_registry()
    whole = tmp_path / "whole"
    train(load_config(cfg), whole, registry)

    # after epoch 2, which ended inside pass 1: the run extended from 2 to 4 epochs
    after = tmp_path / "after"
    train(load_config(cfg, ["train.epochs=2"]), after, registry)
    assert RunDir(after).load_checkpoint(LAST)["stream"] == [0, 12]
    train(load_config(cfg), after, registry, resume=True)
    assert_same_run(whole, after)

    # inside epoch 3 after 4 of its steps: exactly at the end of pass 1 (its 16th step)
    inside = tmp_path / "inside"
    with pytest.raises(Interrupt):
        train(load_config(cfg), inside, registry, observers=[StopAt(2, 4)])
    state = RunDir(inside).load_checkpoint(LAST)
    assert state["in_epoch"]["steps"] == 4 and state["stream"] == [0, 16]
    train(load_config(cfg), inside, registry, resume=True)
    assert "at step 4 of epoch 3 (pass 1, 16 of its steps taken)" in capsys.readouterr().err
    assert_same_run(whole, inside)


def test_resume_with_another_steps_per_epoch_is_refused(funnel_dir, tmp_path):
    cfg = config_file(tmp_path, funnel_dir, epochs=1)
    registry = load_registry()
    train(load_config(cfg), tmp_path / "run", registry)
    with pytest.raises(ConfigError, match=r"trained with train.steps_per_epoch 6; resume it with the same value \(not null\)"):
        train(load_config(cfg, ["train.steps_per_epoch=null", "train.epochs=2"]), tmp_path / "run", registry,
              resume=True)
