"""``recmtl tune`` on UCI census-income (the MMoE paper's task pair), pruning on vs off, on a row subset.

A bounded budget for a 2-core machine: ``--train-rows`` training rows and ``--valid-rows`` validation rows drawn
at random (seed 0) from the census benchmark's train and validation Parquet (``census_income.py``'s convert ->
split -> init, reused from ``--work-dir``), ``--epochs`` epochs per trial, ``--trials`` trials per mode, the same
TPE seed for both modes. Prints, per mode, the wall time, trials per hour, pruned trials and the best validation
mean AUC. The test split is not used: this measures the search, not the tuned model's test AUC.

With ``--final-seeds 1,2,3`` it is the paper-protocol search instead: one study with the median pruner over
``FINAL_SPACE`` (``--train-rows 0 --valid-rows 0``: all rows), early stopping inside each trial, then the best
config (``best.yaml``) trained on the full training data with each seed and evaluated on the test split; prints
the mean test AUC per task beside the untuned census benchmark's and the PLE paper's numbers.

Usage: python benchmarks/quality/tune_census.py [--trials 8] [--epochs 3] [--train-rows 10000] [--valid-rows 5000]
       [--work-dir DIR] [--final-seeds 1,2,3 [--widths] [--workers K]]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from census_income import COMMON, DATA_DIR, TASKS, TOWERS, prepare, recmtl_executable, run_cli  # noqa: E402

SPACE = {
    "optimizer.lr": {"float": [1.0e-3, 3.0e-2], "log": True},
    "tower.num_experts": {"int": [4, 12]},
    "encoders.categorical.dim": {"choice": [8, 16, 32]},
    "train.batch_size": {"choice": [256, 512, 1024]},
}

#: the paper-protocol search (``--final-seeds``): MMoE's size, dropout and the optimiser as well
FINAL_SPACE = {
    "optimizer.lr": {"float": [5.0e-4, 2.0e-2], "log": True},
    "optimizer.weight_decay": {"float": [1.0e-7, 1.0e-3], "log": True},
    "tower.num_experts": {"int": [4, 16]},
    "tower.dropout": {"float": [0.0, 0.3]},
    "encoders.categorical.dim": {"choice": [4, 8, 16, 32]},
    "train.batch_size": {"choice": [256, 512, 1024, 2048]},
}
#: ``--widths``: the experts' layer widths searched too (lists: ``recmtl tune``'s choice takes them)
WIDTHS = {"tower.expert_units": {"choice": [[16], [64], [128, 64]]}, "tower.task_units": {"choice": [[8], [32]]}}
#: test AUC (income, never married): the untuned census benchmark (MMoE, 3 seeds) and the PLE paper's MMoE
REFERENCES = {"census benchmark, untuned MMoE": (0.9508, 0.9949), "PLE paper (Tang et al. 2020), MMoE": (0.9522, 0.9945)}


def subset(src: Path, dst: Path, rows: int) -> None:
    if rows <= 0:
        dst.write_bytes(src.read_bytes())
        return
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
    ap.add_argument("--final-seeds", default="", help="comma-separated seeds: search once (median pruner, early "
                    "stopping), then train best.yaml on all rows with each seed and report test AUC")
    ap.add_argument("--workers", type=int, default=1, help="with --final-seeds: tune processes on one study")
    ap.add_argument("--widths", action="store_true", help="with --final-seeds: search the layer widths too (WIDTHS)")
    args = ap.parse_args()
    final_seeds = [int(x) for x in args.final_seeds.split(",") if x.strip()]
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
    test = raw["data"].pop("test", None)
    stopping = {"train.early_stopping.patience": "2"} if final_seeds else {"train.early_stopping.patience": "0"}
    for key, value in {**COMMON, "tower": TOWERS["mmoe"], "train.epochs": str(args.epochs), **stopping,
                       "train.log_every": "0"}.items():
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    raw.setdefault("encoders", {}).setdefault("categorical", {}).setdefault("name", "embedding")
    base = work / "tune_base.yaml"
    base.write_text(yaml.safe_dump(raw))
    space = work / "space.yaml"
    space_raw = ({**FINAL_SPACE, **(WIDTHS if args.widths else {})} if final_seeds else SPACE)
    space.write_text(yaml.safe_dump(space_raw))
    print(f"budget: {args.trials} trials per mode, {args.epochs} epochs each, {args.train_rows} train / "
          f"{args.valid_rows} validation rows; space {space_raw}", file=sys.stderr)
    if final_seeds:
        final(recmtl, work, base, space, args, test, final_seeds)
        return
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


def final(recmtl: str, work: Path, base: Path, space: Path, args: argparse.Namespace, test: str | None,
          seeds: list[int]) -> None:
    """One pruned search, then best.yaml on the full training data, one run per seed, test AUC."""
    if test is None:
        sys.exit("tune_census: the census config has no test split")
    out = work / "tune-final"
    t0 = time.perf_counter()
    _, stdout = run_cli(recmtl, "tune", base.name, "--space", space.name, "--trials", str(args.trials), "--out",
                        out.name, "--pruner", "median", "--seed", "0", "--study", "census-final", "--workers",
                        str(args.workers), cwd=work)
    search_s = time.perf_counter() - t0
    print(stdout, file=sys.stderr)
    best = yaml.safe_load((out / "best.yaml").read_text())
    best["data"].update({"train": "train.parquet", "validation": "valid.parquet", "test": test})
    (work / "best_full.yaml").write_text(yaml.safe_dump(best))
    results = []
    for seed in seeds:
        run = f"final-seed{seed}"
        seconds, _ = run_cli(recmtl, "train", "best_full.yaml", "--out", run, "--set", f"seed={seed}",
                             cwd=work)
        metrics = json.loads((work / run / "metrics.json").read_text())
        results.append({t: metrics["test"][t]["auc"] for t in TASKS})
        print(f"seed {seed}: test AUC {results[-1]} ({seconds:.0f} s)", file=sys.stderr)
    print(f"search: {args.trials} trials, {search_s / 60:.1f} min; best config: work dir best_full.yaml")
    print("| model | " + " | ".join(f"test AUC {t}" for t in TASKS) + " |")
    print("|---|" + "---|" * len(TASKS))
    cells = [f"{statistics.mean(r[t] for r in results):.4f} ± {statistics.stdev(r[t] for r in results):.4f}"
             if len(results) > 1 else f"{results[0][t]:.4f}" for t in TASKS]
    print(f"| tuned MMoE (seeds {','.join(map(str, seeds))}) | " + " | ".join(cells) + " |")
    for name, values in REFERENCES.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + " |")


if __name__ == "__main__":
    main()
