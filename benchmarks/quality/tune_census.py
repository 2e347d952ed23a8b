"""``recmtl tune`` on UCI census-income (the MMoE paper's task pair), pruning on vs off, on a row subset.

A bounded budget for a 2-core machine: ``--train-rows`` training rows and ``--valid-rows`` validation rows drawn
at random (seed 0) from the census benchmark's train and validation Parquet (``census_income.py``'s convert ->
split -> init, reused from ``--work-dir``), ``--epochs`` epochs per trial, ``--trials`` trials per mode, the same
TPE seed for both modes. Prints, per mode, the wall time, trials per hour, pruned trials and the best validation
mean AUC. The test split is not used: this measures the search, not the tuned model's test AUC.

Usage: python benchmarks/quality/tune_census.py [--trials 8] [--epochs 3] [--train-rows 10000] [--valid-rows 5000]
       [--work-dir DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from census_income import COMMON, DATA_DIR, TOWERS, prepare, recmtl_executable, run_cli  # noqa: E402

SPACE = {
    "optimizer.lr": {"float": [1.0e-3, 3.0e-2], "log": True},
    "tower.num_experts": {"int": [4, 12]},
    "encoders.categorical.dim": {"choice": [8, 16, 32]},
    "train.batch_size": {"choice": [256, 512, 1024]},
}


def subset(src: Path, dst: Path, rows: int) -> None:
    table = pq.read_table(src)
    import numpy as np
    idx = np.sort(np.random.default_rng(0).choice(table.num_rows, size=min(rows, table.num_rows), replace=False))
    pq.write_table(table.take(idx), dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-rows", type=int, default=10_000)
    ap.add_argument("--valid-rows", type=int, default=5_000)
    ap.add_argument("--work-dir", type=Path, default=None)
    args = ap.parse_args()
    if not DATA_DIR.is_dir():
        sys.exit(f"tune_census: {DATA_DIR} not found (see its SOURCE.md)")
    recmtl = recmtl_executable()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="tune-census-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = prepare(recmtl, work, DATA_DIR)
    subset(work / "train.parquet", work / "train_sub.parquet", args.train_rows)
    subset(work / "valid.parquet", work / "valid_sub.parquet", args.valid_rows)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["data"].update({"train": "train_sub.parquet", "validation": "valid_sub.parquet"})
    raw["data"].pop("test", None)
    for key, value in {**COMMON, "tower": TOWERS["mmoe"], "train.epochs": str(args.epochs),
                       "train.early_stopping.patience": "0", "train.log_every": "0"}.items():
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    raw.setdefault("encoders", {}).setdefault("categorical", {}).setdefault("name", "embedding")
    base = work / "tune_base.yaml"
    base.write_text(yaml.safe_dump(raw))
    space = work / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    print(f"budget: {args.trials} trials per mode, {args.epochs} epochs each, {args.train_rows} train / "
          f"{args.valid_rows} validation rows; space {SPACE}", file=sys.stderr)
    rows = []
    for pruner in ("median", "none"):
        out = work / f"tune-{pruner}"
        t0 = time.perf_counter()
        _, stdout = run_cli(recmtl, "tune", base.name, "--space", space.name, "--trials", str(args.trials), "--out",
                            out.name, "--pruner", pruner, "--seed", "0", "--study", f"census-{pruner}", cwd=work)
        seconds = time.perf_counter() - t0
        print(stdout, file=sys.stderr)
        last = [line for line in stdout.splitlines() if " complete, " in line][-1]
        rows.append((pruner, seconds, last))
    print("| pruner | wall (s) | trials/hour | result |")
    print("|---|---|---|---|")
    for pruner, seconds, last in rows:
        print(f"| {pruner} | {seconds:.0f} | {3600 * args.trials / seconds:.0f} | {last.split('; wrote')[0]} |")


if __name__ == "__main__":
    main()
