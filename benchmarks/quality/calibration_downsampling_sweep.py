"""Why the downsampling correction missed ±3 % on one seed (issue 19): train click + ESMM on the funnel with the
non-clicks kept at ``--rate`` under one training setting (``--set key=value``, as ``recmtl train --set``) and print
click's corrected calibration ratio on the full-rate test split, with the epoch it was scored from.

Reads the data ``calibration.py --work-dir DIR`` wrote (``DIR/data{seed}/``, ``train_neg{rate}.parquet``); the base
config is ``calibration.py``'s (lr 0.003, batch 1024, 3 epochs, patience 1). One JSON line per seed on stdout.

Usage: python benchmarks/quality/calibration_downsampling_sweep.py --work-dir DIR --name NAME [--seeds 1,2,3]
       [--rate 0.1] [--set optimizer.lr=0.001 --set train.batch_size=4096 ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from calibration import recmtl, write_config  # noqa: E402

from recmtl import metrics as M  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--name", required=True, help="the setting's name: runs go to WORK/sweep_NAME_s{seed}")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    for seed in map(int, args.seeds.split(",")):
        data = args.work_dir / f"data{seed}"
        run = args.work_dir / f"sweep_{args.name}_s{seed}"
        cfg = args.work_dir / f"sweep_{args.name}_s{seed}.yaml"
        write_config(cfg, data, data / f"train_neg{args.rate:g}.parquet", args.rate)
        if not (run / "metrics.json").exists():
            recmtl("train", cfg, "--out", run, *(a for o in args.overrides for a in ("--set", o)))
        test = data / "test.parquet"
        pred = run.with_suffix(".pred.parquet")
        subprocess.run([str(Path(sys.executable).with_name("recmtl")), "evaluate", run, test, "--save-predictions", pred,
                        "--no-calibration"], check=True, stdout=subprocess.DEVNULL)
        y = pq.read_table(test, columns=["click"])["click"].to_numpy().astype(float)
        p = pq.read_table(pred)["click"].to_numpy().astype(np.float64)
        m = json.loads((run / "metrics.json").read_text())
        print(json.dumps({"name": args.name, "seed": seed, "set": args.overrides,
                          "ratio": round(M.calibration_ratio(y, p), 4), "ece": round(M.ece(y, p), 4),
                          "auc": round(M.auc(y, p), 4), "epochs_run": len(m["history"]),
                          "click_epoch": m["task_best"]["click"]["epoch"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
