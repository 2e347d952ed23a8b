"""The run directory as untrusted, damaged or contested input: no code from checkpoints, checksums, a lock,
interrupted writes swept, dead ends resumable, a full disk named."""
from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import RECMTL, write_config

from recmtl.errors import ConfigError, DataError
from recmtl.files import atomic_path
from recmtl.registry import load_registry
from recmtl.rundir import BEST, CHECKSUM_MAGIC, LAST, RunDir


@pytest.fixture(scope="module")
def trained(funnel_dir, tmp_path_factory) -> Path:
    """A one-epoch run; tests copy it before changing anything."""
    from recmtl.cli import main
    root = tmp_path_factory.mktemp("integrity")
    cfg = write_config(root / "c.yaml", funnel_dir, train={"batch_size": 1024, "epochs": 1, "progress": False})
    try:
        main(["train", str(cfg), "--out", str(root / "run")])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return root / "run"


def copy_run(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_is_refused_without_running_its_code(cli, trained, funnel_dir, tmp_path):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "pwned"
    state = torch.load(run / BEST, weights_only=True)
    state["extra"] = _Payload(str(marker))
    torch.save(state, run / BEST)  # no checksum trailer: as an attacker would write it
    for args in (("evaluate", run, funnel_dir / "test.parquet", "--checkpoint", "best"),
                 ("export", run, "-o", tmp_path / "m.onnx", "--checkpoint", "best")):
        r = cli(*args)
        assert r.code == 2 and "refusing to load" in r.err and "could run code" in r.err, r
        assert "Traceback" not in r.err
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()


def test_every_balancers_training_state_loads_as_weights_only(tmp_path):
    """What last.pt holds (model, balancer with its extra state, optimisers, RNGs, history) unpickles with
    weights_only=True for every registered balancer."""
    registry = load_registry()
    tasks = ["a", "b"]
    for name in registry.names("balancer"):
        torch.manual_seed(0)
        shared = torch.nn.Linear(3, 4)
        heads = torch.nn.ModuleDict({t: torch.nn.Linear(4, 1) for t in tasks})
        balancer = registry.create("balancer", name, tasks, {t: 1.0 for t in tasks})
        params = [*shared.parameters(), *heads.parameters(), *balancer.parameters()]
        opt = torch.optim.Adam(params, lr=0.01)
        for _ in range(3):
            h = shared(torch.randn(16, 3))
            losses = {t: heads[t](h).pow(2).mean() for t in tasks}
            opt.zero_grad()
            balancer.backward(losses, list(shared.parameters()))
            opt.step()
            balancer.on_epoch_end(0, {t: float(v.detach()) for t, v in losses.items()})
        state = {"model": shared.state_dict(), "balancer": balancer.state_dict(), "optimizers": [opt.state_dict()],
                 "epoch": 0, "best": 0.5, "history": [{"epoch": 1, "train_loss": {"a": 0.1}}],
                 "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}, "task_monitors": {"a": [0.7, 0, 0.2, 0]}}
        files = RunDir(tmp_path / name)
        files.save_checkpoint(LAST, state)
        loaded = files.load_checkpoint(LAST)
        again = registry.create("balancer", name, tasks, {t: 1.0 for t in tasks})
        again.load_state_dict(loaded["balancer"])
        random.setstate(loaded["rng"]["python"])


def flip(path: Path, offset: int, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    ("flipped", "is damaged: its content does not match the checksum"),
    ("truncated", "not a readable checkpoint"),
    ("empty", "is empty"),
    ("foreign", "not a readable checkpoint"),
])
def test_damaged_checkpoints_are_one_line_errors(cli, trained, funnel_dir, tmp_path, damage, message):
    run = copy_run(trained, tmp_path)
    best = run / BEST
    assert best.read_bytes()[-80:].find(CHECKSUM_MAGIC) >= 0  # training writes the checksum
    if damage == "flipped":
        flip(best, best.stat().st_size // 2)
    elif damage == "truncated":
        best.write_bytes(best.read_bytes()[: best.stat().st_size // 3])
    elif damage == "empty":
        best.write_bytes(b"")
    else:
        best.write_text("not a checkpoint at all\n" * 10)
    for args in (("evaluate", run, funnel_dir / "test.parquet", "--checkpoint", "best"),
                 ("export", run, "-o", tmp_path / "m.onnx", "--checkpoint", "best")):
        r = cli(*args)
        assert r.code == 2 and message in r.err and "Traceback" not in r.err, r
    assert not (tmp_path / "m.onnx").exists()


def test_checkpoints_without_a_checksum_still_load(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    state = torch.load(run / BEST, weights_only=True)
    torch.save(state, run / BEST)  # as written before checksums
    assert RunDir(run).load_checkpoint(BEST)["model"].keys() == state["model"].keys()


def test_best_without_last_is_resumable_from_the_start(cli, trained, funnel_dir, tmp_path):
    """A kill during the first last.pt write leaves best.pt alone: train explains, --resume starts over."""
    run = copy_run(trained, tmp_path)
    (run / LAST).unlink()
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, train={"batch_size": 1024, "epochs": 1, "progress": False})
    r = cli("train", cfg, "--out", run)
    assert r.code == 2 and f"no {LAST}" in r.err and "--resume" in r.err, r
    r = cli("train", cfg, "--out", run, "--resume")
    assert r.code == 0 and "training it again from the start" in r.err, r
    assert (run / LAST).is_file()


def test_a_second_train_into_the_same_folder_is_refused(cli, funnel_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, train={"batch_size": 1024, "epochs": 1, "progress": False})
    run = tmp_path / "run"
    with RunDir(run).lock():
        r = cli("train", cfg, "--out", run)
        assert r.code == 2 and "is in use by another `recmtl train` (process " in r.err and str(os.getpid()) in r.err, r
    assert not run.exists()  # the lock's folder was made for it and is removed again, empty
    with pytest.raises(ConfigError, match="in use"), RunDir(run).lock(), RunDir(run).lock():
        pass


def test_resume_sweeps_temporary_files_of_interrupted_writes(cli, trained, funnel_dir, tmp_path):
    run = copy_run(trained, tmp_path)
    left = [run / ".last.pt.abc123.tmp", run / "best_epochs" / ".epoch_0001.pt.x1.tmp"]
    for p in left:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"partial")
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, train={"batch_size": 1024, "epochs": 1, "progress": False})
    r = cli("train", cfg, "--out", run, "--resume")
    assert r.code == 0 and "removed 2 temporary file(s)" in r.err, r
    assert not any(p.exists() for p in left)


def test_a_full_disk_is_named(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no space left on the device to write .*out.json"):
        with atomic_path(tmp_path / "out.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []

    def failing_save(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1024))
    with pytest.raises(DataError, match=r"could not write .*last.pt: no space left on the device \(0.0 MB free\)"):
        RunDir(tmp_path / "run").save_checkpoint(LAST, {"x": 1})
    assert not (tmp_path / "run" / LAST).exists()


def children(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return {int(x) for x in out.stdout.split()}


@pytest.mark.slow
def test_killing_score_with_workers_ends_the_workers(trained, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recmtl.cli import main
    try:
        main(["export", str(trained), "-o", str(tmp_path / "m.onnx")])
    except SystemExit as exc:
        assert exc.code in (0, None)
    src = pq.read_table(_funnel_test(trained))
    big = pa.concat_tables([src] * 200)
    pq.write_table(big, tmp_path / "big.parquet", row_group_size=2000)
    proc = subprocess.Popen([RECMTL, "score", str(tmp_path / "m.onnx"), str(tmp_path / "big.parquet"), "-o",
                             str(tmp_path / "s.parquet"), "--workers", "2", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    workers: set[int] = set()
    while time.time() < deadline and proc.poll() is None:
        workers = {c for c in children(proc.pid) if c != proc.pid}
        writing = any(tmp_path.glob(".s.parquet.*.tmp"))
        if len(workers) >= 2 and writing:
            break
        time.sleep(0.02)
    assert len(workers) >= 2, "the score workers did not start"
    assert proc.poll() is None, "scoring finished before the kill: the input is too small for this machine"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() and _alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(Path(f"/proc/{w}").exists() and _alive(w) for w in workers), "workers outlived recmtl score"
    assert not (tmp_path / "s.parquet").exists()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def _funnel_test(trained: Path) -> Path:
    import yaml
    cfg = yaml.safe_load((trained / "config.yaml").read_text())
    return Path(cfg["data"]["validation"])


@pytest.mark.slow
def test_a_kill_mid_epoch_resumes_to_exactly_the_uninterrupted_result(funnel_dir, tmp_path):
    """train.checkpoint_every: last.pt inside the epoch; --resume continues from that step with the same batches
    (bit-identical parameters and losses at the end)."""
    train = {"batch_size": 256, "epochs": 2, "progress": False, "threads": 1, "checkpoint_every": 5,
             "early_stopping": {"patience": 0}}
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, train=train,
                       tower={"name": "mmoe", "num_experts": 2, "expert_units": [16], "task_units": [8], "dropout": 0.1})
    from conftest import run_subprocess
    whole = tmp_path / "whole"
    r = run_subprocess("train", cfg, "--out", whole)
    assert r.returncode == 0, r.stderr[-2000:]

    cut = tmp_path / "cut"
    proc = subprocess.Popen([RECMTL, "train", str(cfg), "--out", str(cut)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, killed_at = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        try:
            state = RunDir(cut).load_checkpoint(LAST)
        except (DataError, FileNotFoundError, OSError):
            state = None
        if state is not None and state.get("in_epoch") and state["in_epoch"]["epoch"] == 1 and state["in_epoch"]["steps"] >= 10:
            proc.send_signal(signal.SIGKILL)
            killed_at = state["in_epoch"]["steps"]
            break
        time.sleep(0.05)
    proc.wait()
    assert killed_at is not None, "training finished before it could be killed mid-epoch"
    r = run_subprocess("train", cfg, "--out", cut, "--resume")
    assert r.returncode == 0 and "of epoch 2" in r.stderr, r.stderr[-2000:]
    a, b = RunDir(whole).load_checkpoint(LAST), RunDir(cut).load_checkpoint(LAST)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    import json
    ha, hb = (json.loads((d / "metrics.json").read_text())["history"] for d in (whole, cut))
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]
    assert [h["validation"] for h in ha] == [h["validation"] for h in hb]
