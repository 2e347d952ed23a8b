"""End-to-end benchmark on UCI census-income (KDD) with the MMoE paper's protocol, through the real CLI.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts",
KDD 2018, section 6.3 (task group 1):

* task ``income``: ``income_50k == "50000+."``; task ``never_married``: ``marital_stat == "Never married"``
  (so ``marital_stat`` is a label, not a feature); ``instance_weight`` is not a feature (UCI);
* train on ``census-income.data`` (199,523 rows); split ``census-income.test`` (99,762 rows) at random
  1:1 into validation (early stopping, best checkpoint) and test (reported).

The script runs what a user runs, each step a subprocess of the ``recmtl`` console script:
``recmtl convert`` (train and test CSV -> Parquet), ``recmtl split`` (test 1:1), ``recmtl init`` (one
config), then ``recmtl train`` once per tower and seed with ``--set`` overrides; it reads each run's
``metrics.json`` and prints a markdown table of test AUC per task (mean ± sample std over seeds) and the
wall time of each run. Results are recorded in benchmarks/RESULTS.md.

The data is read from ``../shared/data/census-income-kdd`` next to the repository (see its SOURCE.md);
nothing is copied into the repository: every output goes to ``--work-dir`` (a temporary folder unless
given; kept when given, and the converted Parquet files found there are reused).

Usage: python benchmarks/quality/census_income.py [--seeds 1,2,3] [--towers mmoe,shared_bottom | all] [--work-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# benchmarks/quality/ -> benchmarks/ -> the repository -> its parent, which holds shared/data
DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "census-income-kdd"
TRAIN_CSV = "census-income.data.gz"
TEST_CSV = "census-income.test.gz"

# UCI's 42 columns, no header (names as used by keras-mmoe, PaddleRec and DeepCTR; see SOURCE.md)
COLUMNS = [
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour", "hs_college",
    "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin", "sex", "union_member",
    "unemp_reason", "full_or_part_emp", "capital_gains", "capital_losses", "stock_dividends",
    "tax_filer_stat", "region_prev_res", "state_prev_res", "det_hh_fam_stat", "det_hh_summ",
    "instance_weight", "mig_chg_msa", "mig_chg_reg", "mig_move_reg", "mig_same", "mig_prev_sunbelt",
    "num_emp", "fam_under_18", "country_father", "country_mother", "country_self", "citizenship",
    "own_or_self", "vet_question", "vet_benefits", "weeks_worked", "year", "income_50k",
]
# the 7 continuous attributes (integers in the file; `recmtl init` would make them categorical)
DENSE = ["age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp", "weeks_worked"]
TASKS = {"income": "income_50k", "never_married": "marital_stat"}
POSITIVE = {"income_50k": "50000+.", "marital_stat": "Never married"}

# Paper-like sizes: MMoE with 8 experts of 16 units and task towers of 8 units; the shared-bottom
# baseline gets one bottom layer as wide as all experts together (8 x 16 = 128) and the same towers.
TOWERS = {
    "mmoe": "{name: mmoe, num_experts: 8, expert_units: [16], task_units: [8]}",
    "shared_bottom": "{name: shared_bottom, bottom_units: [128], task_units: [8]}",
    # the other built-in towers at comparable sizes (8 experts / columns of 16 units where that applies)
    "omoe": "{name: omoe, num_experts: 8, expert_units: [16], task_units: [8]}",
    "cgc": "{name: cgc, num_task_experts: 2, num_shared_experts: 4, expert_units: [16], task_units: [8]}",
    "ple": "{name: ple, num_levels: 2, num_task_experts: 2, num_shared_experts: 4, expert_units: [16], task_units: [8]}",
    "hmoe": "{name: hmoe, num_groups: 2, experts_per_group: 4, expert_units: [16], task_units: [8]}",
    "dselect_k": "{name: dselect_k, num_experts: 8, k: 2, expert_units: [16], task_units: [8]}",
    "stem": "{name: stem, embedding_dim: 16, num_task_experts: 2, num_shared_experts: 4, expert_units: [16], task_units: [8]}",
    "cross_stitch": "{name: cross_stitch, units: [64, 16], task_units: [8]}",
    "soft_sharing": "{name: soft_sharing, units: [64, 16, 8], penalty: 0.001}",
    "aitm": "{name: aitm, units: [64, 16, 8]}",
}
# The same for both towers (recmtl init's defaults otherwise: embedding dim 16, Adam, batch 2048).
COMMON = {
    "optimizer.lr": "0.003",
    "train.epochs": "20",  # an upper bound: early stopping on validation mean AUC (patience 2) ends most runs
    "train.early_stopping.patience": "2",
    "train.batch_size": "2048",
    "encoders.categorical.dim": "16",
    "train.progress": "false",
    # One intra-op thread: these models are small, and on a 2-core machine shared with other work torch's
    # default (one thread per core) oversubscribes the cores and ran 10-20x slower (3k vs 65k rows/s).
    # Results are identical either way.
    "train.threads": "1",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def recmtl_executable() -> str:
    exe = Path(sys.executable).with_name("recmtl")
    if exe.is_file():
        return str(exe)
    found = shutil.which("recmtl")
    if not found:
        sys.exit("census_income: the `recmtl` console script is neither next to this Python nor on PATH; "
                 "install the package (make install) and run with .venv/bin/python")
    return found


def run_cli(recmtl: str, *args: str, cwd: Path) -> tuple[float, str]:
    """Run one ``recmtl`` command; return its wall time and stdout, exit with its stderr if it fails; its warnings
    (stderr lines starting ``warning:``, e.g. a task's dead head-input units) are passed on to stderr."""
    cmd = [recmtl, *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"census_income: `{' '.join(cmd)}` failed with exit {proc.returncode}:\n"
                 f"{proc.stderr[-4000:]}{proc.stdout[-2000:]}")
    for line in proc.stderr.splitlines():
        if line.startswith("warning:"):
            print(line, file=sys.stderr, flush=True)
    return seconds, proc.stdout


def prepare(recmtl: str, work: Path, data_dir: Path) -> Path:
    """convert -> split -> init; returns the config path. Parquet files already in ``work`` are reused."""
    names = ",".join(COLUMNS)
    for csv, out in ((TRAIN_CSV, "train.parquet"), (TEST_CSV, "test_full.parquet")):
        if not (work / out).is_file():
            sec, _ = run_cli(recmtl, "convert", str(data_dir / csv), "-o", out, "--no-header", "--names", names,
                             "--null-value", "?", cwd=work)
            log(f"convert {csv}: {sec:.1f} s")
    if not ((work / "valid.parquet").is_file() and (work / "test.parquet").is_file()):
        _, out = run_cli(recmtl, "split", "test_full.parquet", "-o", "valid.parquet", "-o", "test.parquet",
                         "--fractions", "0.5,0.5", "--seed", "0", cwd=work)
        log(f"split: {out.strip()}")
    cfg = work / "census.yaml"
    args = ["init", "train.parquet", "--exclude", "instance_weight", "--validation", "valid.parquet",
            "--test", "test.parquet", "--tower", "mmoe", "-o", cfg.name, "--force"]
    for task, col in TASKS.items():
        args += ["--task", f"{task}={col}"]
    for col, value in POSITIVE.items():
        args += ["--positive", f"{col}={value}"]
    for col in DENSE:
        args += ["--dense", col]
    _, out = run_cli(recmtl, *args, cwd=work)
    log(out.strip())
    return cfg


def train_one(recmtl: str, work: Path, cfg: Path, tower: str, seed: int, overrides: dict[str, str]) -> dict[str, Any]:
    run_dir = work / "runs" / f"{tower}-seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    sets = {**overrides, "tower": TOWERS[tower], "seed": str(seed)}
    args = ["train", cfg.name, "--out", str(run_dir.relative_to(work))]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    seconds, _ = run_cli(recmtl, *args, cwd=work)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    epochs = metrics["history"]
    result = {
        "tower": tower, "seed": seed, "wall_s": seconds, "best_epoch": metrics["best_epoch"], "epochs": len(epochs),
        "epoch_s": sum(h["seconds"] for h in epochs),
        "test": {t: metrics["test"][t]["auc"] for t in TASKS},
        "valid": {t: metrics["validation"][t]["auc"] for t in TASKS},
    }
    log(f"{tower} seed {seed}: test AUC " + ", ".join(f"{t} {v:.4f}" for t, v in result["test"].items())
        + f"; best epoch {result['best_epoch']}/{result['epochs']}; {seconds:.0f} s")
    return result


def mean_std(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(results: list[dict[str, Any]], towers: list[str]) -> str:
    head = ["tower", "seeds"] + [f"test AUC {t}" for t in TASKS] + ["best epoch", "wall time per run (s)",
                                                                     "epoch loop per run (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tower in towers:
        rows = [r for r in results if r["tower"] == tower]
        if not rows:
            continue
        cells = [tower, ",".join(str(r["seed"]) for r in rows)]
        cells += [mean_std([r["test"][t] for r in rows]) for t in TASKS]
        cells += [",".join(str(r["best_epoch"]) for r in rows), mean_std([r["wall_s"] for r in rows], 0),
                  mean_std([r["epoch_s"] for r in rows], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_run_table(results: list[dict[str, Any]]) -> str:
    head = ["tower", "seed"] + [f"{t} test / valid AUC" for t in TASKS] + ["best epoch / epochs run", "wall (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["tower"], str(r["seed"])]
        cells += [f"{r['test'][t]:.4f} / {r['valid'][t]:.4f}" for t in TASKS]
        cells += [f"{r['best_epoch']} / {r['epochs']}", f"{r['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds (default 1,2,3)")
    ap.add_argument("--towers", default="mmoe,shared_bottom", help=f"comma-separated, of {', '.join(TOWERS)}; or all")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="folder for Parquet files, config and runs (default: a temporary folder, removed after)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra `recmtl train --set` override for every run (after the built-in ones); repeatable")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's results to this JSON file")
    args = ap.parse_args()

    if not DATA_DIR.is_dir() or not all((DATA_DIR / f).is_file() for f in (TRAIN_CSV, TEST_CSV)):
        sys.exit(f"census_income: the census-income data is not at {DATA_DIR} (expected {TRAIN_CSV} and "
                 f"{TEST_CSV}; see SOURCE.md there). This benchmark needs the shared data folder next to the repo.")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        sys.exit(f"census_income: --seeds '{args.seeds}' must be integers like 1,2,3")
    towers = list(TOWERS) if args.towers == "all" else [t.strip() for t in args.towers.split(",") if t.strip()]
    unknown = [t for t in towers if t not in TOWERS]
    if unknown or not towers or not seeds:
        sys.exit(f"census_income: --towers must name some of {', '.join(TOWERS)} (got {args.towers}); --seeds some integers")
    overrides = dict(COMMON)
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"census_income: --set '{item}' must look like key.path=value")
        overrides[key.strip()] = value

    recmtl = recmtl_executable()
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="census-income-")
        work = Path(tmp.name)
    else:
        work = args.work_dir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    try:
        log(f"work dir {work}")
        cfg = prepare(recmtl, work, DATA_DIR)
        results = []
        for seed in seeds:  # seeds outer, towers inner: load changes on a shared machine hit both towers alike
            for tower in towers:
                results.append(train_one(recmtl, work, cfg, tower, seed, overrides))
    finally:
        if tmp is not None:
            tmp.cleanup()

    print(f"census-income (UCI KDD), MMoE paper protocol; {platform.node()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}")
    print("overrides: " + " ".join(f"{k}={v}" for k, v in overrides.items()))
    print("towers: " + "; ".join(f"{t} = {TOWERS[t]}" for t in towers))
    print()
    print(table(results, towers))
    print()
    print(per_run_table(results))
    if args.json:
        args.json.write_text(json.dumps({"overrides": overrides, "towers": {t: TOWERS[t] for t in towers},
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
