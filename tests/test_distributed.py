"""Data-parallel training under torchrun (gloo on CPU, loopback), the data sharding, --device and the
per-rank memory estimate."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import RECMTL, write_config
from torch import nn

from recmtl.data.parquet import ParquetSource, shard_units
from recmtl.training.device import resolve_precision
from recmtl.training.distributed import memory_estimate
from recmtl.training.evaluate import load_run, predict

TORCHRUN_TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc-per-node={nproc}",
            "--master-addr", "127.0.0.1", f"--master-port={free_port()}", RECMTL, *map(str, args)]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(*args: str, nproc: int = 2, timeout: int = TORCHRUN_TIMEOUT) -> subprocess.CompletedProcess:
    r = subprocess.run(torchrun_cmd(*args, nproc=nproc), capture_output=True, text=True, timeout=timeout, env=env(),
                       check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def config(tmp_path: Path, data_dir: Path, **train) -> Path:
    cfg = write_config(tmp_path / "c.yaml", data_dir)
    raw = yaml.safe_load(cfg.read_text())
    raw["train"].update({"threads": 1, **train})
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


# ---- sharding (no processes) ----------------------------------------------------------------------
def test_shard_units_deals_equal_groups_round_robin_and_shares_the_rest():
    assert shard_units([5, 3, 0, 1, 4, 2], [10] * 6, 2) == ([[5, 0, 4], [3, 1, 2]], set())
    # two groups of 100 rows: one each; three of 10: one each, the third shared row-wise (every rank 115 rows)
    assert shard_units([0, 1, 2, 3, 4], [100, 10, 10, 10, 100], 2) == ([[0, 1], [4, 2]], {3})
    assert shard_units([0, 1, 2], [7, 8, 9], 4) == ([[], [], [], []], {0, 1, 2})


@pytest.mark.parametrize("row_group_size", [1000, 1700, 100_000])  # all dealt / 8 dealt, 2 shared / 1 shared
def test_rank_shards_partition_the_rows(funnel_dir, tmp_path, row_group_size):
    table = pq.read_table(funnel_dir / "train.parquet", columns=["user_id"])
    table = table.append_column("row", pa.array(np.arange(table.num_rows)))
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=row_group_size)
    src = ParquetSource(str(tmp_path / "t.parquet"))
    seen = [np.concatenate([b.column("row").to_numpy() for b in
                            src.batches(read_rows=511, rng=np.random.default_rng([1, 0]), shard=(r, 2))])
            for r in range(2)]
    assert sorted(np.concatenate(seen).tolist()) == list(range(table.num_rows))
    # 16 groups of 1000: 8 each; otherwise at most one row per record batch read from a shared group
    assert abs(len(seen[0]) - len(seen[1])) <= (0 if row_group_size == 1000 else 2 + 16000 // 511)


# ---- memory estimate and devices -------------------------------------------------------------------
def test_memory_estimate_counts_parameters_gradients_and_optimizer_state():
    model = nn.Sequential(nn.Embedding(100, 8, sparse=True), nn.Linear(8, 4))
    balancer = nn.Module()
    table, dense = [model[0].weight], list(model[1].parameters())
    opts = [torch.optim.Adam(dense), torch.optim.SparseAdam(table)]
    est = memory_estimate(model, balancer, opts, table, rows_in_memory=1000, bytes_per_row=24)
    assert est == {"parameters": (800 + 36) * 4, "embedding_tables": 800 * 4, "gradients": 36 * 4,
                   "optimizer_state": 2 * 36 * 4 + 2 * 800 * 4, "data": 24_000,
                   "total": 836 * 4 + 36 * 4 + 2 * 836 * 4 + 24_000}


def test_train_prints_memory_and_auto_picks_cpu(cli, funnel_dir, tmp_path):
    cfg = config(tmp_path, funnel_dir, epochs=1)
    r = cli("train", cfg, "--out", tmp_path / "run", "--device", "auto")
    assert r.code == 0, r
    auto = resolve_precision("auto", torch.device("cpu"))  # bf16 on CPUs with AMX / AVX-512 BF16 (issue 21)
    assert f"memory per rank (estimate, 1 process(es) on cpu, {auto}): parameters" in r.err
    if not torch.cuda.is_available():
        r = cli("train", cfg, "--out", tmp_path / "run2", "--device", "cuda")
        assert r.code == 2 and "CUDA is not available" in r.err and "--device cpu" in r.err, r
        assert not (tmp_path / "run2").exists()


def test_global_batch_must_divide_by_world_size(cli, funnel_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    r = cli("train", config(tmp_path, funnel_dir), "--out", tmp_path / "run")
    assert r.code == 2 and "train.batch_size 512 is the global batch" in r.err, r


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_matches_fp32_quality(cli, funnel_dir, tmp_path, precision):
    """The autocast and loss-scaling path used on GPUs, run on CPU."""
    cfg = config(tmp_path, funnel_dir, epochs=2)
    out = {}
    for p in ("fp32", precision):
        assert cli("train", cfg, "--out", tmp_path / p, "--set", f"train.precision={p}").code == 0
        out[p] = json.loads((tmp_path / p / "metrics.json").read_text())["validation"]
    for task in ("click", "conversion"):
        assert abs(out[precision][task]["auc"] - out["fp32"][task]["auc"]) < 0.005


# ---- torchrun ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_match_one_process_quality(cli, funnel_dir, tmp_path):
    """Same global batch (512 = 2 x 256): validation AUC within 0.005 of a single process."""
    cfg = config(tmp_path, funnel_dir, epochs=3)
    assert cli("train", cfg, "--out", tmp_path / "one").code == 0
    r = torchrun("train", cfg, "--out", tmp_path / "two")
    assert r.stdout.count("run saved in") == 1  # only rank 0 prints
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for task in ("click", "conversion"):
        assert abs(one["validation"][task]["auc"] - two["validation"][task]["auc"]) < 0.005, (one, two)
        assert two["validation"][task]["rows"] == one["validation"][task]["rows"]  # all ranks' shares gathered
    assert [h["rows"] for h in two["history"]] == [h["rows"] for h in one["history"]] == [16000] * 3
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    # the sharded fit pass: the schema one process fits (tests/test_sharded_fit.py for shares of many row groups)
    assert (tmp_path / "two" / "schema.json").read_bytes() == (tmp_path / "one" / "schema.json").read_bytes()
    # dead head-input units over both ranks' validation rows: what one process counts on the same model
    run = load_run(tmp_path / "two", checkpoint="best")
    src = ParquetSource(str(funnel_dir / "valid.parquet"), run.config.columns())
    whole = predict(run.model, run.schema, src, run.config.train.eval_batch_size, units=True).units.dead_units()
    assert two["history"][two["best_epoch"] - 1]["diagnostics"]["dead_units"] == whole


SURGERY = '''
"""Test balancer: per-task gradients with torch.autograd.grad (bypassing any DDP hook), the conflicting
part projected out (PCGrad-style), plus a learnt parameter; dumps what each rank holds after each epoch."""
import os
import torch
from torch import nn
from recmtl import Balancer, hookimpl
from recmtl.gradients import backward_with_shared_gradient, task_gradients


class Surgery(Balancer):
    def __init__(self, task_names, weights, out=""):
        super().__init__(task_names, weights)
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.register_buffer("loss_ema", torch.zeros(len(task_names)))  # updated from each rank's own batch
        self.out = out
        self.shared = []

    def backward(self, losses, shared):
        self.shared = shared
        ls = [losses[t] for t in self.task_names]
        g = task_gradients(ls, shared)
        a, b = g[0], g[1]
        dot = a @ b
        if dot < 0:
            a = a - dot / b.norm().clamp_min(1e-12) ** 2 * b
        backward_with_shared_gradient(ls, [1.0, 1.0], shared, a + b)
        (self.log_scale.exp() * sum(x.detach() for x in ls) - self.log_scale).backward()
        self.loss_ema.mul_(0.9).add_(0.1 * torch.stack([x.detach() for x in ls]))
        return {t: 1.0 for t in self.task_names}

    def on_epoch_end(self, epoch, train_losses):
        torch.save({"shared": [p.detach().clone() for p in self.shared], "log_scale": self.log_scale.detach().clone(),
                    "loss_ema": self.loss_ema.clone(),
                    "train_losses": train_losses}, os.path.join(self.out, f"rank{os.environ.get('RANK', '0')}_{epoch}.pt"))


@hookimpl
def recmtl_register_balancers():
    return {"surgery": Surgery}
'''


def unequal_shards_surgery_config(funnel_dir, tmp_path, train: dict):
    """A config training on the funnel's rows rewritten in row groups of 1,701 (9 x 1,701 + 691 rows: shards of
    8,001 and 7,999 rows over 2 ranks) under the ``surgery`` balancer, which dumps each rank's state per epoch to
    ``tmp_path / "dumps"``; ``train`` updates the config's ``train`` section."""
    table = pq.read_table(funnel_dir / "train.parquet")
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=1701)
    (tmp_path / "surgery.py").write_text(SURGERY)
    (tmp_path / "dumps").mkdir()
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, plugins=[str(tmp_path / "surgery.py")],
                       balancer={"name": "surgery", "out": str(tmp_path / "dumps")})
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["train"] = str(tmp_path / "train.parquet")
    raw["train"].update(train)
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


