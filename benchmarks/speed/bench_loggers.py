"""Per-epoch overhead of the logger plugins (none vs tensorboard vs mlflow) on a small training run.

Each round trains the same funnel config once per logger, in interleaved order; an epoch's time is the gap
between two consecutive ``recmtl_epoch_end`` calls (training steps, ``log_every`` step hooks, validation,
checkpoints and the loggers' epoch-end work), epochs 2..E of each run. Prints the median per logger and its
overhead against no logger, and the share of each run the training thread spent inside the life-cycle hook calls
(pluggy's hook-call monitoring: the loggers' direct cost, which load on a shared machine does not drown; the
mlflow logger's background sending thread is not in it). The mlflow logger needs a running server (``--mlflow-uri``).

Usage: python benchmarks/speed/bench_loggers.py [--rows 40000] [--epochs 4] [--rounds 3] [--log-every 20]
       [--mlflow-uri http://127.0.0.1:5000]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from recmtl import hookimpl
from recmtl.config import load_config
from recmtl.data.synthetic import funnel
from recmtl.registry import load_registry
from recmtl.training.loop import train


class EpochClock:
    def __init__(self) -> None:
        self.ends: list[float] = []

    @hookimpl
    def recmtl_epoch_end(self) -> None:
        self.ends.append(time.perf_counter())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--mlflow-uri", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-loggers-"))
    funnel(work / "data", rows=args.rows, seed=0, categorical=8, dense=4, cardinality=200)
    loggers = {"none": [], "tensorboard": [{"name": "tensorboard", "report": False}]}
    if args.mlflow_uri:
        loggers["mlflow"] = [{"name": "mlflow", "tracking_uri": args.mlflow_uri, "report": False}]
    cfg = {"seed": 1, "data": {"train": str(work / "data" / "train.parquet"), "validation": str(work / "data" / "valid.parquet"),
                               "shuffle_buffer": 8192, "read_rows": 4096},
           "features": [{"name": n, "kind": "categorical"} for n in ["user_id", "item_id", "c03", "c04", "c05", "c06", "c07", "c08"]]
           + [{"name": f"d0{i}", "kind": "dense"} for i in range(1, 5)],
           "tasks": [{"name": "click"}, {"name": "conversion", "head": "esmm", "params": {"ctr_task": "click"}}],
           "tower": {"name": "mmoe", "num_experts": 4, "expert_units": [64], "task_units": [16]},
           "train": {"batch_size": 512, "epochs": args.epochs, "progress": False, "threads": 1,
                     "log_every": args.log_every, "early_stopping": {"patience": 0}}}
    registry = load_registry()
    in_hooks = [0.0]  # seconds the training thread spends inside life-cycle hook calls (the loggers' direct cost)
    started: list[float] = []
    registry.pm.add_hookcall_monitoring(lambda name, impls, kw: started.append(time.perf_counter()),
                                        lambda outcome, name, impls, kw: in_hooks.__setitem__(
                                            0, in_hooks[0] + time.perf_counter() - started.pop()))
    times: dict[str, list[float]] = {name: [] for name in loggers}
    hook_share: dict[str, list[float]] = {name: [] for name in loggers}
    for r in range(args.rounds):
        order = list(loggers) if r % 2 == 0 else list(reversed(loggers))
        for name in order:
            path = work / f"{name}-{r}.yaml"
            path.write_text(yaml.safe_dump({**cfg, "loggers": loggers[name]}))
            clock = EpochClock()
            in_hooks[0] = 0.0
            t0 = time.perf_counter()
            train(load_config(path), work / "runs" / f"{name}-{r}", registry, observers=[clock])
            hook_share[name].append(in_hooks[0] / (time.perf_counter() - t0))
            gaps = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
            times[name] += gaps
            print(f"round {r + 1} {name}: epochs " + ", ".join(f"{g:.2f}" for g in gaps) + " s", file=sys.stderr)
    base = statistics.median(times["none"])
    print("| logger | epochs measured | median epoch (s) | vs none | time inside hook calls, share of the run (median) |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {len(values)} | {med:.3f} | {100 * (med - base) / base:+.1f}% | "
              f"{100 * statistics.median(hook_share[name]):.2f}% |")


if __name__ == "__main__":
    main()
