"""A user's first run: `recmtl init` + `recmtl train` with no edits, against a tuned config and gradient boosting.

For each data set, through the real CLI (each step a subprocess of the ``recmtl`` console script):

1. prepare ``train/valid/test.parquet`` (``recmtl convert`` / ``recmtl split`` for the real files in
   ``../shared/data``, ``recmtl datagen funnel`` for the synthetic ones; ``--tail`` for the long-tail one);
2. ``recmtl init`` with only what a user must say (the tasks, their positives and heads, ``--validation``,
   ``--test``) and ``recmtl train`` of the written config, unedited (``--set`` only for ``seed``,
   ``train.threads=1`` and ``train.progress=false``, which do not change the model);
3. the tuned reference: the same config with the overrides of :data:`TUNED` (the best found by hand, see
   benchmarks/RESULTS.md);
4. a per-task scikit-learn ``HistGradientBoosting`` baseline on the same training rows and the same feature
   columns as init's config (categorical columns with at most 255 values as native categories, more as
   cross-fitted target encoding, numbers as they are; learning rate 0.05, early stopping on 10 % of the
   training rows), scored on the same test rows;
5. optionally ``--before REV``: the same ``init`` run by the recmtl of git revision REV (``git archive`` of its
   ``recmtl`` and ``recmtl_plugins`` into the work dir, run by this Python), its config trained by this recmtl;
6. for the synthetic sets, the Bayes-optimal AUC of the true probabilities (``test.truth.parquet``) and, with
   ``--runs ...,exact``, a logistic regression of the generator's exact functional form: what the training rows
   allow (the finite-sample bound).

Prints one markdown table per data set (test AUC per task; RMSE for regression tasks): mean ± std over seeds.
The synthetic data sets take the seed as the data seed too. Every output goes to ``--work-dir``.

Usage: python benchmarks/quality/first_run.py [--datasets census,funnel,tail,smoke] [--seeds 1,2,3]
       --work-dir DIR [--runs init,tuned,hgb,before,exact] [--before 6f10631] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # scikit-learn's OpenMP: one thread, like the training runs

import numpy as np  # noqa: E402
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from census_income import COLUMNS as CENSUS_COLUMNS  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
FUNNEL = ["--rows", "100000", "--categorical", "8", "--dense", "4"]
TAIL_IDS = "20000"
#: every train: seed, one thread (a small model on a shared 2-core machine), no progress bar; none changes the model
COMMON = ["train.threads=1", "train.progress=false"]
#: the tuned reference per data set: overrides of init's config (the best found by hand; benchmarks/RESULTS.md)
TUNED: dict[str, list[str]] = {
    "census": ["encoders.categorical.dim=8", "train.epochs=40"],
    "funnel": ["encoders.categorical.dim=8"],
    "tail": ["encoders.categorical.dim=8"],
}


@dataclass
class DataSet:
    """A prepared data set: its folder, what ``recmtl init`` is told, and which runs make sense."""

    name: str
    folder: Path
    init_args: list[str]  # tasks, positives, heads (train/valid/test paths are added)
    tasks: dict[str, str]  # task -> label column
    positives: dict[str, Any] = field(default_factory=dict)  # task -> positive values, for the baseline
    truth: bool = False
    smoke: bool = False
    note: str = ""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def recmtl_command() -> list[str]:
    exe = Path(sys.executable).with_name("recmtl")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("recmtl")
    if not found:
        sys.exit("first_run: the `recmtl` console script is neither next to this Python nor on PATH")
    return [found]


def run(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` failed with exit {proc.returncode}:\n{proc.stderr[-3000:]}{proc.stdout[-1000:]}")
    return time.perf_counter() - t0, proc.stdout + proc.stderr


# ---- data sets -------------------------------------------------------------------------------------------------
def census(work: Path, recmtl: list[str], seed: int) -> DataSet:
    folder = work / "census"
    folder.mkdir(parents=True, exist_ok=True)
    src = SHARED / "census-income-kdd"
    names = ",".join(CENSUS_COLUMNS)
    for csv, out in (("census-income.data.gz", "train.parquet"), ("census-income.test.gz", "test_full.parquet")):
        if not (folder / out).is_file():
            run([*recmtl, "convert", str(src / csv), "-o", out, "--no-header", "--names", names, "--null-value", "?"], folder)
    if not (folder / "test.parquet").is_file():
        run([*recmtl, "split", "test_full.parquet", "-o", "valid.parquet", "-o", "test.parquet", "--fractions", "0.5,0.5",
             "--seed", "0"], folder)
    return DataSet("census", folder, ["--task", "income=income_50k", "--task", "never_married=marital_stat",
                                      "--positive", "income_50k=50000+.", "--positive", "marital_stat=Never married"],
                   {"income": "income_50k", "never_married": "marital_stat"},
                   {"income": ["50000+."], "never_married": ["Never married"]},
                   note="UCI census-income (KDD), all 199,523 training rows; its test file split 1:1 (seed 0)")


def funnel(work: Path, recmtl: list[str], seed: int, tail: bool) -> DataSet:
    name = "tail" if tail else "funnel"
    folder = work / f"{name}{seed}"
    if not (folder / "test.truth.parquet").is_file():
        run([*recmtl, "datagen", "funnel", str(folder), *FUNNEL, "--seed", str(seed), *(["--tail", TAIL_IDS] if tail else [])],
            work)
    return DataSet(name, folder, ["--task", "click", "--task", "conversion", "--head", "conversion=esmm"],
                   {"click": "click", "conversion": "conversion"}, truth=True,
                   note=f"`datagen funnel {' '.join(FUNNEL)}{' --tail ' + TAIL_IDS if tail else ''} --seed S`: 80k/10k/10k rows")


def smoke_sets(work: Path, recmtl: list[str]) -> list[DataSet]:
    """The small real samples of ../shared/data (see their SOURCE.md): too small for the numbers to mean much."""
    out = []
    k = work / "kuairand"
    k.mkdir(parents=True, exist_ok=True)
    if not (k / "test.parquet").is_file():
        run([*recmtl, "convert", str(SHARED / "kuairand-sample" / "kuairand_sample.csv"), "-o", "all.parquet"], k)
        run([*recmtl, "split", "all.parquet", "-o", "train.parquet", "-o", "valid.parquet", "-o", "test.parquet",
             "--fractions", "0.6,0.2,0.2", "--seed", "0"], k)
    out.append(DataSet("kuairand", k, ["--task", "is_click"], {"is_click": "is_click"}, smoke=True,
                       note="KuaiRand-1K, 200 joined rows split 0.6/0.2/0.2"))
    a = work / "ali_ccp"
    a.mkdir(parents=True, exist_ok=True)
    for part, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        if not (a / f"{name}.parquet").is_file():
            run([*recmtl, "convert", str(SHARED / "ali-ccp-sample" / f"ali_ccp_{part}_sample.csv"), "-o", f"{name}.parquet"], a)
    out.append(DataSet("ali_ccp", a, ["--task", "click", "--task", "purchase", "--head", "purchase=esmm"],
                       {"click": "click", "purchase": "purchase"}, smoke=True,
                       note="Ali-CCP sample, 100/50/50 rows (1-2 purchases a file)"))
    e = work / "aliexpress"
    e.mkdir(parents=True, exist_ok=True)
    if not (e / "test.parquet").is_file():
        run([*recmtl, "convert", str(SHARED / "aliexpress-sample" / "aliexpress_train_sample.csv"), "-o", "train.parquet"], e)
        run([*recmtl, "convert", str(SHARED / "aliexpress-sample" / "aliexpress_test_sample.csv"), "-o", "test.parquet"], e)
        shutil.copy(e / "test.parquet", e / "valid.parquet")
    out.append(DataSet("aliexpress", e, ["--task", "click", "--task", "conversion", "--head", "conversion=esmm"],
                       {"click": "click", "conversion": "conversion"}, smoke=True,
                       note="AliExpress sample, 100 training rows; its 20 test rows are validation and test"))
    r = work / "rf1"
    r.mkdir(parents=True, exist_ok=True)
    if not (r / "test.parquet").is_file():
        shutil.copy(SHARED / "mulan-rf1" / "rf1_train.parquet", r / "train.parquet")
        run([*recmtl, "split", str(SHARED / "mulan-rf1" / "rf1_test.parquet"), "-o", "valid.parquet", "-o", "test.parquet",
             "--fractions", "0.5,0.5", "--seed", "0"], r)
    targets = [c for c in pq.read_schema(r / "train.parquet").names if "_48H__" in c]
    tasks = {t.split("_48H")[0].lower(): t for t in targets}
    out.append(DataSet("rf1", r, [x for name, col in tasks.items() for x in ("--task", f"{name}={col}")], tasks,
                       smoke=True, note="MULAN rf1 river flow, 4,108 training rows, 8 regression targets; test split 1:1"))
    b = work / "birds"
    b.mkdir(parents=True, exist_ok=True)
    if not (b / "test.parquet").is_file():
        shutil.copy(SHARED / "mulan-birds" / "birds_train.parquet", b / "train.parquet")
        run([*recmtl, "split", str(SHARED / "mulan-birds" / "birds_test.parquet"), "-o", "valid.parquet", "-o",
             "test.parquet", "--fractions", "0.5,0.5", "--seed", "0"], b)
    birds = {"pacific_wren": "Pacific Wren", "varied_thrush": "Varied Thrush", "hermit_thrush": "Hermit Thrush"}
    args = []
    for name, col in birds.items():
        args += ["--task", f"{name}={col}", "--positive", f"{name}=1"]
    out.append(DataSet("birds", b, args, birds, {t: ["1"] for t in birds}, smoke=True,
                       note="MULAN birds, 322 training rows, 3 of its 19 species (labels stored as bytes)"))
    return out


def older_recmtl(rev: str, work: Path) -> list[str]:
    """A command running the CLI of git revision ``rev`` of this repository (extracted into ``work``)."""
    repo = Path(__file__).resolve().parents[2]
    folder = work / f"recmtl-{rev}"
    if not (folder / "recmtl" / "cli.py").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "recmtl", "recmtl_plugins"], capture_output=True,
                                 check=True)
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    code = f"import sys; sys.path.insert(0, {str(folder)!r}); from recmtl.cli import main; main()"
    return [sys.executable, "-c", code]


# ---- runs --------------------------------------------------------------------------------------------------------
def init_config(ds: DataSet, cli: list[str], name: str) -> tuple[Path, str]:
    cfg = ds.folder / f"{name}.yaml"
    _, out = run([*cli, "init", "train.parquet", *ds.init_args, "--validation", "valid.parquet", "--test", "test.parquet",
                  "-o", cfg.name, "--force"], ds.folder)
    return cfg, out


def train(ds: DataSet, recmtl: list[str], cfg: Path, run_name: str, seed: int, sets: list[str]) -> dict[str, Any]:
    out = ds.folder / "runs" / run_name
    if out.exists():
        shutil.rmtree(out)
    args = [*recmtl, "train", cfg.name, "--out", str(out.relative_to(ds.folder))]
    for s in [f"seed={seed}", *COMMON, *sets]:
        args += ["--set", s]
    seconds, _ = run(args, ds.folder)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"test": {t: _score(m) for t, m in metrics["test"].items()}, "best_epoch": metrics["best_epoch"],
            "epochs": len(metrics["history"]), "seconds": round(seconds, 1),
            "rows_per_s": round(statistics.median(h["rows_per_s"] for h in metrics["history"]))}


def _score(m: dict[str, float]) -> float:
    return m["auc"] if "auc" in m else m.get("rmse", float("nan"))


def bayes(ds: DataSet) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score
    labels = pq.read_table(ds.folder / "test.parquet", columns=list(ds.tasks.values()))
    truth = pq.read_table(ds.folder / "test.truth.parquet")
    return {t: float(roc_auc_score(labels[c].to_numpy(), truth[t].to_numpy())) for t, c in ds.tasks.items()}


def gradient_boosting(ds: DataSet, cfg: Path, seed: int) -> dict[str, float]:
    """Per task: HistGradientBoosting on init's feature columns of the same split (see the module docstring)."""
    import pandas as pd
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.metrics import mean_squared_error, roc_auc_score
    from sklearn.model_selection import KFold, StratifiedKFold
    from sklearn.preprocessing import TargetEncoder

    config = yaml.safe_load(cfg.read_text())
    columns = [f["name"] for f in config["features"] if f["kind"] in ("categorical", "dense")]
    kinds = {f["name"]: f["kind"] for f in config["features"]}
    frames = {s: pq.read_table(ds.folder / f"{s}.parquet").to_pandas() for s in ("train", "valid", "test")}
    heads = {t["name"]: t for t in config["tasks"]}
    out = {}
    for task, col in ds.tasks.items():
        regression = heads[task]["head"] == "regression"

        def target(frame: pd.DataFrame) -> np.ndarray:
            y = frame[col]
            positive = heads[task].get("positive")
            if positive is not None:
                values = {str(v) for v in positive}
                return np.array([np.nan if v is None else float(str(v.decode() if isinstance(v, bytes) else v) in values)
                                 for v in y])
            return y.astype(float).to_numpy()
        ys = {s: target(f) for s, f in frames.items()}
        keep = {s: np.isfinite(y) for s, y in ys.items()}
        xs = {s: frames[s].loc[keep[s], columns].reset_index(drop=True) for s in frames}
        ys = {s: ys[s][keep[s]] for s in ys}
        def text(col: pd.Series) -> pd.Series:  # categories as strings, null as its own category
            return col.astype(object).where(col.notna(), "<null>").astype(str)
        cat_small, cat_large = [], []
        for c in columns:
            if kinds[c] != "categorical":
                continue
            values = pd.concat([text(xs[s][c]) for s in xs])
            (cat_small if values.nunique() <= 255 else cat_large).append(c)
        prepared = {}
        codes = {c: {v: i for i, v in enumerate(sorted(pd.concat([text(xs[s][c]) for s in xs]).unique()))}
                 for c in cat_small}
        encoder = None
        if cat_large:
            folds = (KFold if regression else StratifiedKFold)(5, shuffle=True, random_state=seed)
            encoder = TargetEncoder(target_type="continuous" if regression else "binary", cv=folds)
            encoded_train = encoder.fit_transform(pd.DataFrame({c: text(xs["train"][c]) for c in cat_large}), ys["train"])
        for s, x in xs.items():
            frame = pd.DataFrame(index=x.index)
            for c in columns:
                if c in codes:
                    frame[c] = text(x[c]).map(codes[c]).astype("float64")
                elif c not in cat_large:
                    frame[c] = pd.to_numeric(x[c], errors="coerce").astype("float64")
            if cat_large:
                enc = encoded_train if s == "train" else encoder.transform(pd.DataFrame({c: text(x[c]) for c in cat_large}))
                for j, c in enumerate(cat_large):
                    frame[c] = enc[:, j]
            prepared[s] = frame
        mask = [c in codes for c in prepared["train"].columns]
        if not regression and len(np.unique(ys["train"])) < 2:
            out[task] = float("nan")
            continue
        cls = HistGradientBoostingRegressor if regression else HistGradientBoostingClassifier
        model = cls(max_iter=1000, learning_rate=0.05, early_stopping=len(ys["train"]) >= 200, validation_fraction=0.1,
                    n_iter_no_change=30, random_state=seed, categorical_features=mask if any(mask) else None)
        model.fit(prepared["train"], ys["train"])
        if regression:
            out[task] = float(np.sqrt(mean_squared_error(ys["test"], model.predict(prepared["test"]))))
        else:
            p = model.predict_proba(prepared["test"])[:, 1]
            out[task] = float(roc_auc_score(ys["test"], p)) if len(np.unique(ys["test"])) == 2 else float("nan")
    return out


