"""Vision attributes (issue #5's acceptance): one CNN shared by the digit class and its attributes vs
single-task models of the same size, on ``recmtl datagen digits-attributes`` (scikit-learn's 1,797 bundled
8x8 handwritten digits, stratified 70/15/15 split).

* shared: ``datagen``'s config as it is: CNN (conv 32, 64; 128-d) -> shared-bottom (128) -> a ``multiclass``
  head for ``digit`` and a ``multilabel`` head for the five attributes (even, greater_than_4, closed_loop,
  prime, straight_strokes), trained jointly, early stopping on validation digit accuracy.
* single-task: the same encoder and tower widths with one task only: ``digit`` alone (multiclass), and each
  attribute alone (a ``binary`` head, early stopping on its validation AUC). Same epochs, batch size, lr.

Every model is trained through the CLI (``recmtl.cli.main`` in this process); the script reports the
held-out test digit accuracy (target >= 0.95) and the test AUC per attribute, mean ± sample std over seeds
(the data split is the same for every seed; the seed sets initialisation and shuffling).

Usage (the figures in RESULTS.md):
    python benchmarks/quality/digits_attributes.py --work-dir /tmp/digits_bench --seeds 0,1,2 --json /tmp/digits_bench/results.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import yaml

from recmtl.cli import main as recmtl_main
from recmtl.data.synthetic import DIGIT_ATTRIBUTES

ATTRIBUTES = list(DIGIT_ATTRIBUTES)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cli(*args: object) -> None:
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            recmtl_main([str(a) for a in args])
    except SystemExit as exc:
        if exc.code:
            raise RuntimeError(f"recmtl {' '.join(map(str, args))} failed:\n{err.getvalue()[-2000:]}") from None


def variants(base: dict) -> dict[str, dict]:
    """Config per model: the shared one, and single-task ones of the same encoder/tower size."""
    out = {"shared": base}
    digit = yaml.safe_load(yaml.safe_dump(base))
    digit["tasks"] = [t for t in base["tasks"] if t["name"] == "digit"]
    out["single:digit"] = digit
    for attr in ATTRIBUTES:
        cfg = yaml.safe_load(yaml.safe_dump(base))
        cfg["tasks"] = [{"name": attr, "label": attr, "head": "binary"}]
        cfg["train"]["early_stopping"] = {"monitor": f"{attr}/auc", "patience": base["train"]["early_stopping"]["patience"]}
        out[f"single:{attr}"] = cfg
    return out


def parameters(run: Path) -> int:
    import torch
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=False)["model"]
    return int(sum(v.numel() for k, v in state.items() if v.is_floating_point() and "running_" not in k))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/digits_bench"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs of the datagen config (40)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = args.work_dir
    data = work / "data"
    if not (data / "config.yaml").is_file():
        cli("datagen", "digits-attributes", data)
    base = yaml.safe_load((data / "config.yaml").read_text())
    base["data"] = {k: (str(data / v) if k in ("train", "validation", "test") else v) for k, v in base["data"].items()}
    base["train"].update({"threads": args.threads, "progress": False})
    if args.epochs:
        base["train"]["epochs"] = args.epochs
    results: list[dict] = []
    if args.json and args.json.is_file():
        results = json.loads(args.json.read_text())["runs"]
    done = {(r["model"], r["seed"]) for r in results}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, cfg in variants(base).items():
            if (name, seed) in done:
                continue
            cfg = {**cfg, "seed": seed}
            slug = name.replace(":", "_")
            path = work / f"{slug}_s{seed}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            run = work / f"run_{slug}_s{seed}"
            if run.exists():
                import shutil
                shutil.rmtree(run)
            t0 = time.perf_counter()
            cli("train", path, "--out", run)
            seconds = time.perf_counter() - t0
            metrics = json.loads((run / "metrics.json").read_text())
            test = metrics["test"]
            rec = {"model": name, "seed": seed, "seconds": round(seconds, 1), "best_epoch": metrics["best_epoch"],
                   "epochs_run": len(metrics["history"]), "parameters": parameters(run)}
            if "digit" in test:
                rec["digit_accuracy"] = test["digit"]["accuracy"]
                rec["digit_macro_f1"] = test["digit"]["macro_f1"]
            if "attributes" in test:
                rec["auc"] = {a: test["attributes"][f"auc_{a}"] for a in ATTRIBUTES}
            for a in ATTRIBUTES:
                if a in test:
                    rec["auc"] = {a: test[a]["auc"]}
            results.append(rec)
            log(f"seed {seed} {name}: {json.dumps({k: v for k, v in rec.items() if k not in ('model', 'seed')})}")
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "runs": results}, indent=1))
    print(report(results))


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def report(results: list[dict]) -> str:
    shared = [r for r in results if r["model"] == "shared"]
    single = {r["model"]: [] for r in results if r["model"] != "shared"}
    for r in results:
        if r["model"] != "shared":
            single[r["model"]].append(r)
    seeds = sorted({r["seed"] for r in results})
    lines = [f"seeds {seeds}; test split of 270 held-out images", "",
             "| metric (test) | shared CNN, all heads | single-task model |", "|---|---|---|"]
    lines.append(f"| digit accuracy | {_ms([r['digit_accuracy'] for r in shared])} | "
                 f"{_ms([r['digit_accuracy'] for r in single.get('single:digit', [])])} |")
    lines.append(f"| digit macro-F1 | {_ms([r['digit_macro_f1'] for r in shared])} | "
                 f"{_ms([r['digit_macro_f1'] for r in single.get('single:digit', [])])} |")
    for a in ATTRIBUTES:
        lines.append(f"| AUC {a} | {_ms([r['auc'][a] for r in shared])} | "
                     f"{_ms([r['auc'][a] for r in single.get(f'single:{a}', [])])} |")
    mean_shared = [statistics.mean(r["auc"].values()) for r in shared]
    mean_single = [statistics.mean(single[f"single:{a}"][i]["auc"][a] for a in ATTRIBUTES)
                   for i in range(min(len(single.get(f"single:{a}", [])) for a in ATTRIBUTES))] if single else []
    lines.append(f"| mean attribute AUC | {_ms(mean_shared)} | {_ms(mean_single)} |")
    t_shared = sum(r["seconds"] for r in shared)
    t_single = sum(r["seconds"] for rs in single.values() for r in rs)
    params_shared = shared[0]["parameters"] if shared else 0
    params_single = {m: rs[0]["parameters"] for m, rs in single.items() if rs}
    lines += ["", f"parameters: shared {params_shared:,}; single-task " + ", ".join(
        f"{m.split(':')[1]} {p:,}" for m, p in params_single.items()),
        (f"training time over all seeds: shared {t_shared:.0f} s (one model), single-task {t_single:.0f} s "
         f"({len(params_single)} models per seed)")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
