"""Issue 21: does bf16 autocast train as well as fp32? Test AUC per task, fp32 and bf16 with the same seeds.

1. ``funnel``: the funnel MMoE benchmark model (26 categorical dim 16, 13 dense, 4 experts [256, 128], towers
   [64], batch 2048; Adam + SparseAdam at ``recmtl init``'s learning rate) on ``recmtl datagen funnel --rows
   ROWS`` (80/10/10), ``--epochs`` epochs with the best-validation checkpoint, seeds ``--seeds``; test AUC of the
   best checkpoint per task, the paired delta bf16 - fp32 per seed, and the Bayes-optimal test AUC (``recmtl
   evaluate --reference test.truth.parquet``, the true probabilities). Target: |mean paired delta| <= 0.002.
2. ``census``: census-income (UCI KDD) with ``census_income.py``'s convert / split / init and its MMoE (8 experts
   [16], towers [8]) and settings, ``--census-epochs`` as the epoch bound (early stopping, patience 2), the same
   seeds. Target: bf16 no worse than fp32 by more than the seed noise (the fp32 seeds' standard deviation).

Each run is ``recmtl train --precision P`` in a subprocess (one torch thread, so runs are reproducible and the
2-core machine's neighbours matter less); for each seed fp32 and bf16 run back to back.

    python benchmarks/quality/precision_quality.py [--what funnel,census] [--rows 300000] [--epochs 3]
        [--seeds 1,2,3] [--census-epochs 8] [--work-dir DIR] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import census_income  # noqa: E402  (the census helpers: convert / split / init, its MMoE and settings)

PRECISIONS = ("fp32", "bf16")


def funnel_config(data: Path, epochs: int) -> dict[str, Any]:
    cats = ["user_id", "item_id"] + [f"c{i:02d}" for i in range(3, 27)]
    return {"data": {"train": str(data / "train.parquet"), "validation": str(data / "valid.parquet"),
                     "test": str(data / "test.parquet")},
            "features": [{"name": n, "kind": "categorical"} for n in cats]
            + [{"name": f"d{i:02d}", "kind": "dense"} for i in range(1, 14)],
            "tasks": [{"name": "click", "head": "binary"},
                      {"name": "conversion", "head": "esmm", "params": {"ctr_task": "click"}}],
            "encoders": {"categorical": {"name": "embedding", "dim": 16}},
            "tower": {"name": "mmoe", "num_experts": 4, "expert_units": [256, 128], "task_units": [64]},
            "train": {"batch_size": 2048, "epochs": epochs, "progress": False, "threads": 1}}


def train(recmtl: str, work: Path, cfg: Path, run: str, sets: dict[str, str]) -> dict[str, Any]:
    """One ``recmtl train`` run; a finished run already in ``work`` (metrics.json with test metrics) is reused."""
    done = work / run / "metrics.json"
    seconds = float("nan")
    if not (done.is_file() and "test" in json.loads(done.read_text())):
        args = ["train", str(cfg), "--out", run]
        for k, v in sets.items():
            args += ["--set", f"{k}={v}"]
        seconds, _ = census_income.run_cli(recmtl, *args, cwd=work)
    metrics = json.loads(done.read_text())
    info = json.loads((work / run / "run.json").read_text())
    return {"wall_s": seconds, "best_epoch": metrics["best_epoch"], "epochs": len(metrics["history"]),
            "rows_per_s": [h["rows_per_s"] for h in metrics["history"]],
            "test": {t: m["auc"] for t, m in metrics["test"].items()}, "precision": info["precision"]["mode"]}


def paired(results: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """Per task: fp32 and bf16 mean ± std over seeds and the paired deltas bf16 - fp32."""
    out = {}
    for t in tasks:
        a = [r["fp32"]["test"][t] for r in results]
        b = [r["bf16"]["test"][t] for r in results]
        d = [y - x for x, y in zip(a, b)]
        sd = statistics.stdev(a) if len(a) > 1 else float("nan")
        out[t] = {"fp32": a, "bf16": b, "delta": d, "mean_delta": statistics.mean(d),
                  "fp32_mean": statistics.mean(a), "fp32_std": sd, "bf16_mean": statistics.mean(b),
                  "bf16_std": statistics.stdev(b) if len(b) > 1 else float("nan")}
    return out


def report(name: str, summary: dict[str, Any], reference: dict[str, float] | None = None) -> None:
    print(f"\n{name}")
    print("| task | fp32 test AUC | bf16 test AUC | paired delta per seed | mean delta |"
          + (" Bayes-optimal AUC |" if reference else ""))
    print("|---|---|---|---|---|" + ("---|" if reference else ""))
    for t, s in summary.items():
        line = (f"| {t} | {s['fp32_mean']:.4f} ± {s['fp32_std']:.4f} | {s['bf16_mean']:.4f} ± {s['bf16_std']:.4f} | "
                + ", ".join(f"{d:+.4f}" for d in s["delta"]) + f" | {s['mean_delta']:+.4f} |")
        print(line + (f" {reference[t]:.4f} |" if reference else ""))


def run_funnel(recmtl: str, work: Path, rows: int, epochs: int, seeds: list[int]) -> dict[str, Any]:
    data = work / "funnel"
    if not (data / "test.truth.parquet").is_file():
        census_income.run_cli(recmtl, "datagen", "funnel", str(data), "--rows", str(rows), "--seed", "0", cwd=work)
    cfg = work / "funnel.yaml"
    cfg.write_text(yaml.safe_dump(funnel_config(data, epochs)))
    results = []
    for seed in seeds:
        r = {}
        for p in PRECISIONS:
            r[p] = train(recmtl, work, cfg, f"funnel-{p}-{seed}", {"seed": str(seed), "train.precision": p})
            census_income.log(f"funnel seed {seed} {p}: test AUC "
                              + ", ".join(f"{t} {v:.4f}" for t, v in r[p]["test"].items())
                              + f"; best epoch {r[p]['best_epoch']}/{r[p]['epochs']}; {r[p]['wall_s']:.0f} s")
        results.append(r)
    _, out = census_income.run_cli(recmtl, "evaluate", f"funnel-fp32-{seeds[0]}", str(data / "test.parquet"),
                                   "--reference", str(data / "test.truth.parquet"), "--json", cwd=work)
    reference = {t: v["auc"] for t, v in json.loads(out)["reference"].items()}
    summary = paired(results, ["click", "conversion"])
    report(f"funnel ({rows:,} rows, {epochs} epochs, seeds {seeds})", summary, reference)
    return {"rows": rows, "epochs": epochs, "runs": results, "summary": summary, "bayes_auc": reference}


def run_census(recmtl: str, work: Path, epochs: int, seeds: list[int]) -> dict[str, Any]:
    census = work / "census"
    census.mkdir(exist_ok=True)
    cfg = census_income.prepare(recmtl, census, census_income.DATA_DIR)
    sets = {**census_income.COMMON, "train.epochs": str(epochs), "tower": census_income.TOWERS["mmoe"]}
    results = []
    for seed in seeds:
        r = {}
        for p in PRECISIONS:
            r[p] = train(recmtl, census, cfg, f"census-{p}-{seed}", {**sets, "seed": str(seed), "train.precision": p})
            census_income.log(f"census seed {seed} {p}: test AUC "
                              + ", ".join(f"{t} {v:.4f}" for t, v in r[p]["test"].items())
                              + f"; best epoch {r[p]['best_epoch']}/{r[p]['epochs']}; {r[p]['wall_s']:.0f} s")
        results.append(r)
    summary = paired(results, list(census_income.TASKS))
    report(f"census-income MMoE (8 experts [16], towers [8]; at most {epochs} epochs, seeds {seeds})", summary)
    return {"epochs": epochs, "runs": results, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", default="funnel,census", help="funnel, census or both (comma-separated)")
    ap.add_argument("--rows", type=int, default=300_000, help="funnel: total rows over the three splits")
    ap.add_argument("--epochs", type=int, default=3, help="funnel: epochs per run")
    ap.add_argument("--census-epochs", type=int, default=8, help="census: epoch bound (early stopping, patience 2)")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--work-dir", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    what = {w.strip() for w in args.what.split(",")}
    if not what <= {"funnel", "census"}:
        sys.exit(f"precision_quality: --what '{args.what}': use funnel, census or funnel,census")
    recmtl = census_income.recmtl_executable()
    with tempfile.TemporaryDirectory(prefix="precision-quality-") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        result: dict[str, Any] = {}
        if "funnel" in what:
            result["funnel"] = run_funnel(recmtl, work, args.rows, args.epochs, seeds)
        if "census" in what:
            result["census"] = run_census(recmtl, work, args.census_epochs, seeds)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