def exact_form(ds: DataSet, seed: int) -> dict[str, float]:
    """The finite-sample bound of the synthetic sets: a logistic regression of the generator's exact functional form
    (one-hot ids; each dense x and x^2 - 1; the tanh(d01) x parity(user_id) interaction; log1p(views), log(price)),
    L2 with C = 0.3, fitted on the training rows (CVR on the clicked rows; conversion = pCTR x pCVR)."""
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import OneHotEncoder

    train, test = (pq.read_table(ds.folder / f"{s}.parquet").to_pandas() for s in ("train", "test"))
    cats = [c for c in train.columns if c in ("user_id", "item_id", "tail_id") or (c[0] == "c" and c[1:].isdigit())]
    dense = [c for c in train.columns if c[0] == "d" and c[1:].isdigit()]
    encoder = OneHotEncoder(handle_unknown="ignore").fit(train[cats].astype(str))

    def design(frame: Any) -> Any:
        cols = []
        for c in dense:
            x = frame[c].fillna(0).to_numpy()
            cols += [x, x * x - 1]
        cols.append(np.tanh(frame["d01"].fillna(0).to_numpy()) * np.where(frame["user_id"] % 2 == 0, 1, -1))
        if "views" in frame:
            cols += [np.log1p(frame["views"].to_numpy()), np.log(frame["price"].fillna(np.exp(3.0)).to_numpy())]
        return sp.hstack([encoder.transform(frame[cats].astype(str)), sp.csr_matrix(np.column_stack(cols))]).tocsr()
    x_train, x_test = design(train), design(test)
    click = LogisticRegression(C=0.3, max_iter=3000).fit(x_train, train["click"])
    clicked = (train["click"] == 1).to_numpy()
    cvr = LogisticRegression(C=0.3, max_iter=3000).fit(x_train[clicked], train["conversion"][clicked])
    p_click = click.predict_proba(x_test)[:, 1]
    return {"click": float(roc_auc_score(test["click"], p_click)),
            "conversion": float(roc_auc_score(test["conversion"], p_click * cvr.predict_proba(x_test)[:, 1]))}


