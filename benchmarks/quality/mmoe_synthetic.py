"""The MMoE paper's synthetic experiment (Ma et al., KDD 2018, section 4): shared-bottom vs OMoE vs MMoE as
the correlation of two regression tasks falls.

For each seed and task correlation ``p`` the data is generated afresh with ``recmtl datagen mmoe-synthetic
--correlation p --seed SEED`` (``y_i = w_i.x + sum_k sin(a_k w_i.x + b_k) + noise``, 100 dense inputs,
``w_2 = p u_1 + sqrt(1-p^2) u_2``; see recmtl/data/synthetic.py), then each tower is trained with ``recmtl train``
(``recmtl.cli.main`` called in this process; one thread) with two ``regression`` heads, early stopping on
the validation loss; the test loss is the mean over the two tasks of the test MSE (RMSE squared) of the
best checkpoint. The paper reports training loss averaged over 200 runs; this script reports test loss
(mean ± sample std over ``--seeds``), writes a markdown table to stdout and a plot to ``--plot``.

Sizes as in the paper: MMoE and OMoE with 8 experts of one 16-unit layer, shared-bottom with one bottom
layer as wide as the experts together (128 units); task towers of 8 units for all.

Usage: python benchmarks/quality/mmoe_synthetic.py [--correlations 1.0,0.9,0.5,0] [--seeds 1,2,3] [--rows 20000]
       [--epochs 30] [--work-dir DIR] [--plot benchmarks/quality/mmoe_synthetic.png] [--json results.json]
       python benchmarks/quality/mmoe_synthetic.py --from-json results.json   # tables and plot again, no training
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

TOWERS = {
    "shared_bottom": {"name": "shared_bottom", "bottom_units": [128], "task_units": [8]},
    "omoe": {"name": "omoe", "num_experts": 8, "expert_units": [16], "task_units": [8]},
    "mmoe": {"name": "mmoe", "num_experts": 8, "expert_units": [16], "task_units": [8]},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cli(*args: str) -> None:
    from recmtl.cli import main
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        if exc.code not in (0, None):
            sys.exit(f"mmoe_synthetic: `recmtl {' '.join(map(str, args))}` failed with exit {exc.code}")


def config(data: Path, tower: dict[str, Any], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "seed": seed,
        "data": {"train": str(data / "train.parquet"), "validation": str(data / "valid.parquet"),
                 "test": str(data / "test.parquet")},
        "features": [{"name": f"x{i:03d}", "kind": "dense"} for i in range(100)],
        "tasks": [{"name": "y1", "head": "regression"}, {"name": "y2", "head": "regression"}],
        "tower": tower,
        "optimizer": {"lr": args.lr},
        "train": {"batch_size": args.batch_size, "epochs": args.epochs, "progress": False, "threads": 1,
                  "early_stopping": {"monitor": "loss", "patience": args.patience}},
    }


def run_one(work: Path, p: float, seed: int, tower: str, args: argparse.Namespace) -> dict[str, Any]:
    data = work / f"data-p{p}-s{seed}"
    if not (data / "test.parquet").is_file():
        cli("datagen", "mmoe-synthetic", data, "--correlation", p, "--rows", args.rows, "--seed", seed)
    run_dir = work / "runs" / f"{tower}-p{p}-s{seed}"
    cfg = work / "configs" / f"{tower}-p{p}-s{seed}.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump(config(data, TOWERS[tower], seed, args)))
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    cli("train", cfg, "--out", run_dir)
    seconds = time.perf_counter() - t0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    mse = {t: metrics["test"][t]["rmse"] ** 2 for t in ("y1", "y2")}
    result = {"tower": tower, "correlation": p, "seed": seed, "test_mse": mse,
              "test_loss": statistics.mean(mse.values()), "best_epoch": metrics["best_epoch"],
              "epochs": len(metrics["history"]), "wall_s": round(seconds, 1)}
    log(f"p={p} seed={seed} {tower}: test loss {result['test_loss']:.4f} (best epoch {result['best_epoch']}/"
        f"{result['epochs']}, {seconds:.0f} s)")
    return result


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(results: list[dict[str, Any]], correlations: list[float]) -> str:
    towers = [t for t in TOWERS if any(r["tower"] == t for r in results)]
    lines = ["| correlation | " + " | ".join(towers) + " | MMoE vs shared-bottom | MMoE vs OMoE |",
             "|---|" + "---|" * (len(towers) + 2)]
    for p in correlations:
        loss = {t: [r["test_loss"] for r in results if r["tower"] == t and r["correlation"] == p] for t in towers}
        cells = [mean_std(loss[t]) if loss[t] else "" for t in towers]
        rel = []
        for other in ("shared_bottom", "omoe"):
            if loss.get("mmoe") and loss.get(other):
                rel.append(f"{100 * (statistics.mean(loss['mmoe']) / statistics.mean(loss[other]) - 1):+.1f} %")
            else:
                rel.append("")
        lines.append(f"| {p} | " + " | ".join(cells + rel) + " |")
    return "\n".join(lines)


def ratios(results: list[dict[str, Any]], p: float, baseline: str) -> list[float]:
    """Per seed: MMoE's test loss divided by ``baseline``'s on the same data (paired by seed)."""
    by = {(r["tower"], r["seed"]): r["test_loss"] for r in results if r["correlation"] == p}
    return [by[("mmoe", s)] / by[(baseline, s)] for (t, s) in sorted(by) if t == "mmoe" and (baseline, s) in by]


def paired_table(results: list[dict[str, Any]], correlations: list[float]) -> str:
    """Seed by seed (each seed is its own data set): how often MMoE beats each baseline, median loss ratio."""
    lines = ["| correlation | MMoE < OMoE (seeds) | median MMoE / OMoE | MMoE < shared-bottom (seeds) | "
             "median MMoE / shared-bottom |", "|---|---|---|---|---|"]
    for p in correlations:
        cells = []
        for base in ("omoe", "shared_bottom"):
            r = ratios(results, p, base)
            cells += [f"{sum(x < 1 for x in r)} of {len(r)}", f"{statistics.median(r):.2f}" if r else ""]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], correlations: list[float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for tower in TOWERS:
        xs, ys, es = [], [], []
        for p in correlations:
            v = [r["test_loss"] for r in results if r["tower"] == tower and r["correlation"] == p]
            if v:
                xs.append(p)
                ys.append(statistics.mean(v))
                es.append(statistics.stdev(v) if len(v) > 1 else 0.0)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=tower)
    ax.set_xlabel("task correlation p")
    ax.set_ylabel("test loss (mean MSE of the two tasks)")
    ax.invert_xaxis()
    seeds = sorted({r["seed"] for r in results})
    ax.set_title(f"test loss, {len(seeds)} seeds (mean ± std)")
    ax.legend()
    ax.grid(alpha=0.3)
    for base, colour in (("omoe", "tab:orange"), ("shared_bottom", "tab:blue")):
        pts = [(p, r) for p in correlations for r in ratios(results, p, base)]
        if not pts:
            continue
        bx.scatter([p for p, _ in pts], [r for _, r in pts], color=colour, alpha=0.4, s=18)
        bx.plot(correlations, [statistics.median(ratios(results, p, base)) for p in correlations], marker="o",
                color=colour, label=f"MMoE / {base} (median; dots: seeds)")
    bx.axhline(1.0, color="grey", lw=1, ls="--")
    bx.set_xlabel("task correlation p")
    bx.set_ylabel("MMoE test loss / baseline's (same data)")
    bx.invert_xaxis()
    bx.set_title("paired by seed: below 1 = MMoE better")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    fig.suptitle("MMoE paper, section 4: synthetic tasks with correlation p")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--correlations", default="1.0,0.9,0.5,0.0")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--towers", default=",".join(TOWERS))
    ap.add_argument("--rows", type=int, default=20000, help="rows per data set, split 80/10/10 (default 20000)")
    ap.add_argument("--epochs", type=int, default=30, help="upper bound; early stopping on validation loss")
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=Path(__file__).with_name("mmoe_synthetic.png"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--from-json", type=Path, default=None, help="no training: tables and plot from a saved --json")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        results = saved["results"]
        correlations = sorted({r["correlation"] for r in results}, reverse=True)
        print(table(results, correlations) + "\n\n" + paired_table(results, correlations))
        plot(results, correlations, args.plot)
        return
    correlations = [float(c) for c in args.correlations.split(",") if c.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    towers = [t for t in args.towers.split(",") if t.strip()]
    if unknown := [t for t in towers if t not in TOWERS]:
        sys.exit(f"mmoe_synthetic: unknown tower(s) {unknown}; choose from {', '.join(TOWERS)}")
    tmp = tempfile.TemporaryDirectory(prefix="mmoe-synthetic-") if args.work_dir is None else None
    work = Path(tmp.name) if tmp else args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        for seed in seeds:  # towers innermost: load changes on a shared machine hit every tower alike
            for p in correlations:
                for tower in towers:
                    results.append(run_one(work, p, seed, tower, args))
                if args.json:
                    args.json.write_text(json.dumps({"args": vars(args) | {"work_dir": str(work), "plot": str(args.plot),
                                                                            "json": str(args.json)},
                                                     "results": results}, indent=2))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"MMoE synthetic experiment; {platform.node()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"{time.perf_counter() - t0:.0f} s in all")
    print(f"rows {args.rows} (80/10/10), epochs <= {args.epochs} (patience {args.patience}), batch {args.batch_size}, "
          f"lr {args.lr}, seeds {seeds}")
    print()
    print(table(results, correlations))
    print()
    print(paired_table(results, correlations))
    plot(results, correlations, args.plot)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
