"""Funnel quality: MMoE test AUC per task against the Bayes-optimal AUC, through the command line.

Generates funnel data (``recmtl datagen funnel``, 1M rows split 80/10/10 by default), writes the starter
config (``recmtl init ... --head conversion=esmm``), trains it (``recmtl train`` with the ``--set``
overrides below) and scores the test split against the true probabilities
(``recmtl evaluate --reference test.truth.parquet``). The target: each task's test AUC within
``--tolerance`` (0.01) of the reference (Bayes-optimal) AUC. Exit status 1 when a task misses it.

Usage: python benchmarks/quality/funnel_quality.py [--rows 1000000] [--work-dir DIR] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The config values that reached the target (benchmarks/RESULTS.md); --set adds to or overrides them,
# --no-defaults drops them (the plain `recmtl init` config).
DEFAULT_SETS = [
    "train.progress=false",
    "train.threads=1",  # one thread: the recorded figures were made so (robust to a busy shared machine)
    "optimizer.name=adagrad",  # sparse Adagrad for the embeddings, dense Adagrad for the rest
    "optimizer.lr=0.005",  # dense layers (experts, gates, towers, heads)
    "optimizer.embedding_lr=0.05",  # embedding tables
    "tower.dropout=0.1",
]


def recmtl_command() -> list[str]:
    exe = Path(sys.executable).with_name("recmtl")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("recmtl")
    return [found] if found else [sys.executable, "-m", "recmtl.cli"]


def run(cmd: list[str], capture: bool = False) -> str:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return done.stdout if capture else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="total rows over all splits")
    ap.add_argument("--seed", type=int, default=0, help="datagen seed")
    ap.add_argument("--cardinality", type=int, default=1000, help="datagen --cardinality")
    ap.add_argument("--valid-fraction", type=float, default=0.1)
    ap.add_argument("--test-fraction", type=float, default=0.1)
    ap.add_argument("--tolerance", type=float, default=0.01, help="allowed AUC gap to the reference")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra `recmtl train --set` override; repeatable")
    ap.add_argument("--no-defaults", action="store_true", help="do not apply DEFAULT_SETS")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep data, config and run here (default: temp dir)")
    ap.add_argument("--run-name", default="mmoe", help="run folder name inside the work dir")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = ap.parse_args(argv)

    recmtl = recmtl_command()
    with tempfile.TemporaryDirectory(prefix="recmtl-quality-") as tmp:
        work = args.work_dir or Path(tmp)
        data = work / "data"
        if not (data / "test.truth.parquet").is_file():
            run(recmtl + ["datagen", "funnel", str(data), "--rows", str(args.rows), "--seed", str(args.seed),
                          "--cardinality", str(args.cardinality), "--valid-fraction", str(args.valid_fraction),
                          "--test-fraction", str(args.test_fraction)])
        config = work / "funnel.yaml"
        run(recmtl + ["init", str(data / "train.parquet"), "--task", "click", "--task", "conversion",
                      "--head", "conversion=esmm", "--validation", str(data / "valid.parquet"),
                      "--test", str(data / "test.parquet"), "-o", str(config), "--force"])
        sets = ([] if args.no_defaults else list(DEFAULT_SETS)) + args.sets
        run_dir = work / args.run_name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        run(recmtl + ["train", str(config), "--out", str(run_dir)] + [a for s in sets for a in ("--set", s)])
        train_seconds = time.perf_counter() - t0
        out = json.loads(run(recmtl + ["evaluate", str(run_dir), str(data / "test.parquet"), "--reference",
                                       str(data / "test.truth.parquet"), "--json"], capture=True))
        metrics = json.loads((run_dir / "metrics.json").read_text())

    rows, ok = [], True
    for task, m in out["metrics"].items():
        ref = out["reference"][task]["auc"]
        gap = ref - m["auc"]
        passed = gap <= args.tolerance
        ok &= passed
        rows.append({"task": task, "test_auc": m["auc"], "reference_auc": ref, "gap": gap, "passed": passed,
                     "test_rows": m["rows"]})
    result = {"sets": sets, "rows": args.rows, "seed": args.seed, "best_epoch": metrics["best_epoch"],
              "epochs_run": len(metrics["history"]), "train_seconds": round(train_seconds, 1),
              "epoch_rows_per_s": [h["rows_per_s"] for h in metrics["history"]],
              "validation_auc": [{t: round(v["auc"], 4) for t, v in h["validation"].items()} for h in metrics["history"]],
              "tasks": rows, "passed": ok}
    print(f"overrides: {' '.join(sets) or '(none)'}")
    print(f"best epoch {result['best_epoch']} of {result['epochs_run']} run; training took {train_seconds:,.0f} s")
    print(f"{'task':12s} {'test AUC':>9s} {'reference AUC':>14s} {'gap':>8s}  within {args.tolerance}")
    for r in rows:
        print(f"{r['task']:12s} {r['test_auc']:9.4f} {r['reference_auc']:14.4f} {r['gap']:8.4f}  "
              f"{'yes' if r['passed'] else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
