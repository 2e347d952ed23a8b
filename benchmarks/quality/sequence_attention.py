"""Issue 17 evidence: target attention vs mean pooling on ``recmtl datagen interests`` (known true probabilities),
and a text feature with vs without.

For each seed: one data set (``--rows`` over train/valid/test), then one run per encoder (``sequence_pool`` mean,
``din``, ``transformer``; the same seed, data, tower and optimiser), each scored on the test split once with its
best checkpoint. Prints per-task test AUC, the paired differences to mean pooling (mean and std over seeds) and the
Bayes-optimal AUC (the true probabilities' AUC on the same labels). ``--text`` adds the ``title`` experiment:
``sequence_pool`` with and without ``kind: text``.

    nice -n 10 .venv/bin/python benchmarks/quality/sequence_attention.py --work-dir /tmp/seqbench --seeds 1,2,3
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

RECMTL = str(Path(sys.executable).with_name("recmtl"))
ENCODERS = {
    "mean": {"name": "sequence_pool", "dim": 16, "pooling": "mean"},
    "din": {"name": "din", "dim": 16},
    "transformer": {"name": "transformer", "dim": 16, "num_heads": 2, "num_layers": 1, "dropout": 0.0},
}
TASKS = ("click", "conversion")


def run(*args: str) -> str:
    out = subprocess.run([RECMTL, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"recmtl {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


OPTIONS = {"lr": 0.01, "batch_size": 256}


def config(path: Path, data: Path, seed: int, encoder: dict, history: int, text: bool, epochs: int) -> Path:
    features = [{"name": "item_id", "kind": "categorical"},
                {"name": "hist", "kind": "sequence", "max_length": history, "vocabulary": "item_id", "target": "item_id"}]
    if text:
        features.append({"name": "title", "kind": "text", "hash_buckets": 20_000, "max_tokens": 16})
    cfg = {"seed": seed,
           "data": {"train": str(data / "train.parquet"), "validation": str(data / "valid.parquet"),
                    "test": str(data / "test.parquet"), "shuffle_buffer": 65_536, "read_rows": 16_384},
           "features": features,
           "tasks": [{"name": "click"}, {"name": "conversion", "head": "esmm", "params": {"ctr_task": "click"}}],
           "encoders": {"categorical": {"name": "embedding", "dim": 16}, "sequence": encoder,
                        "text": {"name": "text_bag", "dim": 16}},
           "tower": {"name": "shared_bottom", "bottom_units": [64], "task_units": [32]},
           "optimizer": {"lr": OPTIONS["lr"]},
           "train": {"batch_size": OPTIONS["batch_size"], "epochs": epochs, "progress": False, "threads": 1,
                     "early_stopping": {"patience": 2}}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def bayes_auc(data: Path) -> dict[str, float]:
    from recmtl.metrics import auc
    d, t = pq.read_table(data / "test.parquet"), pq.read_table(data / "test.truth.parquet")
    return {k: float(auc(d[k].to_numpy().astype(np.float64), t[k].to_numpy().astype(np.float64))) for k in TASKS}


def train(work: Path, name: str, data: Path, seed: int, encoder: dict, history: int, text: bool, epochs: int) -> dict:
    run_dir = work / name
    if not (run_dir / "metrics.json").exists():
        start = time.perf_counter()
        run("train", str(config(work / f"{name}.yaml", data, seed, encoder, history, text, epochs)), "--out", str(run_dir))
        print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    m = json.loads((run_dir / "metrics.json").read_text())
    return {t: m["test"][t]["auc"] for t in TASKS} | {"best_epoch": m.get("best_epoch")}


def summarise(results: dict[str, list[dict]], bayes: list[dict], base: str) -> None:
    print(f"{'encoder':<12} " + "  ".join(f"{t + ' AUC':>22} {'diff vs ' + base:>20}" for t in TASKS))
    for name, rows in results.items():
        cells = []
        for t in TASKS:
            a = np.array([r[t] for r in rows])
            d = a - np.array([r[t] for r in results[base]])
            cells.append(f"{a.mean():>14.4f} ± {a.std(ddof=1) if len(a) > 1 else 0:.4f} "
                         f"{d.mean():>+12.4f} ± {d.std(ddof=1) if len(d) > 1 else 0:.4f}")
        print(f"{name:<12} " + "  ".join(cells) + f"   per seed: {[[round(r[t], 4) for t in TASKS] for r in rows]}")
    b = {t: np.mean([x[t] for x in bayes]) for t in TASKS}
    print(f"{'Bayes':<12} " + "  ".join(f"{b[t]:>14.4f}" + " " * 29 for t in TASKS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--topics", type=int, default=20)
    ap.add_argument("--history", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--encoders", default="mean,din,transformer")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--text", action="store_true", help="also: sequence_pool with vs without the title text feature")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    OPTIONS.update(lr=args.lr, batch_size=args.batch_size)
    results: dict[str, list[dict]] = {e: [] for e in args.encoders.split(",")}
    text_results: dict[str, list[dict]] = {"without text": [], "with text": []}
    bayes = []
    for seed in seeds:
        work = args.work_dir / f"seed{seed}"
        data = work / "data"
        if not (data / "test.parquet").exists():
            run("datagen", "interests", str(data), "--rows", str(args.rows), "--seed", str(seed), "--items",
                str(args.items), "--topics", str(args.topics), "--history", str(args.history), "--text")
        bayes.append(bayes_auc(data))
        print(f"seed {seed}: Bayes-optimal test AUC {bayes[-1]}", flush=True)
        for name in results:
            results[name].append(train(work, name, data, seed, ENCODERS[name], args.history, False, args.epochs))
        if args.text:
            text_results["without text"].append(results["mean"][-1] if "mean" in results else
                                                train(work, "mean", data, seed, ENCODERS["mean"], args.history, False,
                                                      args.epochs))
            text_results["with text"].append(train(work, "mean_text", data, seed, ENCODERS["mean"], args.history, True,
                                                   args.epochs))
    print(f"\ninterests: {args.rows:,} rows (80/10/10), {args.items} items, {args.topics} topics, history <= "
          f"{args.history}; seeds {seeds}; test AUC (mean ± std over seeds; diff: paired by seed)")
    summarise(results, bayes, "mean" if "mean" in results else next(iter(results)))
    if args.text:
        print("\ntext (title) with sequence_pool mean:")
        summarise(text_results, bayes, "without text")


if __name__ == "__main__":
    main()
