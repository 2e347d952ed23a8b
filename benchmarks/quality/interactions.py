"""Feature-interaction blocks vs the plain MLP on funnel data with FM-style pairwise interactions (issue 16).

Generates ``recmtl datagen funnel --interactions STD`` data (the true logits hold pairwise products of per-id
factors of every pair of categorical fields), trains the same small model with no block (the MLP), ``fm``,
``dcn_v2`` and ``autoint`` under each tower, for each seed (the model seed; the data are the same), and
evaluates the test split against the true probabilities (``recmtl evaluate --reference``: the Bayes-optimal
AUC). Prints per task the test AUC mean ± std over seeds, the paired difference to the MLP (same seed) and the
reference AUC. With ``--export`` the first seed's runs are exported (parity check) and their onnxruntime scoring
speed measured on the test split (rows/s, one thread, median of 5).

Usage: python benchmarks/quality/interactions.py --work-dir DIR [--rows 60000] [--interactions 1.5]
       [--seeds 1,2,3] [--towers mmoe,shared_bottom,pepnet,separate] [--blocks none,fm,dcn_v2,autoint,gates] [--export]
       [--task-fields N] [--precision fp32] [--test-dir DIR] [--lr 0.005] [--steps-per-epoch 47] [--patience 2]
``--test-dir DIR`` evaluates on ``DIR/test.parquet`` (and its ``.truth.parquet``) instead of the work dir's test
split, e.g. a larger test split of the same generator (``recmtl datagen funnel`` with more ``--rows`` and the same
other options: the same true model; its test rows are drawn after the training rows of the smaller set).
A block may change parameters: ``--blocks none,dcn_v2+rank=16+num_layers=1`` (run directories are named so); a
list value is YAML in brackets, its commas kept: ``dcn_v2+exclude_fields=[user_id,item_id]``.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

BLOCKS = {"none": None, "fm": {"name": "fm"}, "dcn_v2": {"name": "dcn_v2", "num_layers": 2},
          "autoint": {"name": "autoint", "num_layers": 2},
          # dcn_v2's defaults before the "never lose" change: full-rank, randomly initialised cross layers
          "dcn_v2_random": {"name": "dcn_v2", "num_layers": 2, "init": "random", "rank": None},
          # autoint with and without the zero-initialised output scale (off by default)
          "autoint_scale": {"name": "autoint", "num_layers": 2, "output_scale": True},
          "autoint_noscale": {"name": "autoint", "num_layers": 2, "output_scale": False}}
TOWERS = {"mmoe": {"name": "mmoe", "num_experts": 4, "expert_units": [64], "task_units": [32]},
          "shared_bottom": {"name": "shared_bottom", "bottom_units": [64], "task_units": [32]},
          # PEPNet (issue 16's per-task feature selection): gates on the ids' embeddings, a [64, 32] MLP per task
          "pepnet": {"name": "pepnet", "gate_features": ["user_id", "item_id"], "task_units": [64, 32]},
          # pepnet's task MLPs without its gates: a [64, 32] MLP per task, nothing shared but the embeddings
          "separate": {"name": "soft_sharing", "units": [64, 32], "penalty": 0.0}}
#: not an interaction block: per-task feature gates (``feature_gates``) in front of the tower, no block
GATES = {"gates": {"sparsity": 0.0005}}


def block_spec(block: str) -> dict | None:
    """``BLOCKS[name]`` (None for ``gates``: no block), or ``name+key=value+...``: that block with parameters
    changed (values read as YAML)."""
    base, *changes = block.split("+")
    if base in GATES:
        return None
    spec = BLOCKS[base]
    if changes:
        spec = dict(spec or {})
        for change in changes:
            key, _, value = change.partition("=")
            spec[key] = yaml.safe_load(value)
    return spec


def split_blocks(blocks: str) -> list[str]:
    """``--blocks`` split on the commas outside brackets (``dcn_v2+exclude_fields=[user_id,item_id],none``)."""
    return re.split(r",(?![^\[]*\])", blocks)


def recmtl() -> str:
    return str(Path(sys.executable).with_name("recmtl"))


def run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE).stdout


def config(data: Path, tower: str, block: str, seed: int, categorical: int, dense: int, epochs: int,
           precision: str = "fp32", lr: float = 0.005, steps_per_epoch: int | None = None, patience: int = 1) -> dict:
    cfg = {
        "seed": seed,
        "data": {"train": str(data / "train.parquet"), "validation": str(data / "valid.parquet"),
                 "shuffle_buffer": 65536},
        "features": [{"name": n, "kind": "categorical"} for n in ["user_id", "item_id"] + [f"c{i:02d}" for i in range(3, categorical + 1)]]
        + [{"name": f"d{i:02d}", "kind": "dense"} for i in range(1, dense + 1)],
        "tasks": [{"name": "click", "head": "binary"}, {"name": "conversion", "head": "esmm", "params": {"ctr_task": "click"}}],
        "encoders": {"categorical": {"name": "embedding", "dim": 16}},
        "tower": TOWERS[tower],
        "optimizer": {"name": "adam", "lr": lr},
        "train": {"batch_size": 512, "epochs": epochs, "progress": False, "threads": 1, "precision": precision,
                  "steps_per_epoch": steps_per_epoch, "early_stopping": {"monitor": "mean/auc", "patience": patience}},
    }
    if block_spec(block) is not None:
        cfg["interaction"] = block_spec(block)
    if block in GATES:
        cfg["feature_gates"] = GATES[block]
    return cfg


def score_speed(model: Path, data: Path, repeats: int = 5) -> float:
    """Rows/s of onnxruntime scoring the whole of ``data`` in one call (median of ``repeats``, after a warm-up)."""
    import pyarrow.parquet as pq

    from recmtl.serving.score import Scorer
    scorer = Scorer(model, threads=1)
    table = pq.read_table(data)
    scorer.score(table.slice(0, 1000))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        scorer.score(table)
        times.append(time.perf_counter() - t0)
    return table.num_rows / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--interactions", type=float, default=1.5, help="datagen --interactions (0: the plain funnel)")
    ap.add_argument("--task-fields", type=int, default=0, help="datagen --task-fields (fields only one task uses)")
    ap.add_argument("--categorical", type=int, default=8)
    ap.add_argument("--dense", type=int, default=4)
    ap.add_argument("--cardinality", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--steps-per-epoch", type=int, default=None, help="train.steps_per_epoch (default: an epoch is a "
                    "pass; 48k rows at batch 512 are 94 steps a pass)")
    ap.add_argument("--patience", type=int, default=1, help="train.early_stopping.patience, in epochs")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--towers", default="mmoe,shared_bottom")
    ap.add_argument("--blocks", default="none,fm,dcn_v2,autoint")
    ap.add_argument("--precision", default="fp32", help="train.precision (fp32: the earlier tables; auto picks bf16 "
                    "on CPUs with AVX-512 BF16 or AMX)")
    ap.add_argument("--lr", type=float, default=0.005, help="Adam's learning rate (e.g. 0.005000005: the same "
                    "training perturbed by a relative 1e-6, a control for the bf16 vs fp32 differences)")
    ap.add_argument("--export", action="store_true", help="export and score the first seed's runs")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--no-train", action="store_true", help="only evaluate the runs already in WORK_DIR (a summary)")
    ap.add_argument("--test-dir", type=Path, default=None, help="evaluate on DIR/test.parquet (default: WORK_DIR/data's)")
    args = ap.parse_args(argv)
    work = args.work_dir
    data = work / "data"
    if not (data / "test.parquet").is_file():
        run([recmtl(), "datagen", "funnel", str(data), "--rows", str(args.rows), "--categorical", str(args.categorical),
             "--dense", str(args.dense), "--cardinality", str(args.cardinality), "--interactions", str(args.interactions),
             "--task-fields", str(args.task_fields)])
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict = {}
    for seed in seeds:  # seeds outermost: the blocks of one seed run close in time (shared machine)
        for tower in args.towers.split(","):
            for block in split_blocks(args.blocks):
                name = f"{tower}-{block}-s{seed}"
                run_dir = work / "runs" / name
                if args.no_train and not (run_dir / "wall.txt").is_file():
                    continue
                if not (run_dir / "metrics.json").is_file():
                    cfg_path = work / f"{name}.yaml"
                    cfg_path.write_text(yaml.safe_dump(config(data, tower, block, seed, args.categorical, args.dense, args.epochs,
                                                                     args.precision, args.lr, args.steps_per_epoch,
                                                                     args.patience)))
                    t0 = time.time()
                    run([recmtl(), "train", str(cfg_path), "--out", str(run_dir)])
                    (run_dir / "wall.txt").write_text(f"{time.time() - t0:.1f}")
                test = args.test_dir or data
                ev = json.loads(run([recmtl(), "evaluate", str(run_dir), str(test / "test.parquet"), "--json",
                                     "--reference", str(test / "test.truth.parquet")]))
                rec = {t: ev["metrics"][t]["auc"] for t in ("click", "conversion")}
                rec["reference"] = {t: ev["reference"][t]["auc"] for t in ("click", "conversion")}
                rec["wall_s"] = float((run_dir / "wall.txt").read_text())
                summary = json.loads((run_dir / "metrics.json").read_text())  # where each task peaked
                rec["best_epochs"] = {t: e["epoch"] for t, e in summary.get("task_best", {}).items()}
                rec["epochs_trained"] = len(summary["history"])
                if args.export and seed == seeds[0]:
                    model = work / f"{name}.onnx"
                    out = run([recmtl(), "export", str(run_dir), "-o", str(model)])
                    rec["export"] = out.strip().splitlines()[-1]
                    rec["score_rows_per_s"] = score_speed(model, data / "test.parquet")
                results[name] = rec
                print(name, json.dumps(rec), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print("\n| tower | block | test AUC click | test AUC conversion | Δ click vs MLP (paired) | Δ conversion vs MLP (paired) "
          "| wall (s) | seeds |")
    print("|---|---|---|---|---|---|---|---|")
    for tower in args.towers.split(","):
        for block in split_blocks(args.blocks):
            done = [s for s in seeds if f"{tower}-{block}-s{s}" in results]
            if not done:
                continue
            recs = [results[f"{tower}-{block}-s{s}"] for s in done]
            cells = []
            for t in ("click", "conversion"):
                v = [r[t] for r in recs]
                cells.append(f"{statistics.mean(v):.4f} ± {statistics.pstdev(v):.4f}")
            paired = [s for s in done if f"{tower}-none-s{s}" in results]
            for t in ("click", "conversion"):
                d = [results[f"{tower}-{block}-s{s}"][t] - results[f"{tower}-none-s{s}"][t] for s in paired]
                cells.append(f"{statistics.mean(d):+.4f} ± {statistics.pstdev(d):.4f}" if block != "none" and d else "—")
            wall = statistics.mean(r["wall_s"] for r in recs)
            print(f"| {tower} | {block} | " + " | ".join(cells) + f" | {wall:.0f} | {','.join(map(str, done))} |")
    if not results:
        return 1
    ref = results[next(iter(results))]["reference"]
    print(f"\nBayes-optimal (reference) test AUC: click {ref['click']:.4f}, conversion {ref['conversion']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
