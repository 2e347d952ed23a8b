"""``recmtl calibrate``: fit one post-hoc calibrator per probability task (per attribute of a multilabel task) on the
logits of held-out rows and store them in the run directory (``calibrator.json``), bound to the checkpoint they were
fitted on, with the metrics and reliability bins before and after."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from recmtl import metrics as M
from recmtl.calibration import CALIBRATED_HEADS, METHODS, AttributeCalibrators, Calibrator, ScoreMap, fit_calibrator, write_calibrators
from recmtl.data.parquet import ParquetSource
from recmtl.errors import ConfigError, DataError
from recmtl.rundir import CALIBRATOR
from recmtl.schema import check_types
from recmtl.training.evaluate import PER_TASK, LoadedRun, Predictions, load_run, predict

#: the metrics ``calibrate`` reports before and after
REPORTED = ("auc", *M.CALIBRATION_METRICS)


def calibratable(run: LoadedRun, tasks: list[str]) -> list[str]:
    """The tasks to calibrate: ``tasks`` (checked) or every task whose head scores probabilities (binary, esmm,
    multilabel); regression and multiclass tasks are refused."""
    heads = {t.name: t.head for t in run.config.tasks}
    if not tasks:
        chosen = [t for t, h in heads.items() if h in CALIBRATED_HEADS]
        if not chosen:
            raise ConfigError(f"no task to calibrate: calibration applies to {', '.join(CALIBRATED_HEADS)} heads (a "
                              f"probability per row or attribute); this run has {', '.join(f'{t} ({h})' for t, h in heads.items())}")
        return chosen
    for t in tasks:
        if t not in heads:
            raise ConfigError(f"--tasks {t}: no such task (tasks: {', '.join(heads)})")
        if heads[t] not in CALIBRATED_HEADS:
            raise ConfigError(f"task '{t}' has a {heads[t]} head, which calibration does not support: it applies to "
                              f"{', '.join(CALIBRATED_HEADS)} heads (a probability per row or attribute)")
    return list(dict.fromkeys(tasks))


def read_split(run: LoadedRun, data: str, tasks: list[str], what: str) -> ParquetSource:
    """``data`` as a source of the run's features and labels, with one clear error when a task's label is absent."""
    probe = ParquetSource(data)
    for t in run.config.tasks:
        missing = [c for c in t.label_columns if c not in probe.schema.names]
        if missing and t.name in tasks:
            raise DataError(f"{what} {data} has no label column '{missing[0]}' of task '{t.name}'; calibration needs "
                            "held-out rows with their labels")
    cols = [c for t in run.config.tasks for c in t.label_columns if c in probe.schema.names]
    source = ParquetSource(data, cols + run.schema.feature_columns)
    check_types(run.config, source)
    return source


def labelled(pred: Predictions, task: str, data: str, what: str, column: int | None = None,
             name: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The task's 0/1 labels, scores and raw outputs (logits, when kept) over its labelled rows (of attribute
    ``column`` of a multilabel task, named ``name``); DataError when there are none or one class."""
    label, m = pred.task_label(task)
    score, raw = pred.scores[task], pred.raw.get(task)
    if column is not None:
        label, score = label[:, column], score[:, column]
        raw = None if raw is None else raw[:, column]
        m = ~np.isnan(label)
    y, s = label[m], score[m]
    which = f"task '{task}'" + (f" attribute '{name}'" if column is not None else "")
    if len(y) == 0:
        raise DataError(f"{what} {data} has no labelled rows of {which} (its label is null everywhere, or the "
                        "file is empty); calibration needs held-out rows with labels")
    if np.unique(y).size < 2:
        raise DataError(f"{what} {data}: the labels of {which} are all {y[0]:g} ({len(y)} rows); a calibrator "
                        "needs both classes")
    return y, s, None if raw is None else raw[m]


def columns(run: LoadedRun, task: str) -> list[tuple[int | None, str]]:
    """The score columns of a task: ``[(None, "")]``, or one ``(k, attribute)`` per attribute of a multilabel task."""
    head = run.model.heads[task]
    if head.label_type == "multi":
        return [(k, str(a)) for k, a in enumerate(head.task.classes)]
    return [(None, "")]


