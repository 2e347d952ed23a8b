"""Labels (issue 23, item 3): standardised regression targets and multiclass classes that keep their values,
against the previous behaviour, on generated ratings data; and what the label summary costs.

The data (``ratings_data``): per row a dense ``x`` and a categorical ``c`` drive one effect; from it a 1-5 star
``rating`` (5 % null), a Poisson ``views`` count and ``watch`` seconds (log-normal, median ~55 s). Six tasks share
one shared-bottom tower: ``stars`` (multiclass on the rating), ``rating`` (regression), ``liked`` (``positive:
">=4"``), ``viewed`` (``positive: ">0"``), ``watch`` (regression with ``log1p``) and ``seconds`` (regression on the
same seconds without ``log1p``: MSE in seconds squared). Three variants:

* ``after``: the defaults: regression targets standardised inside the head, classes 1..5;
* ``before``: the previous behaviour, reproduced by config: ``standardize: false`` on the regression heads and
  ``num_classes: 6`` on stars (int labels within 0..5 become class ids 0..5: the phantom class 0 of K = max + 1);
* ``phantom``: ``after`` with ``num_classes: 6`` on stars only (the phantom class alone).

Each variant is trained with ``recmtl train`` (``recmtl.cli.main`` in this process, one thread) for at most
``--epochs`` epochs with early stopping on ``monitor: auto`` (the mean validation loss here: not every task has an
AUC), then scored on the test split of the best checkpoint. Reported: mean ± sample std over ``--seeds`` of the
test metrics, the regression tasks' share of the summed first-epoch training loss and the best epoch.

``--timing ROWS``: the fit pass (``fit_schema``) and the validation/test label summary (``split_summary``, label
columns only) on ``recmtl datagen funnel`` data of ROWS rows (two label columns), median of 3.

Usage: python benchmarks/quality/labels.py [--seeds 0,1,2] [--rows 20000] [--epochs 8] [--work-dir DIR]
       [--timing 200000] [--json results.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REGRESSION = ("rating", "watch", "seconds")
VARIANTS = ("before", "phantom", "after")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cli(*args: str) -> None:
    from recmtl.cli import main
    try:
        with contextlib.redirect_stdout(sys.stderr):  # recmtl's tables: the log, not this script's output
            main([str(a) for a in args])
    except SystemExit as exc:
        if exc.code not in (0, None):
            sys.exit(f"labels: `recmtl {' '.join(map(str, args))}` failed with exit {exc.code}")


def ratings_data(path: Path, rows: int, seed: int) -> None:
    """train/valid/test Parquet (rows, rows/5, rows/5): ratings 1..5, a view count and watch seconds."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", rows), ("valid", rows // 5), ("test", rows // 5)):
        x, c = rng.normal(size=n), rng.integers(0, 50, n)
        effect = 1.2 * x + 0.8 * np.sin(c) - 0.2
        rating = np.clip(np.round(3 + effect + rng.normal(0, 0.7, n)), 1, 5).astype(np.int64)
        views = rng.poisson(np.exp(0.6 * effect))
        watch = np.expm1(4.0 + 0.8 * effect + rng.normal(0, 0.4, n))
        pq.write_table(pa.table({"x": x, "c": c, "rating": pa.array(rating, mask=rng.random(n) < 0.05),
                                 "views": views, "watch": watch}), path / f"{split}.parquet")


def config(data: Path, seed: int, variant: str, epochs: int) -> dict[str, Any]:
    before = variant == "before"
    plain = {"standardize": False} if before else {}
    phantom = variant in ("before", "phantom")
    return {
        "seed": seed,
        "data": {"train": str(data / "train.parquet"), "validation": str(data / "valid.parquet"),
                 "test": str(data / "test.parquet"), "shuffle_buffer": 65536},
        "features": [{"name": "x", "kind": "dense"}, {"name": "c", "kind": "categorical"}],
        "tasks": [{"name": "stars", "label": "rating", "head": "multiclass", "params": {"num_classes": 6} if phantom else {}},
                  {"name": "rating", "head": "regression", "params": plain},
                  {"name": "liked", "label": "rating", "positive": ">=4"},
                  {"name": "viewed", "label": "views", "positive": ">0"},
                  {"name": "watch", "head": "regression", "params": {"log1p": True, **plain}},
                  {"name": "seconds", "label": "watch", "head": "regression", "params": plain}],
        "encoders": {"categorical": {"name": "embedding", "dim": 8}},
        "tower": {"name": "shared_bottom", "bottom_units": [64], "task_units": [16]},
        "optimizer": {"lr": 0.003},
        "train": {"batch_size": 256, "epochs": epochs, "progress": False, "threads": 1, "log_every": 0,
                  "early_stopping": {"monitor": "auto", "patience": 2}},
    }


def run_one(work: Path, data: Path, seed: int, variant: str, epochs: int) -> dict[str, Any]:
    run = work / f"run-{variant}-{seed}"
    cfg = work / f"{variant}-{seed}.yaml"
    cfg.write_text(yaml.safe_dump(config(data, seed, variant, epochs)))
    t0 = time.perf_counter()
    cli("train", cfg, "--out", run)
    seconds = time.perf_counter() - t0
    m = json.loads((run / "metrics.json").read_text())
    first = m["history"][0]["train_loss"]
    test = m["test"]
    return {"variant": variant, "seed": seed, "best_epoch": m["best_epoch"], "epochs": len(m["history"]),
            "seconds": round(seconds, 1),
            "regression_loss_share": sum(first[t] for t in REGRESSION) / sum(first.values()),
            "stars_accuracy": test["stars"]["accuracy"], "stars_logloss": test["stars"]["logloss"],
            "rating_rmse": test["rating"]["rmse"], "liked_auc": test["liked"]["auc"],
            "viewed_auc": test["viewed"]["auc"], "watch_rmse": test["watch"]["rmse"], "watch_mae": test["watch"]["mae"],
            "seconds_rmse": test["seconds"]["rmse"]}


COLUMNS = [("stars_accuracy", "stars accuracy", 4), ("stars_logloss", "stars logloss", 4), ("rating_rmse", "rating RMSE", 4),
           ("liked_auc", "liked AUC", 4), ("viewed_auc", "viewed AUC", 4), ("watch_rmse", "watch RMSE (s)", 2),
           ("watch_mae", "watch MAE (s)", 2), ("seconds_rmse", "seconds RMSE (s)", 2),
           ("regression_loss_share", "regression share of epoch-1 loss", 3)]


def table(results: list[dict[str, Any]]) -> str:
    def cell(values: list[float], digits: int) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"
    lines = ["| variant | " + " | ".join(c[1] for c in COLUMNS) + " | best epoch (seeds) |",
             "|---|" + "---|" * (len(COLUMNS) + 1)]
    for variant in VARIANTS:
        rows = [r for r in results if r["variant"] == variant]
        if rows:
            lines.append(f"| {variant} | " + " | ".join(cell([r[k] for r in rows], d) for k, _, d in COLUMNS)
                         + " | " + ", ".join(str(r["best_epoch"]) for r in rows) + " |")
    return "\n".join(lines)


def timing(work: Path, rows: int) -> dict[str, float]:
    from recmtl.config import parse_config
    from recmtl.data.parquet import ParquetSource
    from recmtl.data.synthetic import funnel
    from recmtl.registry import load_registry
    from recmtl.schema import fit_schema
    from recmtl.schema.summary import split_summary
    data = work / "funnel"
    funnel(data, rows=rows, seed=0)
    names = pq.read_schema(data / "train.parquet").names
    features = [{"name": n, "kind": "categorical" if n.startswith("c") or n.endswith("_id") else "dense"}
                for n in names if n not in ("click", "conversion")]
    cfg = parse_config({"data": {"train": str(data / "train.parquet")}, "features": features,
                        "tasks": [{"name": "click"}, {"name": "conversion", "head": "esmm"}]})
    registry = load_registry()
    heads = {t.name: registry.get("head", t.head) for t in cfg.tasks}
    src = ParquetSource(cfg.data.train, cfg.columns())
    fits, summaries = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        schema = fit_schema(cfg, src, heads)
        fits.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        split_summary(schema.labels, src, cfg.data.read_rows)
        summaries.append(time.perf_counter() - t0)
    return {"rows": schema.num_rows, "fit_s": statistics.median(fits), "summary_s": statistics.median(summaries)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--work-dir", type=Path)
    ap.add_argument("--timing", type=int, default=0, metavar="ROWS")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="labels-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        data = work / f"data-{seed}"
        ratings_data(data, args.rows, seed)
        for variant in VARIANTS:  # interleaved, so load changes hit all alike
            results.append(run_one(work, data, seed, variant, args.epochs))
            log(json.dumps(results[-1]))
    out: dict[str, Any] = {"results": results, "python": platform.python_version(),
                           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if results:
        print(table(results))
    if args.timing:
        out["timing"] = timing(work, args.timing)
        t = out["timing"]
        print(f"\nfit pass on {t['rows']:,} rows: {t['fit_s']:.2f} s; label summary (label columns only): "
              f"{t['summary_s']:.3f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
