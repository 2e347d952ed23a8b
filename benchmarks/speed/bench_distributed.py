"""Data-parallel training: one process against ``torchrun --nproc-per-node 2`` (gloo, loopback, CPU).

The same config, the same global batch, the same data: ``recmtl datagen funnel`` (``--rows``, default
600,000: 480k training rows in 8 row groups, 7 of 65,536 rows and one of 21,248: each of the 2 ranks reads
3 whole row groups plus alternate rows of the 2 left over, 240,000 rows), a starter config from
``recmtl init`` (MMoE, click + ESMM conversion). Each round trains ``--epochs`` epochs three ways, in an
order that rotates between rounds:

* ``1 process x 2 threads`` (all cores to one process), ``1 process x 1 thread``;
* ``torchrun 2 processes x 1 thread`` (OMP_NUM_THREADS=1), so the two cores are split between ranks.

Reported: rows/s of the epoch loop (``rows_per_s`` in metrics.json: global rows over rank 0's epoch time;
no fit pass, validation or checkpoints) and the validation AUC of the last epoch. On a 2-core machine the
gain is bounded by the cores: the point is that the distributed run is correct at the same global batch.

Usage: python benchmarks/speed/bench_distributed.py [--rows 600000] [--rounds 2] [--epochs 1] [--work-dir DIR]
       [--kinds 2threads,1thread,torchrun]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RECMTL = str(Path(sys.executable).with_name("recmtl"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")


def train(kind: str, cfg: Path, out: Path, epochs: int, batch: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    common = ["train", str(cfg), "--out", str(out), "--set", f"train.epochs={epochs}",
              "--set", f"train.batch_size={batch}", "--set", "train.progress=false",
              "--set", "train.early_stopping.patience=0"]
    if kind == "1 process x 2 threads":
        run([RECMTL, *common, "--set", "train.threads=2"], {"OMP_NUM_THREADS": "2"})
    elif kind == "1 process x 1 thread":
        run([RECMTL, *common, "--set", "train.threads=1"], {"OMP_NUM_THREADS": "1"})
    else:
        run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
             "--master-addr", "127.0.0.1", f"--master-port={free_port()}", RECMTL, *common,
             "--set", "train.threads=1"], {"OMP_NUM_THREADS": "1"})
    history = json.loads((out / "metrics.json").read_text())["history"]
    return {"rows_per_s": statistics.median(h["rows_per_s"] for h in history), "rows": history[-1]["rows"],
            "auc": {t: m["auc"] for t, m in history[-1]["validation"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=600_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--kinds", default="2threads,1thread,torchrun",
                    help="comma-separated subset of 2threads, 1thread, torchrun")
    args = ap.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_dist_"))
    data = work / "data"
    if not (data / "train.parquet").exists():
        run([RECMTL, "datagen", "funnel", str(data), "--rows", str(args.rows), "--seed", "0"])
    cfg = work / "config.yaml"
    run([RECMTL, "init", str(data / "train.parquet"), "--task", "click", "--task", "conversion",
         "--head", "conversion=esmm", "--validation", str(data / "valid.parquet"), "--tower", "mmoe",
         "-o", str(cfg), "--force"])
    names = {"2threads": "1 process x 2 threads", "1thread": "1 process x 1 thread",
             "torchrun": "torchrun 2 processes x 1 thread"}
    kinds = [names[k] for k in args.kinds.split(",")]
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    for r in range(args.rounds):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        for kind in order:
            res = train(kind, cfg, work / "run", args.epochs, args.batch_size)
            results[kind].append(res)
            print(f"round {r + 1}  {kind:32s} {res['rows_per_s']:>10,.0f} rows/s  rows {res['rows']:,}  "
                  + "  ".join(f"{t} auc {a:.4f}" for t, a in res["auc"].items()), flush=True)
    print("\n| run | rows/s (median of rounds) | per round | validation AUC click / conversion (last round) |")
    print("|---|---|---|---|")
    for kind in kinds:
        rs = results[kind]
        med = statistics.median(x["rows_per_s"] for x in rs)
        per = " ".join(f"{x['rows_per_s']:,.0f}" for x in rs)
        auc = rs[-1]["auc"]
        print(f"| {kind} | {med:,.0f} | {per} | {auc.get('click', float('nan')):.4f} / "
              f"{auc.get('conversion', float('nan')):.4f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
