"""Interaction blocks, feature gates and PEPNet on UCI census-income at a reduced budget (issue 16).

The data preparation of ``census_income.py`` (``recmtl convert``, ``split`` of the test file 1:1 into validation
and test, ``init``; the MMoE paper's task pair ``income`` / ``never_married``), then a random ``--train-rows``
subset of the 199,523 training rows (seed 0; validation and test in full), and one ``recmtl train`` per variant
and seed with the census benchmark's settings (``census_income.COMMON``: Adam lr 0.003, batch 2048, 16-d
embeddings, 1 thread; early stopping on validation mean AUC, patience 2) capped at ``--epochs``. Variants:
``mmoe`` (8 experts of 16, towers of 8) with no block, ``fm``, ``dcn_v2`` (2 cross layers, the defaults),
``autoint`` (2 layers), ``gates`` (``feature_gates: {sparsity: 0.0005}``), and ``pepnet`` (the tower, no block;
``gate_features`` null: every categorical feature, towers [16, 8]; ``pepnet_leaky`` / ``pepnet_bias`` with
``output_activation: leaky_relu`` / ``task_bias_init: 0.01``). Each run's dead head-input units at the tasks' best
epochs are printed with its AUCs, and the trainer's warnings passed on. A block variant may change parameters:
``fm+normalize=batch`` (values read as YAML; the run directories are named so). Prints test AUC per task (mean ± std over
seeds), the difference to mmoe with no block paired by seed, and the run directories (for ``gate_matrix.py``).

Usage: python benchmarks/quality/census_blocks.py --work-dir DIR [--variants none,fm,dcn_v2,autoint]
       [--seeds 1,2] [--train-rows 50000] [--epochs 6] [--precision fp32] [--tower mmoe] [--json OUT] [--no-train]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from census_income import COMMON, DATA_DIR, TASKS, TOWERS, prepare, recmtl_executable, run_cli  # noqa: E402

VARIANTS = {
    "none": {},
    "fm": {"interaction": "{name: fm}"},
    "dcn_v2": {"interaction": "{name: dcn_v2, num_layers: 2}"},
    "autoint": {"interaction": "{name: autoint, num_layers: 2}"},
    "gates": {"feature_gates": "{sparsity: 0.0005}"},
    "pepnet": {"tower": "{name: pepnet, task_units: [16, 8]}"},
    # pepnet's narrow-tower failure (RESULTS.md, "Dead units on census"): a leaky last task layer, positive biases
    "pepnet_leaky": {"tower": "{name: pepnet, task_units: [16, 8], output_activation: leaky_relu}"},
    "pepnet_bias": {"tower": "{name: pepnet, task_units: [16, 8], task_bias_init: 0.01}"},
}


def variant_sets(variant: str) -> dict[str, str]:
    """The ``--set`` overrides of ``VARIANTS[name]``, or of ``name+key=value+...``: that block with parameters changed."""
    base, *changes = variant.split("+")
    if base not in VARIANTS:
        sys.exit(f"census_blocks: unknown variant {base!r} (one of {', '.join(VARIANTS)})")
    sets = dict(VARIANTS[base])
    if changes:
        if "interaction" not in sets:
            sys.exit(f"census_blocks: {variant!r}: only an interaction block takes parameters")
        spec = yaml.safe_load(sets["interaction"])
        for change in changes:
            key, _, value = change.partition("=")
            spec[key] = yaml.safe_load(value)
        sets["interaction"] = json.dumps(spec)
    return sets


def subsample(src: Path, dst: Path, rows: int) -> Path:
    """A random ``rows``-row subset of ``src`` (seed 0), written once."""
    if not dst.is_file():
        import numpy as np
        table = pq.read_table(src)
        keep = np.sort(np.random.default_rng(0).choice(table.num_rows, size=min(rows, table.num_rows), replace=False))
        pq.write_table(table.take(keep), dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--variants", default="none,fm,dcn_v2,autoint")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--train-rows", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--tower", default="mmoe", choices=sorted(TOWERS), help="census_income.TOWERS entry under the "
                    "variants (pepnet replaces it); run directories of other towers are named TOWER-VARIANT-sSEED")
    ap.add_argument("--precision", default="fp32", help="train.precision (fp32: the earlier tables; auto picks bf16 "
                    "on CPUs with AVX-512 BF16 or AMX)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-train", action="store_true", help="only summarise the runs already in WORK_DIR")
    args = ap.parse_args(argv)
    if not DATA_DIR.is_dir():
        sys.exit(f"census_blocks: the census-income data is not at {DATA_DIR} (see its SOURCE.md)")
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    recmtl = recmtl_executable()
    cfg = prepare(recmtl, work, DATA_DIR)
    train = subsample(work / "train.parquet", work / f"train_{args.train_rows}.parquet", args.train_rows)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    results: dict[str, dict] = {}
    prefix = "" if args.tower == "mmoe" else f"{args.tower}-"
    for seed in seeds:  # seeds outermost: a seed's variants run close in time (shared machine)
        for variant in variants:
            name = f"{prefix}{variant}-s{seed}"
            run_dir = work / "runs" / name
            if args.no_train and not (run_dir / "metrics.json").is_file():
                continue
            if not (run_dir / "metrics.json").is_file():
                sets = {**COMMON, "train.epochs": str(args.epochs), "data.train": str(train), "seed": str(seed),
                        "train.precision": args.precision, "tower": TOWERS[args.tower], **variant_sets(variant)}
                cmd = ["train", cfg.name, "--out", str(run_dir)]
                for key, value in sets.items():
                    cmd += ["--set", f"{key}={value}"]
                t0 = time.time()
                run_cli(recmtl, *cmd, cwd=work)
                (run_dir / "wall.txt").write_text(f"{time.time() - t0:.1f}")
            metrics = json.loads((run_dir / "metrics.json").read_text())
            if "test" not in metrics:  # still training (--no-train beside a running benchmark)
                continue
            rec = {t: metrics["test"][t]["auc"] for t in TASKS}
            rec.update(best_epoch=metrics["best_epoch"], epochs=len(metrics["history"]),
                       dead_units={t: f"{d['dead']}/{d['units']}" for t, d in metrics.get("dead_units", {}).items()},
                       wall_s=float((run_dir / "wall.txt").read_text()) if (run_dir / "wall.txt").is_file()
                       else sum(h["seconds"] for h in metrics["history"]), run_dir=str(run_dir))
            results[name] = rec
            print(name, json.dumps(rec), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"\ncensus-income, {args.train_rows} training rows, at most {args.epochs} epochs, seeds {args.seeds}")
    head = ["variant", "seeds"] + [f"test AUC {t}" for t in TASKS] + [f"Δ {t} vs {args.tower}, paired" for t in TASKS]
    print("| " + " | ".join(head) + " | best epochs | wall (s) |\n|" + "---|" * (len(head) + 2))
    for variant in variants:
        done = [s for s in seeds if f"{prefix}{variant}-s{s}" in results]
        recs = [results[f"{prefix}{variant}-s{s}"] for s in done]
        if not recs:
            continue
        cells = [variant, ",".join(map(str, done))]
        for t in TASKS:
            v = [r[t] for r in recs]
            cells.append(f"{statistics.mean(v):.4f} ± {statistics.pstdev(v):.4f}")
        for t in TASKS:
            d = [results[f"{prefix}{variant}-s{s}"][t] - results[f"{prefix}none-s{s}"][t] for s in done
                 if f"{prefix}none-s{s}" in results]
            cells.append(f"{statistics.mean(d):+.4f} ± {statistics.pstdev(d):.4f}" if variant != "none" and d else "—")
        cells += [",".join(str(r["best_epoch"]) for r in recs), f"{statistics.mean(r['wall_s'] for r in recs):.0f}"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
