"""Training threads on a shared CPU: `recmtl train` rows/s for several thread settings, on an idle machine and
beside a CPU-bound neighbour process that the benchmark starts itself.

Each run is a fresh `recmtl train` process (threads and the OpenMP wait policy are per-process state, fixed
when torch starts its pool) training one epoch of funnel data without validation; its rows/s is the epoch's
`rows_per_s` in metrics.json (the fit pass and start-up are not in it), its thread count at the start
(`threads.count` of run.json) and at the end of the epoch (metrics.json; the default's tuner may change it).
Rounds are interleaved: in every round each condition (idle, neighbour; their order alternates) runs every
setting (the order rotates), so slow drift of the machine's load hits all settings alike; reported are
medians over rounds and each setting's ratio to the best one of its condition. The 1-minute load average at
the start of each run is recorded: "idle" means no neighbour started by the benchmark, whatever else the
machine runs.

A setting is ``default`` (no `train.threads`) or a thread count, optionally with ``+ENV=VALUE`` parts
set in the run's environment, e.g. ``2+OMP_WAIT_POLICY=ACTIVE`` or ``default+GOMP_SPINCOUNT=300000``.
The neighbour is ``--neighbour-procs`` Python processes spinning in a loop (default 1: one core of a
2-core machine busy).

Usage: python benchmarks/speed/bench_threads.py [--rows 100000] [--rounds 5] [--settings default 1 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

RECMTL = str(Path(sys.executable).with_name("recmtl"))
SPIN = "import time\nwhile True:\n    pass\n"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_data(work: Path, rows: int, seed: int) -> Path:
    data = work / "funnel"
    if not (data / "train.parquet").is_file():
        from recmtl.data.synthetic import funnel
        log(f"generating {rows:,} rows of funnel data into {data}")
        funnel(data, rows, seed=seed, valid_fraction=0.0, test_fraction=0.0)
    return data / "train.parquet"


def make_config(train: Path, work: Path, batch_size: int) -> Path:
    """The funnel demo's model (26 categorical + 13 dense features, click + ESMM conversion, MMoE)."""
    from recmtl.data.starter import starter_config
    path = work / "config.yaml"
    cfg = starter_config(str(train), ["click", "conversion"], path, tower="mmoe")["config"]
    for t in cfg["tasks"]:
        if t["name"] == "conversion":
            t["head"] = "esmm"
    cfg["train"] = {"batch_size": batch_size, "epochs": 1, "progress": False,
                    "early_stopping": {"monitor": "loss", "patience": 0}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def parse_setting(spec: str) -> tuple[str | None, dict[str, str]]:
    threads, *envs = spec.split("+")
    env = dict(e.split("=", 1) for e in envs)
    return (None if threads == "default" else threads), env


def run_once(config: Path, run_dir: Path, spec: str) -> dict[str, Any]:
    threads, extra = parse_setting(spec)
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [RECMTL, "train", str(config), "--out", str(run_dir)]
    if threads is not None:
        cmd += ["--set", f"train.threads={threads}"]
    env = {**os.environ, **extra}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    info = json.loads((run_dir / "run.json").read_text())
    threads = info.get("threads")  # {"count", "source", ...}; absent before recmtl sized threads itself
    return {"rows_per_s": float(metrics["history"][0]["rows_per_s"]), "wall_s": round(wall, 2),
            "threads": threads.get("count") if isinstance(threads, dict) else threads,
            "threads_at_end": metrics["history"][0].get("threads"), "load1": load}


class Neighbour:
    """``procs`` CPU-bound processes (a Python busy loop each) for the duration of a ``with`` block."""

    def __init__(self, procs: int) -> None:
        self.procs = procs
        self.children: list[subprocess.Popen] = []

    def __enter__(self) -> Neighbour:
        self.children = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(self.procs)]
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        for child in self.children:
            child.kill()
            child.wait()


def machine() -> dict[str, Any]:
    model = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if ln.startswith("Model name")), "?")
    return {"cpu": model, "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000, help="training rows of funnel data")
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--settings", nargs="+", default=["default", "1", "2"])
    ap.add_argument("--conditions", nargs="+", default=["idle", "neighbour"], choices=["idle", "neighbour"])
    ap.add_argument("--neighbour-procs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", type=Path, default=None, help="keep data and runs here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = ap.parse_args(argv)

    result: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    rates: dict[str, dict[str, list[float]]] = {c: {s: [] for s in args.settings} for c in args.conditions}
    with tempfile.TemporaryDirectory(prefix="recmtl-threads-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        config = make_config(make_data(work, args.rows, args.seed), work, args.batch_size)
        for r in range(args.rounds):
            conditions = args.conditions if r % 2 == 0 else list(reversed(args.conditions))
            for condition in conditions:
                k = r % len(args.settings)
                order = args.settings[k:] + args.settings[:k]
                with Neighbour(args.neighbour_procs if condition == "neighbour" else 0):
                    for spec in order:
                        out = run_once(config, work / "run", spec)
                        rates[condition][spec].append(out["rows_per_s"])
                        result["runs"].append({"round": r + 1, "condition": condition, "setting": spec, **out})
                        log(f"round {r + 1}/{args.rounds} {condition:9s} {spec:28s} {out['rows_per_s']:9,.0f} rows/s"
                            f"  threads {out['threads']} -> {out['threads_at_end']}  load {out['load1']:.2f}")
    summary: dict[str, Any] = {}
    for condition, per in rates.items():
        medians = {s: statistics.median(v) for s, v in per.items()}
        best = max(medians.values())
        summary[condition] = {s: {"median": m, "min": min(per[s]), "max": max(per[s]), "vs_best": m / best}
                              for s, m in medians.items()}
    result["summary"] = summary
    m = result["machine"]
    print(f"machine: {m['cpu']}, {m['cpus']} CPUs ({m['affinity']} in affinity), {m['date']}; "
          f"{args.rows:,} rows, batch {args.batch_size}, medians of {args.rounds} interleaved rounds")
    print(f"{'condition':10s} {'setting':28s} {'median rows/s':>14s} {'min':>9s} {'max':>9s} {'vs best':>8s}")
    for condition, per in summary.items():
        for spec, s in per.items():
            print(f"{condition:10s} {spec:28s} {s['median']:14,.0f} {s['min']:9,.0f} {s['max']:9,.0f} {s['vs_best']:8.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
