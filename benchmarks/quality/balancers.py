"""Every registered loss balancer x {shared_bottom, mmoe} on census-income and on MMoE-synthetic data.

Issue #6's comparison. For each data set, tower, seed and balancer one model is trained through the CLI,
``recmtl train CONFIG --out RUN --set ...`` (``recmtl.cli.main`` called in this process, so no Python
start-up per run), and the script reports

* the per-task test metric (census-income: AUC of ``income`` and ``never_married``, the MMoE paper's
  task group 1; mmoe-synthetic: RMSE of ``y1`` and ``y2``), mean ± sample std over the seeds;
* the training time per step relative to ``fixed``, two ways: (1) a step-timing phase after the runs:
  one model per data set and tower, every balancer in turn for ``--timing-steps`` steps on the same
  batches, ``--timing-rounds`` rounds (the order rotating), median CPU time per step of the training
  thread / fixed's; (2) in-run wall time: the epoch-loop seconds / steps of each run divided by the
  ``fixed`` run of the same data set, tower and seed (runs are interleaved: seeds outermost, balancers
  innermost). (1) is the number to read on a busy machine: other processes' load does not enter it.

The balancers are discovered from the plugin registry (``recmtl.registry.load_registry()``), so a newly
installed balancer is benchmarked without editing this file; every balancer runs with its default
parameters and equal task weights. A run that fails is reported as failed, not dropped silently.

census-income: the data preparation of ``benchmarks/quality/census_income.py`` (``recmtl convert``, ``split``,
``init``), then a random subsample of ``--census-rows`` training rows and ``--eval-rows`` validation and
test rows (the full files with ``--census-rows 0 --eval-rows 0``). mmoe-synthetic: ``recmtl datagen
mmoe-synthetic --correlation 0.1`` (low task correlation), ``--synthetic-rows`` rows split 80/10/10.

Usage (the figures in RESULTS.md):
    python benchmarks/quality/balancers.py --work-dir /tmp/balancers --json /tmp/balancers/results.json \
        --plot benchmarks/quality/balancers.png
Scale up with --census-rows 0 --eval-rows 0 --epochs 10 --seeds 1,2,3,4,5. ``--resume`` skips runs
already in the --json file; ``--report-only`` redraws the table and plot from it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import census_income

DATASETS = {
    "census": {"tasks": list(census_income.TASKS), "metric": "auc", "higher": True},
    "synthetic": {"tasks": ["y1", "y2"], "metric": "rmse", "higher": False},
}
TOWERS = census_income.TOWERS


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def subsample(src: Path, dst: Path, rows: int, seed: int) -> Path:
    """``rows`` random rows of ``src`` written to ``dst`` (``src`` itself when rows is 0 or too large)."""
    import numpy as np
    import pyarrow.parquet as pq
    if rows <= 0:
        return src
    if dst.is_file() and pq.ParquetFile(dst).metadata.num_rows == rows:
        return dst
    table = pq.read_table(src)
    if rows >= table.num_rows:
        return src
    idx = np.sort(np.random.default_rng(seed).choice(table.num_rows, rows, replace=False))
    pq.write_table(table.take(idx), dst)
    return dst


def census_config(work: Path, args: argparse.Namespace) -> tuple[Path, list[str]]:
    """The census config written by ``recmtl init`` and the overrides every census run gets."""
    cfg = census_income.prepare(census_income.recmtl_executable(), work, census_income.DATA_DIR)
    files = {"train": subsample(work / "train.parquet", work / "train_sub.parquet", args.census_rows, 0),
             "validation": subsample(work / "valid.parquet", work / "valid_sub.parquet", args.eval_rows, 1),
             "test": subsample(work / "test.parquet", work / "test_sub.parquet", args.eval_rows, 2)}
    sets = [f"{k}={v}" for k, v in census_income.COMMON.items() if k != "train.epochs"]
    sets += [f"data.{k}={p.resolve()}" for k, p in files.items()]
    return cfg, sets


def synthetic_config(work: Path, args: argparse.Namespace) -> tuple[Path, list[str]]:
    """MMoE-synthetic regression pair with correlation ``--correlation``; 100 dense features."""
    import yaml

    from recmtl.data.synthetic import mmoe_synthetic
    data = work / "synthetic"
    if not (data / "test.parquet").is_file():
        mmoe_synthetic(data, args.synthetic_rows, args.correlation, seed=0)
    raw = {
        "seed": 1,
        "data": {"train": str(data / "train.parquet"), "validation": str(data / "valid.parquet"),
                 "test": str(data / "test.parquet")},
        "features": [{"name": f"x{i:03d}", "kind": "dense"} for i in range(100)],
        "tasks": [{"name": t, "head": "regression"} for t in DATASETS["synthetic"]["tasks"]],
        "tower": {"name": "mmoe"},
    }
    cfg = work / "synthetic.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    sets = [f"{k}={v}" for k, v in census_income.COMMON.items() if k not in ("train.epochs", "encoders.categorical.dim")]
    return cfg, sets


def train_one(cfg: Path, sets: list[str], run_dir: Path, batch_size: int) -> dict[str, Any]:
    """One ``recmtl train`` through the CLI, in this process; returns test metrics and step timing."""
    from recmtl.cli import main as recmtl_main
    if run_dir.exists():
        shutil.rmtree(run_dir)
    argv = ["train", str(cfg), "--out", str(run_dir)]
    for item in sets:
        argv += ["--set", item]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            recmtl_main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if code != 0:
        raise RuntimeError(f"recmtl train exited {code}: {err.getvalue().strip()[-300:]}")
    summary = json.loads((run_dir / "metrics.json").read_text())
    history = summary["history"]
    steps = sum(math.ceil(h["rows"] / batch_size) for h in history)
    seconds = sum(h["seconds"] for h in history)
    return {"test": summary["test"], "steps": steps, "seconds": seconds, "ms_per_step": 1000 * seconds / steps,
            "best_epoch": summary["best_epoch"], "epochs": len(history)}


def step_timing(cfg: Path, sets: list[str], schema_dir: Path, balancers: list[str], steps: int,
                rounds: int) -> dict[str, float]:
    """Median CPU milliseconds of one training step (forward, balancer backward, optimiser step) per
    balancer, all on one model and the same few batches, interleaved in blocks of ``steps`` over ``rounds``
    rounds (the order rotates each round). CPU time of this thread (torch runs single-threaded here), not
    wall time, so other processes on a shared machine do not count; plus the task-gradient cosines."""
    import itertools

    import numpy as np
    import torch

    from recmtl.config import load_config
    from recmtl.data.parquet import ParquetSource
    from recmtl.registry import load_registry
    from recmtl.schema import FittedSchema
    from recmtl.training.batches import blocks, minibatches
    from recmtl.training.model import MultiTaskModel
    from recmtl.training.optimizers import make_optimizers

    config = load_config(cfg, sets)
    torch.set_num_threads(config.train.threads or 1)
    torch.manual_seed(0)
    registry = load_registry()
    schema = FittedSchema.load(schema_dir)
    src = ParquetSource(config.resolve(config.data.train), config.columns())
    rng = np.random.default_rng(0)
    batches = list(itertools.islice(minibatches(blocks(src, schema, config.data.read_rows, rng),
                                                config.train.batch_size, config.data.shuffle_buffer, rng), 8))
    model = MultiTaskModel(config, schema, registry)
    model.train()
    shared = model.shared_parameters()
    tasks = [t.name for t in config.tasks]
    state = {}
    for b in balancers:
        bal = registry.create("balancer", b, tasks, {t: 1.0 for t in tasks})
        state[b] = (bal, make_optimizers(config, model, bal))
    times: dict[str, list[float]] = {b: [] for b in balancers}
    for r in range(rounds):
        for b in balancers[r % len(balancers):] + balancers[:r % len(balancers)]:
            bal, optimizers = state[b]
            for k in range(steps):
                batch = batches[k % len(batches)]
                t0 = time.thread_time()
                losses = model.losses(model(batch.inputs), batch.labels, batch.mask)
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                bal.backward(losses, shared)
                for opt in optimizers:
                    opt.step()
                times[b].append(time.thread_time() - t0)
    # how much the tasks conflict on this model after those steps: cosine of the two task gradients on
    # the shared parameters, per batch (what the gradient-manipulation balancers react to)
    from recmtl.gradients import task_gradients
    cosines = []
    for batch in batches:
        losses = model.losses(model(batch.inputs), batch.labels, batch.mask)
        g = task_gradients([losses[t] for t in tasks], shared)
        cosines.append(float(g[0] @ g[1] / (g[0].norm() * g[1].norm()).clamp_min(1e-12)))
    return {b: 1000 * statistics.median(v) for b, v in times.items()}, cosines


def run_all(args: argparse.Namespace, results: list[dict[str, Any]], save: Any) -> None:
    from recmtl.registry import load_registry
    registry = load_registry()
    balancers = args.balancers.split(",") if args.balancers else sorted(registry.names("balancer"))
    if "fixed" in balancers:  # fixed first in every group: the reference for relative step time
        balancers = ["fixed"] + [b for b in balancers if b != "fixed"]
    work = args.work_dir
    configs = {}
    if "census" in args.datasets:
        if census_income.DATA_DIR.is_dir():
            configs["census"] = census_config(work, args)
        else:
            log(f"census-income data not found at {census_income.DATA_DIR}: skipping that data set")
    if "synthetic" in args.datasets:
        configs["synthetic"] = synthetic_config(work, args)
    done = {(r["dataset"], r["tower"], r["seed"], r["balancer"]) for r in results if not r.get("timing")}
    for dataset, (cfg, base_sets) in configs.items():  # warm-up (discarded): first-run costs skew step times;
        # its run directory keeps the fitted schema for the step-timing phase
        train_one(cfg, base_sets + ["train.epochs=1", f"tower={TOWERS[args.towers[0]]}",
                                    f"train.batch_size={args.batch_size}"], work / "runs" / f"warmup-{dataset}",
                  args.batch_size)
    epochs = {"census": args.epochs, "synthetic": args.synthetic_epochs}
    for seed in args.seeds:
        for dataset, (cfg, base_sets) in configs.items():
            for tower in args.towers:
                for balancer in balancers:
                    key = (dataset, tower, seed, balancer)
                    if key in done:
                        continue
                    sets = base_sets + [f"tower={TOWERS[tower]}", f"seed={seed}", f"train.epochs={epochs[dataset]}",
                                        f"train.batch_size={args.batch_size}",
                                        f"balancer={{name: {balancer}}}"]
                    run_dir = work / "runs" / f"{dataset}-{tower}-{balancer}-seed{seed}"
                    row: dict[str, Any] = {"dataset": dataset, "tower": tower, "seed": seed, "balancer": balancer}
                    t0 = time.perf_counter()
                    try:
                        row.update(train_one(cfg, sets, run_dir, args.batch_size))
                    except Exception as exc:  # noqa: BLE001 - a broken balancer is reported, the rest still run
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    row["wall_s"] = time.perf_counter() - t0
                    shutil.rmtree(run_dir, ignore_errors=True)
                    results.append(row)
                    save()
                    metric = DATASETS[dataset]["metric"]
                    log(f"{dataset} {tower} seed {seed} {balancer}: " + (
                        row["error"] if "error" in row else
                        " ".join(f"{t} {metric} {row['test'][t][metric]:.4f}" for t in DATASETS[dataset]["tasks"])
                        + f", {row['ms_per_step']:.1f} ms/step, {row['wall_s']:.0f} s"))
    if args.timing_rounds <= 0:
        return
    timed = results_timing(results)
    for dataset, (cfg, base_sets) in configs.items():
        for tower in args.towers:
            if (dataset, tower) in timed:
                continue
            sets = base_sets + [f"tower={TOWERS[tower]}", f"train.batch_size={args.batch_size}"]
            ms, cosines = step_timing(cfg, sets, work / "runs" / f"warmup-{dataset}", balancers, args.timing_steps,
                                      args.timing_rounds)
            results.append({"timing": True, "dataset": dataset, "tower": tower, "ms": ms, "cosine": cosines})
            save()
            log(f"step timing {dataset} {tower}: " + ", ".join(f"{b} {v / ms['fixed']:.2f}x" for b, v in ms.items())
                + f"; task-gradient cosine {min(cosines):.2f}..{max(cosines):.2f}")


def results_timing(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    return {(r["dataset"], r["tower"]): r["ms"] for r in results if r.get("timing")}


def mean_std(values: list[float], digits: int, signed: bool = False) -> str:
    if not values:
        return "–"
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{values[0]:{sign}.{digits}f}"
    return f"{statistics.mean(values):{sign}.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarise(results: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(dataset, tower, balancer) -> per-task metric values, relative step times, failures."""
    timing = results_timing(results)
    results = [r for r in results if not r.get("timing")]
    fixed_runs = {(r["dataset"], r["tower"], r["seed"]): r for r in results
                  if r["balancer"] == "fixed" and "error" not in r}
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in results:
        s = out.setdefault((r["dataset"], r["tower"], r["balancer"]),
                           {"metric": {t: [] for t in DATASETS[r["dataset"]]["tasks"]},
                            "delta": {t: [] for t in DATASETS[r["dataset"]]["tasks"]}, "rel": [], "ms": [],
                            "errors": [], "seeds": [], "step": None})
        if "error" in r:
            s["errors"].append(r["error"])
            continue
        s["seeds"].append(r["seed"])
        m = DATASETS[r["dataset"]]["metric"]
        fixed = fixed_runs.get((r["dataset"], r["tower"], r["seed"]))
        for t in s["metric"]:
            s["metric"][t].append(r["test"][t][m])
            if fixed:  # paired by seed: same data order and initial weights as the fixed run
                s["delta"][t].append(r["test"][t][m] - fixed["test"][t][m])
        s["ms"].append(r["ms_per_step"])
        if fixed:
            s["rel"].append(r["ms_per_step"] / fixed["ms_per_step"])
    for (dataset, tower), ms in timing.items():
        for b, v in ms.items():
            if (dataset, tower, b) in out and "fixed" in ms:
                out[(dataset, tower, b)]["step"] = v / ms["fixed"]
    return out


