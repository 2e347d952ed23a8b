"""Cost of the trainer's balance log (``train.log_every``): per-task gradients on the shared parameters
and their norms/cosines, written to ``balance.jsonl`` every N steps.

The pieces of the real training loop (the funnel data through recmtl's Parquet pipeline, ``MultiTaskModel``
with the default MMoE sizes, the trainer's optimisers and balancer, batch size 2048) time training steps
with and without a balance-log line, alternating step by step so that both see the same machine load.
The cost of one line is the difference of the median step times; the overhead at ``log_every = N`` is
that cost / (N x median step time without logging).

Usage: python benchmarks/speed/bench_balance_log.py [--rows 100000] [--steps 60] [--balancer fixed] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from recmtl.config import parse_config
from recmtl.data.parquet import ParquetSource
from recmtl.data.synthetic import funnel
from recmtl.registry import load_registry
from recmtl.schema import fit_schema
from recmtl.training.balance_log import BalanceLog
from recmtl.training.batches import blocks, minibatches
from recmtl.training.model import MultiTaskModel, validate_plugins
from recmtl.training.optimizers import make_optimizers


def config(data: Path, balancer: str):
    raw = {
        "seed": 0,
        "data": {"train": str(data / "train.parquet")},
        "features": [{"name": n, "kind": "categorical"} for n in ["user_id", "item_id"] + [f"c{i:02d}" for i in range(3, 9)]]
        + [{"name": f"d{i:02d}", "kind": "dense"} for i in range(1, 5)],
        "tasks": [{"name": "click", "head": "binary"},
                  {"name": "conversion", "head": "esmm", "params": {"ctr_task": "click"}}],
        "tower": {"name": "mmoe"},  # defaults: 4 experts [256, 128], task towers [64]
        "balancer": {"name": balancer},
    }
    return parse_config(raw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per side")
    ap.add_argument("--balancer", default="fixed")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    registry = load_registry()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        funnel(data, rows=args.rows, seed=0, categorical=8, dense=4)
        cfg = config(data, args.balancer)
        heads = validate_plugins(cfg, registry)
        src = ParquetSource(str(data / "train.parquet"), cfg.columns())
        schema = fit_schema(cfg, src, {t.name: heads[t.name] for t in cfg.tasks}, lambda n: None)
        model = MultiTaskModel(cfg, schema, registry)
        balancer = registry.create("balancer", args.balancer, model.task_names, {t: 1.0 for t in model.task_names})
        optimizers = make_optimizers(cfg, model, balancer)
        shared = model.shared_parameters()
        rng = np.random.default_rng(0)
        batches = list(minibatches(blocks(src, schema, cfg.data.read_rows, rng), cfg.train.batch_size,
                                   cfg.data.shuffle_buffer, rng))
        log = BalanceLog(Path(tmp) / "balance.jsonl", 1, model.task_names)
        times: dict[bool, list[float]] = {False: [], True: []}
        model.train()
        for i in range(2 * args.steps + 4):
            with_log = bool(i % 2)
            batch = batches[i % len(batches)]
            t0 = time.perf_counter()
            losses = model.losses(model(batch.inputs), batch.labels, batch.mask)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            if with_log:
                log.before_backward(losses, shared)
            applied = balancer.backward(losses, shared)
            if with_log:
                log.after_backward(1, applied)
            for opt in optimizers:
                opt.step()
            if i >= 4:  # warm-up
                times[with_log].append(time.perf_counter() - t0)
        shared_values = sum(p.numel() for p in shared if p.requires_grad)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    per_line = on - off
    print(f"MMoE (4 experts [256, 128]), batch {cfg.train.batch_size}, {shared_values:,} shared values, "
          f"balancer {args.balancer}, {args.threads} threads, {args.steps} steps per side")
    print(f"median step: {1000 * off:.1f} ms without a log line, {1000 * on:.1f} ms with one")
    print(f"one log line: {1000 * per_line:.1f} ms = {per_line / off:.2f} steps")
    for n in (200, 50):
        print(f"overhead at log_every={n}: {100 * per_line / (n * off):.2f}%")


if __name__ == "__main__":
    main()