@pytest.mark.slow
def test_ranks_hold_identical_parameters_with_gradient_surgery_and_unequal_shards(funnel_dir, tmp_path):
    """Shards of unequal size (8,001 and 7,999 rows: 4 row groups of 1,701 rows each, plus alternate rows of
    the 1,701- and 691-row groups left over) at 1,000 rows a step per rank: 9 batches on one rank, 8 on the
    other. Both must run 8 steps (no hang) and end every epoch with bit-identical parameters and balancer
    state under a gradient-surgery balancer."""
    cfg = unequal_shards_surgery_config(funnel_dir, tmp_path, {"threads": 1, "epochs": 2, "batch_size": 2000})
    torchrun("train", cfg, "--out", tmp_path / "run", timeout=90)
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    src = ParquetSource(str(tmp_path / "train.parquet"))
    for epoch in range(2):
        a, b = (torch.load(tmp_path / "dumps" / f"rank{r}_{epoch}.pt") for r in range(2))
        assert len(a["shared"]) > 0
        assert all(torch.equal(x, y) for x, y in zip(a["shared"], b["shared"]))
        assert torch.equal(a["log_scale"], b["log_scale"]) and a["train_losses"] == b["train_losses"]
        assert torch.equal(a["loss_ema"], b["loss_ema"]) and a["loss_ema"].min() > 0  # averaged every step
        # the rows trained: every rank stops when the first one runs out of batches
        held = [sum(b.num_rows for b in src.batches(2048, np.random.default_rng([1, epoch]), shard=(r, 2)))
                for r in range(2)]
        assert sorted(held) == [7999, 8001]
        assert history[epoch]["rows"] == 7999 + 8 * 1000
    final = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert torch.equal(final["balancer"]["log_scale"], a["log_scale"])