def table(results: list[dict[str, Any]], dataset: str) -> str:
    summary = summarise(results)
    spec = DATASETS[dataset]
    tasks, metric = spec["tasks"], spec["metric"]
    head = ["balancer", "tower"] + [x for t in tasks for x in (f"{t} test {metric.upper()}", "Δ vs fixed")] + [
        "CPU time/step vs fixed", "in-run wall time/step vs fixed", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted((k for k in summary if k[0] == dataset), key=lambda k: (k[2] != "fixed", k[2], k[1]))
    for _, tower, balancer in keys:
        s = summary[(dataset, tower, balancer)]
        if not s["seeds"]:
            lines.append(f"| {balancer} | {tower} | failed: {s['errors'][0]} |" + " |" * (len(head) - 3))
            continue
        cells = [balancer, tower] + [x for t in tasks for x in (
            mean_std(s["metric"][t], 4), "" if balancer == "fixed" else mean_std(s["delta"][t], 4, signed=True))]
        step = "–" if s["step"] is None else f"{s['step']:.2f}×"
        cells += [step, mean_std(s["rel"], 2) + "×", ",".join(map(str, s["seeds"]))
                  + (f" ({len(s['errors'])} failed)" if s["errors"] else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    summary = summarise(results)
    datasets = [d for d in DATASETS if any(k[0] == d for k in summary)]
    fig, axes = plt.subplots(len(datasets), 3, figsize=(12, 0.9 + 2.6 * len(datasets) + 0.12 * len(summary) / 2),
                             squeeze=False)
    markers = {"mmoe": ("o", "C0"), "shared_bottom": ("s", "C1")}
    for row, dataset in enumerate(datasets):
        spec = DATASETS[dataset]
        names = sorted({k[2] for k in summary if k[0] == dataset}, key=lambda b: (b != "fixed", b))
        ypos = {b: i for i, b in enumerate(reversed(names))}
        better = "> 0 is better" if spec["higher"] else "< 0 is better"
        panels = [(t, f"{dataset}: {t} test {spec['metric'].upper()} − fixed, paired by seed ({better})")
                  for t in spec["tasks"]] + [(None, f"{dataset}: CPU time per step / fixed")]
        for col, (task, title) in enumerate(panels):
            ax = axes[row][col]
            for k, (tower, (marker, color)) in enumerate(markers.items()):
                for b in names:
                    s = summary.get((dataset, tower, b))
                    if not s or not s["seeds"]:
                        continue
                    vals = s["delta"][task] if task else ([s["step"]] if s["step"] is not None else s["rel"])
                    if not vals:
                        continue
                    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                    ax.errorbar(statistics.mean(vals), ypos[b] + (0.15 if k == 0 else -0.15), xerr=sd, fmt=marker,
                                color=color, ms=4, capsize=2, label=tower if b == names[0] else None)
            ax.axvline(0.0 if task else 1.0, color="grey", lw=0.8, ls="--")
            ax.set_yticks(list(ypos.values()), list(ypos.keys()), fontsize=7)
            ax.tick_params(axis="x", labelsize=7)
            ax.set_title(title, fontsize=8)
            ax.grid(axis="x", alpha=0.3)
        axes[row][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def report(data: dict[str, Any], plot_path: Path | None) -> str:
    results = data["results"]
    out = [f"{data['machine']}; {data['date']}; command: `{data['command']}`", ""]
    for dataset in DATASETS:
        if any(r["dataset"] == dataset for r in results):
            out += [f"**{dataset}**", "", table(results, dataset), ""]
    for r in results:
        if r.get("cosine"):
            c = r["cosine"]
            out.append(f"- {r['dataset']}, {r['tower']}: cosine of the two task gradients on the shared parameters "
                       f"after the timing steps, {len(c)} batches: mean {statistics.mean(c):+.2f}, "
                       f"range {min(c):+.2f} .. {max(c):+.2f}")
    failures = sorted({(r["balancer"], r["error"]) for r in results if "error" in r and not r.get("timing")})
    for b, err in failures:
        out.append(f"- `{b}` failed: {err}")
    if plot_path:
        plot(results, plot_path)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--towers", default="shared_bottom,mmoe")
    ap.add_argument("--datasets", default="census,synthetic")
    ap.add_argument("--balancers", default="", help="comma-separated (default: every registered balancer)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per census run (best epoch by validation; default 3)")
    ap.add_argument("--synthetic-epochs", type=int, default=8, help="epochs per mmoe-synthetic run (default 8)")
    ap.add_argument("--batch-size", type=int, default=512, help="default 512")
    ap.add_argument("--census-rows", type=int, default=30000, help="training rows sampled from census (0 = all 199,523)")
    ap.add_argument("--eval-rows", type=int, default=20000, help="validation and test rows sampled each (0 = all)")
    ap.add_argument("--synthetic-rows", type=int, default=20000, help="mmoe-synthetic rows (80/10/10 split)")
    ap.add_argument("--correlation", type=float, default=0.1, help="mmoe-synthetic task correlation (default 0.1)")
    ap.add_argument("--timing-steps", type=int, default=4, help="steps per block in the step-timing phase")
    ap.add_argument("--timing-rounds", type=int, default=20, help="rounds of blocks (0 = no step-timing phase)")
    ap.add_argument("--work-dir", type=Path, default=None, help="data and runs (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="write every run's result here (after each run)")
    ap.add_argument("--resume", action="store_true", help="skip the runs already in --json")
    ap.add_argument("--report-only", action="store_true", help="only redraw table and plot from --json")
    ap.add_argument("--plot", type=Path, default=None, help="write the comparison plot (PNG) here")
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.towers = [t for t in args.towers.split(",") if t]
    args.datasets = [d for d in args.datasets.split(",") if d]
    bad = [t for t in args.towers if t not in TOWERS] + [d for d in args.datasets if d not in DATASETS]
    if bad:
        sys.exit(f"balancers: unknown tower or data set {bad}; towers {list(TOWERS)}, data sets {list(DATASETS)}")

    data: dict[str, Any] = {"results": []}
    if (args.resume or args.report_only) and args.json and args.json.is_file():
        data = json.loads(args.json.read_text())
    if not args.report_only:
        data.update({"machine": f"{platform.node()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
                     "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/quality/balancers.py " + " ".join(sys.argv[1:])})
        tmp = None
        if args.work_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="balancers-")
            args.work_dir = Path(tmp.name)
        args.work_dir = args.work_dir.resolve()
        args.work_dir.mkdir(parents=True, exist_ok=True)

        def save() -> None:
            if args.json:
                args.json.write_text(json.dumps(data, indent=1))
        try:
            run_all(args, data["results"], save)
        finally:
            if tmp is not None:
                tmp.cleanup()
    print(report(data, args.plot))


if __name__ == "__main__":
    main()
