"""``recmtl calibrate``: fit one post-hoc calibrator per probability task on held-out rows and store them in the run
directory (``calibrator.json``), with the metrics and reliability bins before and after."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from recmtl import metrics as M
from recmtl.calibration import CALIBRATED_HEADS, METHODS, ScoreMap, TaskCalibrator, fit_calibrator, write_calibrators
from recmtl.data.parquet import ParquetSource
from recmtl.errors import ConfigError, DataError
from recmtl.rundir import CALIBRATOR
from recmtl.schema import check_types
from recmtl.training.evaluate import PER_TASK, LoadedRun, Predictions, load_run

#: the metrics ``calibrate`` reports before and after
REPORTED = ("auc", *M.CALIBRATION_METRICS)


def calibratable(run: LoadedRun, tasks: list[str]) -> list[str]:
    """The tasks to calibrate: ``tasks`` (checked) or every task whose head scores one probability per row."""
    heads = {t.name: t.head for t in run.config.tasks}
    if not tasks:
        chosen = [t for t, h in heads.items() if h in CALIBRATED_HEADS]
        if not chosen:
            raise ConfigError(f"no task to calibrate: calibration applies to {' and '.join(CALIBRATED_HEADS)} heads (one "
                              f"probability per row); this run has {', '.join(f'{t} ({h})' for t, h in heads.items())}")
        return chosen
    for t in tasks:
        if t not in heads:
            raise ConfigError(f"--tasks {t}: no such task (tasks: {', '.join(heads)})")
        if heads[t] not in CALIBRATED_HEADS:
            raise ConfigError(f"task '{t}' has a {heads[t]} head, which calibration does not support: it applies to "
                              f"{' and '.join(CALIBRATED_HEADS)} heads (one probability per row)")
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


def labelled(pred: Predictions, task: str, data: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The task's 0/1 labels and scores over its labelled rows; DataError when there are none or one class."""
    label, m = pred.task_label(task)
    y, s = label[m], pred.scores[task][m]
    if len(y) == 0:
        raise DataError(f"{what} {data} has no labelled rows of task '{task}' (its label is null everywhere, or the "
                        "file is empty); calibration needs held-out rows with labels")
    if np.unique(y).size < 2:
        raise DataError(f"{what} {data}: the labels of task '{task}' are all {y[0]:g} ({len(y)} rows); a calibrator "
                        "needs both classes")
    return y, s


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
    pred = run.predict(source, batch_size)
    fitted: dict[str, TaskCalibrator] = {}
    fit_rows = {}
    for t in chosen:
        y, s = labelled(pred, t, data, "calibration data")
        fitted[t] = fit_calibrator(method, y, s)
        fit_rows[t] = len(y)
    splits = [("fit", data, pred)]
    if test is not None:
        test_source = read_split(run, test, chosen, "--test")
        splits.append(("test", test, run.predict(test_source, batch_size)))
    after_map = ScoreMap(calibrators=fitted)
    results: dict[str, dict[str, Any]] = {t: {} for t in chosen}
    reliability: dict[str, dict[str, Any]] = {}
    for split, spec, p in splits:
        for t in chosen:
            y, s = labelled(p, t, spec, "calibration data" if split == "fit" else "--test")
            after = after_map.task(t, s)
            results[t][split] = {"before": summarize(y, s), "after": summarize(y, after)}
            reliability[t] = {"split": split, "data": spec, "before": M.reliability(y, s), "after": M.reliability(y, after)}
    info = {"method": method, "data": data, "rows": fit_rows, "checkpoint": checkpoint, "test": test,
            "fitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reliability": reliability, "metrics": results}
    write_calibrators(Path(run.run_dir) / CALIBRATOR, fitted, info)
    return {"path": str(Path(run.run_dir) / CALIBRATOR), "method": method, "tasks": results}


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