def summarize(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    m = M.binary_metrics(y, s)
    return {k: m[k] for k in REPORTED} | {"rows": int(len(y)), "distinct_scores": int(np.unique(s).size)}


def calibrate_run(run_dir: str | Path, data: str, method: str, tasks: list[str] = (), test: str | None = None,
                  plugins: list[str] = (), disabled: list[str] = (), checkpoint: str = PER_TASK,
                  batch_size: int = 16_384) -> dict[str, Any]:
    """Fit ``method`` per task on ``data``, write ``RUN_DIR/calibrator.json`` (atomically, only when everything
    succeeded) and return ``{"tasks": {task: {split: {"before": metrics, "after": metrics}}}, ...}``, the splits
    being ``data`` and, when given, ``test``."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    run = load_run(run_dir, list(plugins), list(disabled), checkpoint, calibration=False)
    chosen = calibratable(run, list(tasks))
    source = read_split(run, data, chosen, "calibration data")
    if source.num_rows == 0:
        raise DataError(f"calibration data {data} has no rows")
    smap = run.scores  # the downsampling corrections only: calibrators act on the corrected logits

    def raw_predictions(src: ParquetSource) -> Predictions:  # the network's own scores, and logits where it has them
        return predict(run.model, run.schema, src, batch_size, run.config.data.read_rows, raw=chosen)

    def with_scores(p: Predictions, scores: dict[str, np.ndarray]) -> Predictions:
        return Predictions({**p.scores, **scores}, p.labels, p.mask, p.group, p.losses, p.slices, p.raw)
    pred = raw_predictions(source)
    fitted: dict[str, Calibrator] = {}
    fit_rows: dict[str, int] = {}
    for t in chosen:
        per = {}
        for k, name in columns(run, t):
            y, s, raw = labelled(pred, t, data, "calibration data", k, name)
            z = smap.logit(t, s, raw) + math.log(smap.rates.get(t, 1.0))
            per[name] = fit_calibrator(method, y, z)
            fit_rows[t] = fit_rows.get(t, 0) + len(y)
        fitted[t] = per[""] if "" in per else AttributeCalibrators(method, per)
    splits = [("fit", data, pred)]
    if test is not None:
        splits.append(("test", test, raw_predictions(read_split(run, test, chosen, "--test"))))
    after_map = ScoreMap(dict(smap.rates), fitted, logit_tasks=set(smap.logit_tasks))
    results: dict[str, dict[str, Any]] = {}
    reliability: dict[str, dict[str, Any]] = {}
    for split, spec, p in splits:
        picked = {t: p.scores[t] for t in chosen}
        before, after = with_scores(p, smap.apply(picked, p.raw)), with_scores(p, after_map.apply(picked, p.raw))
        what = "calibration data" if split == "fit" else "--test"
        for t in chosen:
            for k, name in columns(run, t):
                y, sb, _ = labelled(before, t, spec, what, k, name)
                _, sa, _ = labelled(after, t, spec, what, k, name)
                key = t if k is None else f"{t}/{name}"
                results.setdefault(key, {})[split] = {"before": summarize(y, sb), "after": summarize(y, sa)}
                reliability[key] = {"split": split, "data": spec, "before": M.reliability(y, sb),
                                    "after": M.reliability(y, sa)}
    results = {k: v for k, v in results.items() if v}
    bound = {t: run.states[t] for t in chosen}
    info = {"method": method, "data": data, "rows": fit_rows, "checkpoint": checkpoint, "bound": bound, "test": test,
            "fitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reliability": reliability, "metrics": results}
    write_calibrators(Path(run.run_dir) / CALIBRATOR, fitted, info)
    return {"path": str(Path(run.run_dir) / CALIBRATOR), "method": method, "tasks": results, "bound": bound}


def format_results(results: dict[str, Any]) -> str:
    """One row per task and split: each metric before -> after."""
    header = ["task", "split", "rows", *REPORTED]
    rows = []
    for t, splits in results["tasks"].items():
        for split, ba in splits.items():
            b, a = ba["before"], ba["after"]
            rows.append([t, split, str(b["rows"]), *(f"{b[k]:.4f} -> {a[k]:.4f}" for k in REPORTED)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])
