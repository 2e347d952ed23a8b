"""Permutation importance per task per feature (``recmtl importance``): model-agnostic, for every tower.

On held-out rows, each feature's preprocessed column is shuffled across rows (``repeats`` times, the same
permutation for all tasks) and every task's metric is recomputed; a feature's importance for a task is the mean
drop of that metric (higher-is-better metrics: ``base - permuted``; others: ``permuted - base``), so positive
means the task uses the feature (Breiman 2001; scikit-learn's ``permutation_importance`` computes the same per
estimator, here one pass scores all tasks). A feature is *useful* to a task when its drop exceeds both
``min_drop`` and twice its standard deviation over the repeats; features are grouped into useful to all tasks,
task-specific and no measurable use.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from recmtl.data.parquet import ParquetSource
from recmtl.errors import ConfigError, DataError

GROUPS = ("useful to all tasks", "task-specific", "no measurable use")


def feature_positions(schema: Any) -> list[tuple[str, str, int]]:
    """``(feature, kind, index in that kind's input)`` for every feature, in schema order."""
    out = []
    for kind, cols in (("categorical", schema.categorical), ("dense", schema.dense), ("image", schema.image),
                       ("sequence", schema.sequence)):
        out += [(c.name, kind, j) for j, c in enumerate(cols)]
    return out


def read_rows(source: ParquetSource, rows: int) -> pa.Table:
    """The first ``rows`` rows of ``source`` (file order)."""
    parts, n = [], 0
    for batch in source.batches():
        parts.append(batch)
        n += batch.num_rows
        if n >= rows:
            break
    if not parts:
        raise DataError(f"{source.spec} has no rows")
    return pa.Table.from_batches(parts).slice(0, rows)


def _primary(head: Any, values: dict[str, float]) -> tuple[str, bool]:
    """The metric importance is measured in (``auc`` when the head has it) and whether higher is better."""
    for name in ("auc",) + tuple(head.metric_names()):
        if name in values and math.isfinite(values[name]):
            return name, name in head.higher_is_better
    raise ConfigError(f"task '{head.task.name}': its head '{head.task.head}' reports no metric to measure importance with")


@torch.no_grad()
def permutation_importance(model: Any, schema: Any, table: pa.Table, tasks: list[str], repeats: int = 5,
                           seed: int = 0, min_drop: float = 0.001, batch_size: int = 16_384) -> dict[str, Any]:
    """Per task per feature: the metric's mean drop and its standard deviation over ``repeats`` permutations, the
    base metric, and the features' groups. JSON-serialisable."""
    if repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {repeats}")
    unknown = [t for t in tasks if t not in model.task_names]
    if unknown:
        raise ConfigError(f"--tasks names unknown task(s) {', '.join(unknown)}; the run's tasks: {', '.join(model.task_names)}")
    model.eval()
    arrays = schema.transform(table, labels=True)
    slices = model.label_slices

    def labels_of(t: str) -> tuple[np.ndarray, np.ndarray]:
        start, width, scalar = slices[t]
        if scalar:
            return arrays.labels[:, start], arrays.mask[:, start]
        label = arrays.labels[:, start:start + width].copy()
        m = arrays.mask[:, start:start + width]
        label[~m] = np.nan
        return label, m.any(1)

    def scores(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
        n = len(next(iter(inputs.values())))
        for i in range(0, n, batch_size):
            pred = model.predict({k: torch.from_numpy(v[i:i + batch_size]) for k, v in inputs.items()})
            for t in tasks:
                out[t].append(pred[t].float().numpy())
        return {t: np.concatenate(v) for t, v in out.items()}

    labelled = {t: labels_of(t) for t in tasks}
    for t, (_, m) in labelled.items():
        if not m.any():
            raise DataError(f"task '{t}': no labelled rows in the data for importance")

    def metrics(s: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        return {t: model.heads[t].metrics(labelled[t][0][labelled[t][1]], s[t][labelled[t][1]]) for t in tasks}

    base_all = metrics(scores(arrays.inputs))
    primary = {t: _primary(model.heads[t], base_all[t]) for t in tasks}
    base = {t: float(base_all[t][primary[t][0]]) for t in tasks}
    rng = np.random.default_rng(seed)
    features = feature_positions(schema)
    drops = {f: {t: [] for t in tasks} for f, _, _ in features}
    n = len(arrays)
    for _ in range(repeats):
        perm = rng.permutation(n)
        for name, kind, j in features:
            inputs = dict(arrays.inputs)
            x = inputs[kind].copy()
            x[:, j] = x[perm, j]
            inputs[kind] = x
            got = metrics(scores(inputs))
            for t in tasks:
                metric, higher = primary[t]
                value = float(got[t][metric])
                drops[name][t].append(base[t] - value if higher else value - base[t])
    table_out: dict[str, dict[str, dict[str, float]]] = {}
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    useful_to: dict[str, list[str]] = {}
    for name, _, _ in features:
        table_out[name] = {}
        users = []
        for t in tasks:
            d = np.asarray(drops[name][t])
            mean, std = float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0
            useful = mean > max(min_drop, 2 * std)
            table_out[name][t] = {"mean": mean, "std": std, "useful": bool(useful)}
            users += [t] if useful else []
        useful_to[name] = users
        group = GROUPS[0] if len(users) == len(tasks) else GROUPS[1] if users else GROUPS[2]
        groups[group].append(name)
    return {"rows": n, "repeats": repeats, "min_drop": min_drop, "seed": seed, "tasks": list(tasks),
            "metric": {t: primary[t][0] for t in tasks}, "base": base, "importance": table_out,
            "useful_to": useful_to, "groups": groups}


def format_importance(result: dict[str, Any]) -> str:
    """The importance table (mean drop ± std per task, a * where useful) and the groups."""
    tasks = result["tasks"]
    head = ["feature"] + [f"{t} ({result['metric'][t]} drop)" for t in tasks] + ["group"]
    group_of = {f: g for g, fs in result["groups"].items() for f in fs}
    rows = []
    order = sorted(result["importance"], key=lambda f: -max(result["importance"][f][t]["mean"] for t in tasks))
    for f in order:
        cells = [f"{v['mean']:+.4f} ± {v['std']:.4f}{' *' if v['useful'] else ''}"
                 for v in (result["importance"][f][t] for t in tasks)]
        group = group_of[f] + (f" ({', '.join(result['useful_to'][f])})" if group_of[f] == GROUPS[1] else "")
        rows.append([f] + cells + [group])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    base = ", ".join(f"{t} {result['metric'][t]}={result['base'][t]:.4f}" for t in tasks)
    lines.append(f"base: {base}; {result['rows']} rows, {result['repeats']} repeats; * useful: drop > "
                 f"max({result['min_drop']:g}, 2 std)")
    for g in GROUPS:
        lines.append(f"{g}: {', '.join(result['groups'][g]) or '-'}")
    return "\n".join(lines)


def importance_figure(result: dict[str, Any], path: Any) -> None:
    """A heatmap feature x task of the mean drops (features by their largest drop), written to ``path`` (PNG)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("the importance PNG needs matplotlib: pip install 'recmtl[report]'") from None
    tasks = result["tasks"]
    feats = sorted(result["importance"], key=lambda f: -max(result["importance"][f][t]["mean"] for t in tasks))
    values = np.array([[result["importance"][f][t]["mean"] for t in tasks] for f in feats])
    fig = Figure(figsize=(2.0 + 1.3 * len(tasks), 1.2 + 0.28 * len(feats)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    vmax = float(np.abs(values).max()) or 1.0
    im = ax.imshow(values, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(feats)), feats)
    for i, f in enumerate(feats):
        for j, t in enumerate(tasks):
            mark = "*" if result["importance"][f][t]["useful"] else ""
            ax.text(j, i, f"{values[i, j]:.3f}{mark}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="metric drop when shuffled")
    ax.set_title("permutation importance (which features each task uses)", fontsize=9)
    fig.savefig(path, format="png")