@pytest.mark.slow
def test_steps_per_epoch_takes_the_same_steps_on_every_rank_across_unequal_passes(funnel_dir, tmp_path):
    """train.steps_per_epoch 5 over passes of 8 steps (shards of 8,001 and 7,999 rows, 9 and 8 batches of 1,000):
    epochs end inside passes and span them, every rank takes 5 steps an epoch and holds the same parameters."""
    cfg = unequal_shards_surgery_config(funnel_dir, tmp_path, {"threads": 1, "epochs": 4, "batch_size": 2000,
                                                                "steps_per_epoch": 5, "early_stopping": {"patience": 0}})
    torchrun("train", cfg, "--out", tmp_path / "run", timeout=90)
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert [(h["steps"], h["pass"], h["pass_steps"]) for h in history] == [(5, 1, 5), (5, 2, 2), (5, 2, 7), (5, 3, 4)]
    # a pass's last step: 1,000 + 999 rows (the 7,999-row shard's last batch)
    assert [h["rows"] for h in history] == [10000, 9999, 10000, 9999]
    for epoch in range(4):
        a, b = (torch.load(tmp_path / "dumps" / f"rank{r}_{epoch}.pt") for r in range(2))
        assert all(torch.equal(x, y) for x, y in zip(a["shared"], b["shared"]))
        assert torch.equal(a["log_scale"], b["log_scale"]) and a["train_losses"] == b["train_losses"]


@pytest.mark.slow
def test_distributed_run_killed_after_first_checkpoint_resumes(funnel_dir, tmp_path):
    cfg = config(tmp_path, funnel_dir, epochs=50, early_stopping={"patience": 0})
    run = tmp_path / "run"
    proc = subprocess.Popen(torchrun_cmd("train", cfg, "--out", run), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env())
    deadline = time.time() + TORCHRUN_TIMEOUT
    while not (run / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (run / "last.pt").exists(), proc.communicate()[1].decode()[-3000:]
    # torchrun starts each rank in its own session: kill the agent and every rank, as a crash would
    victims = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    assert len(victims) >= 3
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in victims)
    done = len(json.loads((run / "metrics.json").read_text())["history"])
    assert 1 <= done < 50
    r = torchrun("train", cfg, "--out", run, "--resume", "--set", f"train.epochs={done + 1}")
    assert f"resuming {run} after epoch {done}" in r.stderr
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, done + 2))
    assert history[-1]["rows"] == 16000


def test_fp16_loss_scaling_through_the_balancer_contract():
    """Model gradients (from the task losses and from a term back-propagated on its own) and a balancer's
    own parameter get the true gradient after GradScaler unscales, whatever the scale."""
    from recmtl.training.device import Precision
    prec = Precision("fp16", torch.device("cpu"))
    w = nn.Parameter(torch.tensor([2.0]))
    s = nn.Parameter(torch.tensor([0.5]))  # a learnt loss weight (uncertainty-style), after the losses
    opt = torch.optim.SGD([w, s], lr=1.0)
    (0.5 * w ** 2).sum().backward()  # the separate term: d/dw = w = 2
    prec.scale_grads([w, s])
    loss = prec.scale_losses({"t": (3.0 * w).sum()})["t"]
    (s.exp() * loss - s).sum().backward()  # d/dw = 3 e^s; d/ds = e^s * 6 - 1
    assert prec.scaler.get_scale() == 65536.0
    prec.step([opt], unscaled=[s])
    e = float(np.exp(0.5))
    assert w.item() == pytest.approx(2.0 - (2.0 + 3 * e), rel=1e-6)
    assert s.item() == pytest.approx(0.5 - (6 * e - 1), rel=1e-6)
