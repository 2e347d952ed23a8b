"""Training threads sized from the CPUs actually free (affinity, cgroup quota, other processes' load), and
progress that writes plain lines, no carriage returns, when stderr is not a terminal."""
from __future__ import annotations

import io
import json

from conftest import run_subprocess, write_config

from recmtl.threads import Cpus, ThreadTuner, auto_threads, cgroup_cpu_limit


def fake_root(tmp_path, cgroup: str, files: dict[str, str]):
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_cgroup_v2_quota_is_the_smallest_along_the_path(tmp_path):
    root = fake_root(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "max 100000\n",
        "sys/fs/cgroup/kubepods/pod1/cpu.max": "250000 100000\n",
        "sys/fs/cgroup/kubepods/cpu.max": "800000 100000\n"})
    assert cgroup_cpu_limit(root) == 2.5
    assert Cpus(affinity=16, quota=2.5).usable == 2 and Cpus(affinity=16, quota=0.5).usable == 1
    assert Cpus(affinity=2, quota=None).usable == 2


def test_cgroup_v1_quota_and_no_quota(tmp_path):
    v1 = fake_root(tmp_path / "v1", "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n", {
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000\n",
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_limit(v1) == 1.5
    none = fake_root(tmp_path / "none", "1:cpu:/\n0::/\n", {"sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n",
                                                          "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_limit(none) is None
    assert cgroup_cpu_limit(tmp_path / "missing") is None


def test_auto_threads_one_per_usable_cpu():
    assert auto_threads(ceiling=8, cpus=Cpus(2, None)) == 2
    assert auto_threads(ceiling=8, local_world=2, cpus=Cpus(16, 2.5)) == 1  # 2 CPUs shared by 2 ranks
    assert auto_threads(ceiling=4, cpus=Cpus(16, None)) == 4  # torch's own default (OMP_NUM_THREADS) caps it
    assert auto_threads(ceiling=8, local_world=4, cpus=Cpus(2, None)) == 1


def simulate(speed, high: int = 2, steps: int = 3000, rows: int = 2048) -> tuple[ThreadTuner, dict[int, float]]:
    """Run ``steps`` steps whose speed (rows/s) is ``speed(threads, step)``; returns the tuner and the compute
    seconds spent at each thread count."""
    tuner = ThreadTuner(high)
    applied, spent = tuner.current, {}
    for i in range(steps):
        seconds = rows / speed(applied, i)
        spent[applied] = spent.get(applied, 0.0) + seconds
        if (changed := tuner.step(rows, seconds)) is not None:
            applied = changed
        if i == steps // 3:
            tuner.pause()  # an epoch boundary
    assert applied == tuner.current
    return tuner, spent


def test_tuner_keeps_the_faster_count_at_a_small_cost():
    tuner, spent = simulate(lambda n, i: {2: 8000, 1: 5000}[n])  # idle: 2 threads faster
    assert tuner.current == 2 and tuner.switches == 0
    assert spent[1] / sum(spent.values()) < 0.04  # probing the slower count costs little
    tuner, spent = simulate(lambda n, i: {2: 4000, 1: 5000}[n])  # busy: 1 thread faster
    assert tuner.current == 1 and spent[1] / sum(spent.values()) > 0.9


def test_tuner_follows_a_change_of_load_and_walks_the_ladder():
    tuner, _ = simulate(lambda n, i: ({2: 4000, 1: 5000} if i < 1500 else {2: 8000, 1: 5000})[n], steps=4000)
    assert tuner.current == 2 and tuner.switches == 2
    tuner, spent = simulate(lambda n, i: {16: 3000, 8: 5000, 4: 6000, 2: 4000, 1: 2500}[n], high=16, steps=6000)
    assert tuner.ladder == [16, 8, 4, 2, 1] and tuner.current == 4 and 1 not in spent
    assert not ThreadTuner(1).enabled and ThreadTuner(1).step(2048, 0.1) is None


def test_wait_policy_is_passive_unless_chosen(monkeypatch):
    import sys

    from recmtl import threads
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as before torch is imported
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    assert threads.set_wait_policy() == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert threads.set_wait_policy() == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    assert threads.set_wait_policy() is None


def test_run_json_records_the_threads_and_no_carriage_returns_in_logs(funnel_dir, tmp_path):
    """A real `recmtl train` with stderr to a pipe (as in CI or `make demo > log`): no tqdm frames, the per-epoch
    lines; run.json holds the resolved thread count."""
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, train={"batch_size": 512, "epochs": 1, "progress": True})
    r = run_subprocess("train", cfg, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "%|" not in r.stderr  # no tqdm frames, not even one per line
    assert "epoch 1:" in r.stderr
    info = json.loads((tmp_path / "run" / "run.json").read_text())["threads"]
    assert info["source"] == "auto" and info["count"] == auto_threads(torch_threads(), 1)
    assert info["cpu_affinity"] >= 1 and info["omp_wait_policy"] == "PASSIVE"
    r = run_subprocess("train", cfg, "--out", tmp_path / "run1", "--set", "train.threads=1")
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "run1" / "run.json").read_text())["threads"]
    assert info["source"] == "train.threads" and info["count"] == 1


def torch_threads() -> int:
    """torch's own default in a fresh process (this one may have changed it)."""
    import subprocess
    import sys
    code = "import torch; print(torch.get_num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_line_progress_writes_plain_lines():
    from recmtl.progress import progress
    out = io.StringIO()
    with progress(20_000, "epoch 1/3", file=out, interval=0) as bar:
        bar.update(5000)
        bar.set_postfix({"click": "0.4100"}, refresh=False)
        bar.update(5000)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[0].startswith("epoch 1/3: 25% 5,000/20,000 rows,") and lines[1].endswith("click=0.4100")
    quiet = io.StringIO()
    with progress(10, "x", enabled=False, file=quiet, interval=0) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""


def test_score_progress_is_plain_when_not_a_terminal(cli, funnel_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, train={"batch_size": 1024, "epochs": 1, "progress": False})
    assert cli("train", cfg, "--out", tmp_path / "run").code == 0
    assert cli("export", tmp_path / "run", "-o", tmp_path / "m.onnx").code == 0
    r = cli("score", tmp_path / "m.onnx", funnel_dir / "test.parquet", "-o", tmp_path / "s.parquet")
    assert r.code == 0, r
    assert "\r" not in r.err and "%|" not in r.err
