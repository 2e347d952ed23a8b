"""Balancers on batches without labels for a task: funnel data whose conversion labels are mostly null.

A task with no labelled row in a batch has a zero loss and an all-zero gradient on that step. This trains
each balancer on funnel data (``recmtl.data.synthetic.funnel``) in which only ``--labelled`` of the training
rows keep their conversion label (the validation split keeps all of them), with batches small enough that
many steps see no conversion label at all, and prints each task's validation AUC. Both tasks use the
``binary`` head, so the conversion AUC is over every validation row. Runs go through ``recmtl train`` (the
CLI's ``main``, in-process), one torch thread.

To compare with another checkout of recmtl, run this script with ``PYTHONPATH`` set to that checkout
(the script's own folder, not the current one, is first on ``sys.path``).

Usage: python benchmarks/quality/unlabelled_batches.py [--balancers imtl,mgda,...] [--work-dir DIR] [--json FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

import recmtl
from recmtl.cli import main as recmtl_main
from recmtl.data.synthetic import funnel


def masked_funnel(out: Path, rows: int, labelled: float) -> None:
    """Funnel data in ``out``; the training split keeps the conversion label on a ``labelled`` share of rows."""
    funnel(out, rows=rows, seed=3, categorical=6, dense=4, cardinality=50)
    train = pq.read_table(out / "train.parquet")
    keep = np.random.default_rng(0).random(train.num_rows) < labelled
    labels = pa.array(np.where(keep, train["conversion"].to_numpy(), 0), mask=~keep, type=pa.int8())
    column = train.schema.get_field_index("conversion")
    pq.write_table(train.set_column(column, "conversion", labels), out / "train.parquet")


def config(path: Path, data: Path, balancer: str, seed: int, batch_size: int, epochs: int) -> Path:
    cfg = {
        "seed": seed,
        "data": {"train": str(data / "train.parquet"), "validation": str(data / "valid.parquet"),
                 "shuffle_buffer": 4096, "read_rows": 2048},
        "features": [{"name": n, "kind": "categorical"} for n in ["user_id", "item_id", "c03", "c04", "c05", "c06"]]
        + [{"name": f"d0{i}", "kind": "dense"} for i in range(1, 5)],
        "tasks": [{"name": "click", "head": "binary"}, {"name": "conversion", "head": "binary"}],
        "encoders": {"categorical": {"name": "embedding", "dim": 8}},
        "tower": {"name": "mmoe", "num_experts": 2, "expert_units": [32], "task_units": [16]},
        "balancer": {"name": balancer},
        "optimizer": {"lr": 0.005},
        "train": {"batch_size": batch_size, "epochs": epochs, "progress": False, "threads": 1, "log_every": 0},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--balancers", default="fixed,imtl,mgda,cagrad,famo", help="comma-separated")
    ap.add_argument("--seeds", default="1", help="comma-separated training seeds")
    ap.add_argument("--rows", type=int, default=20_000, help="funnel rows over all splits (80/10/10)")
    ap.add_argument("--labelled", type=float, default=0.01, help="share of training rows with a conversion label")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--work-dir", type=Path, default=None, help="data and runs (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="unlabelled-"))
    data = work / "data"
    masked_funnel(data, args.rows, args.labelled)
    share = (1 - args.labelled) ** args.batch_size
    print(f"recmtl from {Path(recmtl.__file__).parent}; {share:.0%} of the training batches are expected to hold "
          f"no conversion label (labelled share {args.labelled}, batch {args.batch_size})", flush=True)
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.balancers.split(","):
            run = work / f"{name}-s{seed}"
            shutil.rmtree(run, ignore_errors=True)
            t0 = time.perf_counter()
            cfg = config(work / f"{name}-s{seed}.yaml", data, name, seed, args.batch_size, args.epochs)
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                    recmtl_main(["train", str(cfg), "--out", str(run)])
            except SystemExit as exc:  # the CLI exits; a non-zero code is a failed run
                if exc.code not in (0, None):
                    raise RuntimeError(f"recmtl train {name} exited {exc.code}: {out.getvalue()[-300:]}") from None
            metrics = json.loads((run / "metrics.json").read_text())
            auc = {t: round(v["auc"], 4) for t, v in metrics["validation"].items()}
            results.append({"balancer": name, "seed": seed, "auc": auc, "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(results[-1]), flush=True)
    print("\n| balancer | seed | click AUC | conversion AUC |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['balancer']} | {r['seed']} | {r['auc']['click']:.4f} | {r['auc']['conversion']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
