"""Test AUC with and without ``features[].max_distinct`` on the funnel generator's long tail (issue #22).

For each seed: ``recmtl datagen funnel --tail`` (a Zipf-popular ``tail_id`` with strong per-id effects), then
``recmtl train`` with ``tail_id: max_size`` and each cap (``none``: the exact vocabulary), reading the test AUC
of each task from the run's metrics.json.

    .venv/bin/python benchmarks/quality/vocab_cap_auc.py --seeds 1,2,3 --caps none,2000,1000
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

RECMTL = str(Path(sys.executable).with_name("recmtl"))


def _find_auc(metrics: dict, task: str) -> float:
    test = metrics.get("test") or {}
    value = (test.get(task) or {}).get("auc") if isinstance(test.get(task), dict) else test.get(f"{task}/auc")
    return float(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--tail", type=int, default=50_000)
    ap.add_argument("--max-size", type=int, default=1000)
    ap.add_argument("--caps", default="none,2000,1000")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--work-dir", default="/tmp/vocab_cap_auc")
    args = ap.parse_args()
    work = Path(args.work_dir)
    rows = []
    for seed in map(int, args.seeds.split(",")):
        data = work / f"data{seed}"
        if not (data / "train.parquet").exists():
            subprocess.run([RECMTL, "datagen", "funnel", str(data), "--rows", str(args.rows), "--seed", str(seed),
                            "--tail", str(args.tail), "--categorical", "4", "--dense", "2"], check=True,
                           capture_output=True)
        for cap in args.caps.split(","):
            tail = {"name": "tail_id", "kind": "categorical", "max_size": args.max_size}
            if cap != "none":
                tail["max_distinct"] = int(cap)
            cfg = {"seed": seed,
                   "data": {"train": str(data / "train.parquet"), "validation": str(data / "valid.parquet"),
                            "test": str(data / "test.parquet")},
                   "features": [{"name": n, "kind": "categorical"} for n in ["user_id", "item_id", "c03", "c04"]]
                   + [tail] + [{"name": n, "kind": "dense"} for n in ["d01", "d02"]],
                   "tasks": [{"name": "click", "head": "binary"},
                             {"name": "conversion", "head": "esmm", "params": {"ctr_task": "click"}}],
                   "encoders": {"categorical": {"name": "embedding", "dim": 8}},
                   "tower": {"name": "shared_bottom", "bottom_units": [32], "task_units": [16]},
                   "optimizer": {"lr": 0.005},
                   "train": {"batch_size": 512, "epochs": args.epochs, "progress": False}}
            path = work / f"seed{seed}_cap{cap}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            run = work / f"run_seed{seed}_cap{cap}"
            out = subprocess.run([RECMTL, "train", str(path), "--out", str(run)], capture_output=True,
                                 text=True)
            if out.returncode != 0:
                sys.exit(out.stderr)
            metrics = json.loads((run / "metrics.json").read_text())
            rows.append((seed, cap, _find_auc(metrics, "click"), _find_auc(metrics, "conversion")))
            print(rows[-1], flush=True)
    print("| seed | max_distinct | test AUC click | test AUC conversion |")
    print("|---|---|---|---|")
    for seed, cap, a, b in rows:
        print(f"| {seed} | {cap} | {a:.4f} | {b:.4f} |")


if __name__ == "__main__":
    main()
