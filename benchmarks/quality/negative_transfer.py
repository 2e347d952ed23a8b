"""Negative transfer, measured (issue 18): `recmtl compare` on the MMoE paper's synthetic pair at several task
correlations, and on four clustered tasks (two pairs) with the TAG affinity, `recmtl group --groups 2 --train`
and the cost of `train.affinity_every`. Everything goes through the CLI (``recmtl.cli.main`` in this process).

MMoE-synthetic: ``recmtl datagen mmoe-synthetic --correlation p --rows R --seed 0`` (one data set per p; the
seeds vary the model), MMoE with 8 experts of 16 units and task towers of 8 (the paper's sizes) for the
multi-task cell and each task alone, early stopping on the validation loss; test RMSE compared.
Clusters: ``recmtl datagen task-clusters`` (2 clusters x 2 tasks, correlation 0.9 within, 0 across), a
shared-bottom tower; the affinity is logged every 10 steps in the all-task cells.
Funnel: ``recmtl datagen funnel --correlation RHO`` (the correlation of the click and conversion effects) with
click and conversion as two binary tasks, MMoE with 2 experts; test AUC compared.

Usage: python benchmarks/quality/negative_transfer.py [--work-dir DIR] [--seeds 3] [--rows 10000]
       [--epochs 12] [--correlations 1.0,0.5,0] [--funnel-correlations 0.9,-0.5]
       [--parts mmoe,clusters,cost,funnel,census] [--census-rows 20000] [--census-epochs 4]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml


def cli(*args: Any) -> None:
    from recmtl.cli import main
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        if exc.code not in (0, None):
            sys.exit(f"negative_transfer: `recmtl {' '.join(map(str, args))}` failed with exit {exc.code}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def base_config(data: Path, features: int, tasks: list[str], tower: dict[str, Any], args: argparse.Namespace,
                **train: Any) -> dict[str, Any]:
    return {"seed": 1,
            "data": {"train": str(data / "train.parquet"), "validation": str(data / "valid.parquet"),
                     "test": str(data / "test.parquet")},
            "features": [{"name": f"x{i:03d}", "kind": "dense"} for i in range(features)],
            "tasks": [{"name": t, "head": "regression"} for t in tasks],
            "tower": tower, "optimizer": {"lr": args.lr},
            "train": {"batch_size": args.batch_size, "epochs": args.epochs, "progress": False, "threads": 1,
                      "log_every": 0, "early_stopping": {"monitor": "loss", "patience": 3}, **train}}


def summary_rows(result: dict[str, Any]) -> list[str]:
    rows = []
    for variant, entry in result["variants"].items():
        for t, te in entry["tasks"].items():
            d, pm = te.get("delta") or {}, result["primary"][t]
            s = result["single"][t][pm]
            m = te["metrics"][pm]
            ci = d.get("ci95")
            verdict = ("negative transfer" if te.get("negative_transfer") else "positive transfer"
                       if te.get("positive_transfer") else "within noise")
            rows.append(f"{variant} | {t} | {s['mean']:.4f} ± {s['std']:.4f} | {m['mean']:.4f} ± {m['std']:.4f} | "
                        f"{d['mean']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}] | {te['relative_pct']['mean']:+.1f} % | "
                        f"{verdict}")
        dm = entry.get("delta_m_pct") or {}
        ci = dm.get("ci95") or [float("nan")] * 2
        rows.append(f"{variant} | **Δm** | | | [{ci[0]:+.1f}, {ci[1]:+.1f}] % | {dm.get('mean', float('nan')):+.1f} "
                    f"± {dm.get('std', float('nan')):.1f} % |")
    return rows


def mmoe_part(work: Path, args: argparse.Namespace) -> None:
    print("### MMoE-synthetic, single-task vs MMoE (test RMSE, lower is better)\n")
    print("| correlation | variant | task | single-task | multi-task | Δ paired [95% CI] | Δ % | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for p in args.correlations:
        data = work / f"mmoe-p{p}"
        if not (data / "test.parquet").is_file():
            cli("datagen", "mmoe-synthetic", data, "--correlation", p, "--rows", args.rows, "--seed", 0)
        cfg = work / f"mmoe-p{p}.yaml"
        tower = {"name": "mmoe", "num_experts": 8, "expert_units": [16], "task_units": [8]}
        cfg.write_text(yaml.safe_dump(base_config(data, 100, ["y1", "y2"], tower, args)))
        t0 = time.perf_counter()
        cli("compare", cfg, "-o", work / f"cmp-mmoe-p{p}", "--seeds", args.seeds)
        log(f"p={p}: {time.perf_counter() - t0:.0f} s")
        result = json.loads((work / f"cmp-mmoe-p{p}" / "compare.json").read_text())
        for row in summary_rows(result):
            print(f"| {p} | {row} |")
    print()


def clusters_part(work: Path, args: argparse.Namespace) -> None:
    data = work / "clusters"
    if not (data / "test.parquet").is_file():
        cli("datagen", "task-clusters", data, "--rows", args.rows, "--dim", 20, "--seed", 0)
    tasks = ["c1_t1", "c1_t2", "c2_t1", "c2_t2"]
    cfg = work / "clusters.yaml"
    tower = {"name": "shared_bottom", "bottom_units": [32], "task_units": [8]}
    cfg.write_text(yaml.safe_dump(base_config(data, 20, tasks, tower, args, affinity_every=10)))
    out = work / "cmp-clusters"
    t0 = time.perf_counter()
    cli("compare", cfg, "-o", out, "--seeds", args.seeds)
    cli("group", out, "--groups", "2", "--train", "--seeds", args.seeds)
    log(f"clusters: {time.perf_counter() - t0:.0f} s")
    result = json.loads((out / "compare.json").read_text())
    g = result["groups"]
    print("### Four clustered tasks: affinity, `recmtl group --groups 2`, grouped vs all-in-one (test RMSE)\n")
    print(f"mean affinity A[i -> j] over the all-in-one cells ({len(g['from'])} runs), row i steps, column j:\n")
    print("| | " + " | ".join(g["tasks"]) + " |\n|---|" + "---|" * len(g["tasks"]))
    for name, row in zip(g["tasks"], g["affinity"]):
        print(f"| {name} | " + " | ".join(f"{v:.2e}" for v in row) + " |")
    print(f"\nsuggested groups ({g['method']}): {g['groups']}, score {g['score']:.3g} "
          f"(all in one: {g['all_in_one_score']:.3g})\n")
    print("| variant | task | single-task | multi-task | Δ paired [95% CI] | Δ % | verdict |")
    print("|---|---|---|---|---|---|---|")
    for row in summary_rows(result):
        print(f"| {row} |")
    print("\ngrouped minus all-in-one, paired by seed (RMSE; < 0: grouped better):\n")
    for t, d in g["vs_all_in_one"].items():
        ci = d["ci95"]
        print(f"- {t}: {d['mean']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]" + ("  worse" if d["grouped_worse"] else ""))
    print()


def cost_part(work: Path, args: argparse.Namespace) -> None:
    data = work / "clusters"
    tasks = ["c1_t1", "c1_t2", "c2_t1", "c2_t2"]
    tower = {"name": "shared_bottom", "bottom_units": [32], "task_units": [8]}
    print("### Cost of `train.affinity_every` (4 tasks, shared-bottom, 1 thread, one epoch)\n")
    print("| affinity_every | training rows/s (2 runs) | relative to off |\n|---|---|---|")
    speed = {}
    for every in (0, 10, 1):
        runs = []
        for rep in range(2):
            cfg = work / f"cost-{every}.yaml"
            cfg.write_text(yaml.safe_dump(base_config(data, 20, tasks, tower, args, affinity_every=every,
                                                      epochs=1)))
            run = work / f"cost-{every}-{rep}"
            if run.exists():
                import shutil
                shutil.rmtree(run)
            cli("train", cfg, "-o", run)
            runs.append(json.loads((run / "metrics.json").read_text())["history"][0]["rows_per_s"])
        speed[every] = runs
        rel = max(runs) / max(speed[0])
        print(f"| {every} | {', '.join(f'{r:,.0f}' for r in runs)} | {rel:.2f} |")
    print()


def funnel_part(work: Path, args: argparse.Namespace) -> None:
    print("### Funnel (click, conversion as two binary tasks), single-task vs MMoE (test AUC, higher is better)\n")
    print("| correlation | variant | task | single-task | multi-task | Δ paired [95% CI] | Δ % | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for rho in args.funnel_correlations:
        data = work / f"funnel-r{rho}"
        if not (data / "test.parquet").is_file():
            cli("datagen", "funnel", data, "--rows", 3 * args.rows, "--seed", 0, "--categorical", 6, "--dense", 4,
                "--cardinality", 50, "--correlation", rho)
        cfg = {"seed": 1,
               "data": {"train": str(data / "train.parquet"), "validation": str(data / "valid.parquet"),
                        "test": str(data / "test.parquet")},
               "features": [{"name": n, "kind": "categorical"} for n in ["user_id", "item_id", "c03", "c04", "c05",
                                                                         "c06"]]
               + [{"name": f"d0{i}", "kind": "dense"} for i in range(1, 5)],
               "tasks": [{"name": "click", "head": "binary"}, {"name": "conversion", "head": "binary"}],
               "encoders": {"categorical": {"name": "embedding", "dim": 8}},
               "tower": {"name": "mmoe", "num_experts": 2, "expert_units": [32], "task_units": [16]},
               "optimizer": {"lr": 0.005},
               "train": {"batch_size": 512, "epochs": 4, "progress": False, "threads": 1, "log_every": 0}}
        path = work / f"funnel-r{rho}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        t0 = time.perf_counter()
        cli("compare", path, "-o", work / f"cmp-funnel-r{rho}", "--seeds", args.seeds)
        log(f"funnel rho={rho}: {time.perf_counter() - t0:.0f} s")
        result = json.loads((work / f"cmp-funnel-r{rho}" / "compare.json").read_text())
        for row in summary_rows(result):
            print(f"| {rho} | {row} |")
    print()


#: census-income's third task (the MMoE paper's second task group): a college degree, bachelor's or higher
COLLEGE = ["Bachelors degree(BA AB BS)", "Masters degree(MA MS MEng MEd MSW MBA)",
           "Prof school degree (MD DDS DVM LLB JD)", "Doctorate degree(PhD EdD)"]


def census_part(work: Path, args: argparse.Namespace) -> None:
    """Census-income with three tasks: income, never married, education >= college (bachelor's or higher);
    the config tower MMoE at the paper's size, shared-bottom and PLE with their default sizes."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("census_income", Path(__file__).with_name("census_income.py"))
    census = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(census)
    folder = work / "census"
    folder.mkdir(parents=True, exist_ok=True)
    if not census.DATA_DIR.is_dir():
        print(f"census-income: skipped, {census.DATA_DIR} is absent\n")
        return
    census.prepare(census.recmtl_executable(), folder, census.DATA_DIR)  # convert + split (+ a 2-task config)
    train = folder / "train.parquet"
    if args.census_rows:  # a random subsample of the training rows (validation and test stay whole)
        import numpy as np
        import pyarrow.parquet as pq
        table = pq.read_table(train)
        keep = np.sort(np.random.default_rng(0).choice(table.num_rows, args.census_rows, replace=False))
        train = folder / f"train_{args.census_rows}.parquet"
        pq.write_table(table.take(keep), train)
    cfg = folder / "census3.yaml"
    init = ["init", train, "--exclude", "instance_weight", "--validation",
            folder / "valid.parquet", "--test", folder / "test.parquet", "--tower", "mmoe", "-o", cfg, "--force",
            "--task", "income=income_50k", "--task", "never_married=marital_stat", "--task",
            "college=education", "--positive", "income_50k=50000+.", "--positive", "marital_stat=Never married"]
    for value in COLLEGE:
        init += ["--positive", f"college={value}"]
    for col in census.DENSE:
        init += ["--dense", col]
    cli(*init)
    sets = [f"tower={census.TOWERS['mmoe']}", *(f"{k}={v}" for k, v in census.COMMON.items()),
            f"train.epochs={args.census_epochs}"]
    out = work / (f"cmp-census-{args.census_rows}" if args.census_rows else "cmp-census")
    t0 = time.perf_counter()
    cli("compare", cfg, "-o", out, "--seeds", args.seeds, "--towers", "shared_bottom,mmoe,ple",
        *[x for s in sets for x in ("--set", s)])
    log(f"census: {time.perf_counter() - t0:.0f} s")
    result = json.loads((out / "compare.json").read_text())
    print("### Census-income, three tasks: single-task vs shared-bottom, MMoE, PLE (test AUC)\n")
    print("| variant | task | single-task | multi-task | Δ paired [95% CI] | Δ % | verdict |")
    print("|---|---|---|---|---|---|---|")
    for row in summary_rows(result):
        print(f"| {row} |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/negative_transfer"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--correlations", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 0.5, 0.0])
    ap.add_argument("--funnel-correlations", type=lambda s: [float(x) for x in s.split(",")], default=[0.9, -0.5])
    ap.add_argument("--census-epochs", type=int, default=10)
    ap.add_argument("--census-rows", type=int, default=0, help="train on a random subsample of this many rows")
    ap.add_argument("--parts", default="mmoe,clusters,cost,funnel", help="also: census (slow)")
    args = ap.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    if "mmoe" in parts:
        mmoe_part(args.work_dir, args)
    if "clusters" in parts:
        clusters_part(args.work_dir, args)
    if "cost" in parts:
        cost_part(args.work_dir, args)
    if "funnel" in parts:
        funnel_part(args.work_dir, args)
    if "census" in parts:
        census_part(args.work_dir, args)


if __name__ == "__main__":
    main()