# ---- report ------------------------------------------------------------------------------------------------------
def mean_std(values: list[float], digits: int = 4) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(name: str, rows: list[dict[str, Any]]) -> str:
    kinds = [k for k in ("init", "tuned", "hgb", "before", "exact", "bayes") if any(k in r for r in rows)]
    titles = {"init": "init, no edits", "tuned": "tuned", "hgb": "HistGradientBoosting", "before": "before (older init)",
              "exact": "exact-form logistic regression", "bayes": "Bayes-optimal"}
    first = next(rows[0][k] for k in ("hgb", "init", "tuned", "before", "exact", "bayes") if k in rows[0])
    tasks = list(first["test"] if "test" in first else first)
    head = ["task", *(titles[k] for k in kinds)]
    if "tuned" in kinds:
        head.append("init − tuned")
    if "hgb" in kinds:
        head.append("init − HGB")
    if "bayes" in kinds:
        head += [f"gap to Bayes: {k}" for k in ("init", "before", "exact") if k in kinds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def value(r: dict[str, Any], k: str, t: str) -> float:
        v = r.get(k)
        if v is None:
            return float("nan")
        return (v["test"] if "test" in v else v).get(t, float("nan"))
    for t in tasks:
        cells = [t] + [mean_std([value(r, k, t) for r in rows]) for k in kinds]
        if "tuned" in kinds:
            cells.append(mean_std([value(r, "init", t) - value(r, "tuned", t) for r in rows]))
        if "hgb" in kinds:
            cells.append(mean_std([value(r, "init", t) - value(r, "hgb", t) for r in rows]))
        if "bayes" in kinds:
            cells += [mean_std([value(r, "bayes", t) - value(r, k, t) for r in rows]) for k in ("init", "before", "exact")
                      if k in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    runs = [f"{k}: best epoch " + ",".join(str(r[k]["best_epoch"]) for r in rows if k in r) + " of "
            + ",".join(str(r[k]["epochs"]) for r in rows if k in r) + f", {mean_std([r[k]['seconds'] for r in rows if k in r], 0)} s"
            for k in ("init", "tuned", "before") if any(k in r for r in rows)]
    failed = [f"{k} failed (seed {r['seed']}): {msg}" for r in rows for k, msg in r.get("failed", {}).items()]
    return (f"**{name}** (seeds {','.join(str(r['seed']) for r in rows)}): " + "; ".join(runs + failed) + "\n\n"
            + "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="census,funnel,tail,smoke",
                    help="comma-separated of census, funnel, tail, smoke (the small real samples)")
    ap.add_argument("--seeds", default="1", help="training seeds (also the data seed of funnel and tail)")
    ap.add_argument("--runs", default="init,tuned,hgb",
                    help="comma-separated of init, tuned, hgb, before, exact (synthetic sets: the exact-form bound)")
    ap.add_argument("--before", default=None, metavar="REV", help="git revision whose `recmtl init` is the `before` run")
    ap.add_argument("--work-dir", type=Path, default=None, help="folder for data, configs and runs (kept)")
    ap.add_argument("--json", type=Path, default=None, help="append every result as a JSON line to this file")
    ap.add_argument("--report", type=Path, nargs="+", default=None, metavar="JSONL",
                    help="only print the tables of earlier --json files (rows of one data set and seed merged)")
    args = ap.parse_args()
    if args.report:
        merged: dict[tuple[str, int], dict[str, Any]] = {}
        for path in args.report:
            for line in path.read_text().splitlines():
                row = json.loads(line)
                merged.setdefault((row["dataset"], row["seed"]), {}).update(row)
        for name in dict.fromkeys(k[0] for k in merged):
            print(report(name, [r for k, r in sorted(merged.items()) if k[0] == name]) + "\n")
        return
    if args.work_dir is None:
        sys.exit("first_run: --work-dir is required (unless --report)")
    recmtl = recmtl_command()
    seeds = [int(s) for s in args.seeds.split(",")]
    kinds = set(args.runs.split(","))
    if "before" in kinds and not args.before:
        sys.exit("first_run: --runs before needs --before REV")
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    before_cli = older_recmtl(args.before, work) if "before" in kinds else []
    wanted = args.datasets.split(",")
    if ("census" in wanted or "smoke" in wanted) and not SHARED.is_dir():
        sys.exit(f"first_run: the shared data folder {SHARED} is missing (census and smoke need it)")
    tables = []
    for dname in wanted:
        results_by_set: dict[str, list[dict[str, Any]]] = {}
        for seed in seeds:
            if dname == "census":
                sets = [census(work, recmtl, seed)]
            elif dname in ("funnel", "tail"):
                sets = [funnel(work, recmtl, seed, dname == "tail")]
            elif dname == "smoke":
                sets = smoke_sets(work, recmtl)
            else:
                sys.exit(f"first_run: unknown data set {dname}")
            for ds in sets:
                row: dict[str, Any] = {"dataset": ds.name, "seed": seed, "note": ds.note}
                cfg, out = init_config(ds, recmtl, "init")
                row["init_summary"] = out

                def attempt(kind: str, fn: Any) -> None:
                    try:
                        row[kind] = fn()
                        log(f"{ds.name} seed {seed} {kind}: {row[kind]}")
                    except RuntimeError as exc:  # a failed run is a result too (e.g. a refused config)
                        row.setdefault("failed", {})[kind] = str(exc).splitlines()[1] if "\n" in str(exc) else str(exc)
                        log(f"{ds.name} seed {seed} {kind} FAILED: {row['failed'][kind]}")
                if "init" in kinds:
                    attempt("init", lambda: train(ds, recmtl, cfg, f"init-s{seed}", seed, []))
                if "tuned" in kinds and ds.name in TUNED:
                    attempt("tuned", lambda: train(ds, recmtl, cfg, f"tuned-s{seed}", seed, TUNED[ds.name]))
                if "before" in kinds:
                    def before() -> dict[str, Any]:
                        old_cfg, _ = init_config(ds, before_cli, "before")
                        return train(ds, recmtl, old_cfg, f"before-s{seed}", seed, [])
                    attempt("before", before)
                if "hgb" in kinds:
                    row["hgb"] = gradient_boosting(ds, cfg, seed)
                    log(f"{ds.name} seed {seed} hgb: {row['hgb']}")
                if ds.truth:
                    row["bayes"] = bayes(ds)
                    if "exact" in kinds:
                        row["exact"] = exact_form(ds, seed)
                        log(f"{ds.name} seed {seed} exact form: {row['exact']}")
                results_by_set.setdefault(ds.name, []).append(row)
                if args.json:
                    with args.json.open("a") as f:
                        f.write(json.dumps(row) + "\n")
        for name, rows in results_by_set.items():
            tables.append(report(name, rows))
            print(tables[-1] + "\n", flush=True)


if __name__ == "__main__":
    pa.set_cpu_count(1)
    main()
