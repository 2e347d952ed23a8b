"""``recmtl report RUN_DIR``: a run's training curves, tower diagnostics and task-balance log as PNG
images and one self-contained ``index.html`` (the images are embedded, so the single file can be mailed).

Reads only the run directory: ``metrics.json`` (required), ``config.yaml``, ``run.json`` and
``balance.jsonl`` (optional). A section whose data is absent (no validation data, a tower without
diagnostics, no balance log) is left out. Drawing uses matplotlib's Agg canvas directly, so the global
pyplot state of a caller (e.g. a notebook) is left alone.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from recmtl.errors import ConfigError, DataError
from recmtl.files import atomic_path
from recmtl.rundir import CALIBRATOR, CONFIG, METRICS, RUN_INFO, RunDir

DPI = 100
#: diagnostics keys with a figure of their own; any other key is listed as JSON
DRAWN_DIAGNOSTICS = ("gate_weights", "gate_entropy", "max_entropy", "expert_utilisation", "matrices", "encoders",
                     "dead_units")
#: per-task validation entries that are not metrics
NOT_METRICS = ("rows",)
#: balance logs longer than this are drawn as a rolling mean over the faint raw values
SMOOTH_ABOVE = 200


@dataclass
class RunData:
    """What a report is made from."""

    run_dir: Path
    metrics: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    config_text: str = ""
    run_info: dict[str, Any] = field(default_factory=dict)
    balance: list[dict[str, Any]] = field(default_factory=list)
    balance_x: list[float] = field(default_factory=list)
    affinity: list[dict[str, Any]] = field(default_factory=list)  # affinity.jsonl (train.affinity_every)
    diagnostics_epoch: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.metrics["history"]

    @property
    def best_epoch(self) -> int | None:
        best = self.metrics.get("best_epoch")
        return best if isinstance(best, int) and best >= 1 else None


@dataclass
class Image:
    """One rendered figure: its file name, PNG bytes and pixel size."""

    section: str
    name: str
    title: str
    png: bytes
    width: int
    height: int
    caption: str = ""


# ---------------------------------------------------------------- reading

def load_run_data(run_dir: str | Path) -> RunData:
    """Read a run directory; a missing or unreadable ``metrics.json`` is a user error with one message."""
    files = RunDir(run_dir)
    metrics = files.read_metrics()
    if not metrics["history"]:
        raise DataError(f"{files.file(METRICS)} holds no finished epoch yet; nothing to report")
    data = RunData(files.path, metrics)
    if files.file(CONFIG).is_file():
        data.config_text = files.read_config_text()
        try:
            cfg = yaml.safe_load(data.config_text)
            data.config = cfg if isinstance(cfg, dict) else {}
        except yaml.YAMLError:
            data.notes.append("config.yaml could not be parsed; it is shown as it is")
    info = files.read_run_info()
    if info is not None:
        data.run_info = info
    elif files.file(RUN_INFO).is_file():
        data.notes.append("run.json is not valid JSON; versions are not shown")
    records, skipped = files.read_balance_log()
    if skipped:
        data.notes.append(f"balance.jsonl: {skipped} unreadable line(s) skipped")
    data.balance, data.balance_x = order_balance(records)
    if len(data.balance) < len(records):
        data.notes.append(f"balance.jsonl: {len(records) - len(data.balance)} line(s) of steps re-trained "
                          "after --resume replaced by the newer ones")
    records, skipped = files.read_affinity_log()
    if skipped:
        data.notes.append(f"affinity.jsonl: {skipped} unreadable line(s) skipped")
    data.affinity = order_balance(records)[0]
    return data


def _num(v: Any) -> float:
    """A finite-or-NaN float from a JSON value (None, strings and the like become NaN)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


def _best_record(data: RunData) -> tuple[int, dict[str, Any]]:
    """(epoch, record) of the best epoch, else the last one."""
    best = data.best_epoch
    for rec in data.history:
        if rec.get("epoch") == best:
            return best, rec
    return data.history[-1].get("epoch", len(data.history)), data.history[-1]


def _dead_units(data: RunData) -> list[list[Any]]:
    """Rows ``[task, epoch, dead, units, note]``: each task's dead head-input units at its best epoch (metrics.json's
    ``dead_units``), else the best epoch's ``diagnostics.dead_units``."""
    from recmtl.metrics import DEAD_SHARE
    per_task = data.metrics.get("dead_units")
    if not isinstance(per_task, dict) or not per_task:
        epoch, diag = _best_diagnostics(data)
        counts = diag.get("dead_units") if isinstance(diag.get("dead_units"), dict) else {}
        per_task = {t: {"epoch": epoch, "dead": c[0], "units": c[1]} for t, c in counts.items()
                    if isinstance(c, list) and len(c) == 2}
    rows = []
    for t, d in per_task.items():
        if not isinstance(d, dict):
            continue
        dead, units = int(_num(d.get("dead"))), int(_num(d.get("units")))
        note = "at least half dead: check the task's metrics" if units and dead >= DEAD_SHARE * units else ""
        rows.append([t, d.get("epoch"), dead, units, note])
    return rows


def _best_diagnostics(data: RunData) -> tuple[int | None, dict[str, Any]]:
    """Tower diagnostics of the best epoch (else the latest epoch that has some)."""
    epoch, rec = _best_record(data)
    if isinstance(rec.get("diagnostics"), dict) and rec["diagnostics"]:
        return epoch, rec["diagnostics"]
    for rec in reversed(data.history):
        if isinstance(rec.get("diagnostics"), dict) and rec["diagnostics"]:
            return rec.get("epoch"), rec["diagnostics"]
    return None, {}


# ---------------------------------------------------------------- drawing

def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("recmtl report needs matplotlib: pip install 'recmtl[report]'") from None
    return Figure, FigureCanvasAgg


def _new_figure(width_in: float, height_in: float):
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _render(fig, section: str, name: str, title: str, caption: str = "") -> Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    width, height = (round(float(v)) for v in fig.get_size_inches() * DPI)
    return Image(section, name, title, buf.getvalue(), width, height, caption)


def _mark_best(ax, best: int | None) -> None:
    if best is not None:
        ax.axvline(best, color="0.4", linestyle=":", linewidth=1.2, label=f"best epoch {best}")


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _finish_axes(ax, xlabel: str, title: str | None = None, ylabel: str | None = None,
                 integer_x: bool = True) -> None:
    """The line plots' common dressing: axis labels, title, light grid, legend; integer ticks for epochs."""
    if integer_x:
        _integer_x(ax)
    ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def training_curves(data: RunData) -> Image:
    """Train loss (solid) and validation loss (dashed) per task, then one panel per validation metric."""
    hist = data.history
    epochs = [_num(r.get("epoch", i + 1)) for i, r in enumerate(hist)]
    tasks = list(dict.fromkeys(t for r in hist for t in (r.get("train_loss") or {})))
    tasks += [t for r in hist for t in (r.get("validation") or {}) if t not in tasks]
    metric_names: list[str] = []
    for r in hist:
        for m in (r.get("validation") or {}).values():
            if isinstance(m, dict):
                metric_names += [k for k in m if k not in NOT_METRICS and k != "loss" and k not in metric_names]
    panels = ["loss", *metric_names]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(4.0 * ncols, 3.5 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = {t: f"C{i % 10}" for i, t in enumerate(tasks)}
    best = data.best_epoch

    def val(r: dict, task: str, metric: str) -> float:
        m = (r.get("validation") or {}).get(task)
        return _num(m.get(metric)) if isinstance(m, dict) else math.nan

    ax = axes[0]
    for t in tasks:
        ax.plot(epochs, [_num((r.get("train_loss") or {}).get(t)) for r in hist], marker="o", color=colors[t],
                label=f"{t} train")
        v = [val(r, t, "loss") for r in hist]
        if any(not math.isnan(x) for x in v):
            ax.plot(epochs, v, marker="o", linestyle="--", color=colors[t], label=f"{t} validation")
    ax.set_title("loss")
    for ax, metric in zip(axes[1:], metric_names):
        for t in tasks:
            v = [val(r, t, metric) for r in hist]
            if any(not math.isnan(x) for x in v):
                ax.plot(epochs, v, marker="o", color=colors[t], label=t)
        ax.set_title(f"validation {metric}")
    for ax in axes[:len(panels)]:
        _mark_best(ax, best)
        _finish_axes(ax, "epoch")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    caption = (f"best epoch {best} by {data.metrics.get('monitor', '?')} (dotted line)" if best else "")
    return _render(fig, "curves", "curves.png", "Training curves", caption)


def _gate_matrix(rows: dict[str, Any]) -> tuple[list[str], list[list[float]], int]:
    """Gate names, values padded with NaN to the widest gate (levels may differ in expert count)."""
    if not isinstance(rows, dict) or not rows:
        raise ValueError("expected {gate: [value per expert]}")
    names = [str(k) for k in rows]
    values = []
    for k, v in rows.items():
        if not isinstance(v, list) or not v:
            raise ValueError(f"gate '{k}': expected a list of numbers")
        values.append([_num(x) for x in v])
    width = max(len(v) for v in values)
    return names, [v + [math.nan] * (width - len(v)) for v in values], width


def _heatmap(ax, values: list[list[float]], rows: list[str], cols: list[str], cmap: str = "viridis",
             vmin: float | None = None, vmax: float | None = None, diverging: bool = False) -> None:
    import numpy as np
    arr = np.ma.masked_invalid(np.asarray(values, dtype=float))
    if diverging:
        lim = float(np.nanmax(np.abs(arr.filled(np.nan)))) if arr.count() else 1.0
        vmin, vmax = -(lim or 1.0), (lim or 1.0)
    im = ax.imshow(arr, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    long = max(map(len, cols)) > 6
    ax.set_xticks(range(len(cols)), labels=cols, rotation=45 if long else 0, ha="right" if long else "center")
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.figure.colorbar(im, ax=ax, shrink=0.9)
    if arr.size <= 400:
        for i in range(arr.shape[0]):
            for j in range(arr.shape[1]):
                if arr.mask is not np.ma.nomask and arr.mask[i, j]:
                    continue
                r, g, b, _ = im.cmap(im.norm(arr[i, j]))
                color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, f"{arr[i, j]:.2f}", ha="center", va="center", color=color, fontsize="small")


def _heatmap_size(n_rows: int, n_cols: int) -> tuple[float, float]:
    return min(3.0 + 0.8 * n_cols, 16.0), min(1.6 + 0.45 * n_rows, 14.0)


def gate_weights_figure(diag: dict[str, Any], epoch: int | None) -> Image:
    names, values, width = _gate_matrix(diag["gate_weights"])
    fig = _new_figure(*_heatmap_size(len(names), width))
    ax = fig.subplots()
    _heatmap(ax, values, names, [str(j) for j in range(width)], vmin=0.0, vmax=1.0)
    ax.set_title(f"mean gate weight (epoch {epoch})")
    ax.set_xlabel("expert")
    ax.set_ylabel("gate")
    return _render(fig, "tower", "gate_weights.png", "Gate weights",
                   f"Mean softmax weight each gate gives each expert on the validation rows, epoch {epoch}. "
                   "Tasks whose rows use different experts share less.")


def gate_entropy_figure(data: RunData) -> Image | None:
    hist = [r for r in data.history if isinstance(r.get("diagnostics"), dict)
            and isinstance(r["diagnostics"].get("gate_entropy"), dict)]
    if not hist:
        return None
    gates = list(dict.fromkeys(g for r in hist for g in r["diagnostics"]["gate_entropy"]))
    epochs = [_num(r.get("epoch")) for r in hist]
    fig = _new_figure(7.0, 4.0)
    ax = fig.subplots()
    for i, g in enumerate(gates):
        ax.plot(epochs, [_num(r["diagnostics"]["gate_entropy"].get(g)) for r in hist], marker="o",
                color=f"C{i % 10}", label=g)
    max_ent = hist[-1]["diagnostics"].get("max_entropy")
    if isinstance(max_ent, dict):
        for i, g in enumerate(gates):
            if g in max_ent:
                ax.axhline(_num(max_ent[g]), color=f"C{i % 10}", linestyle="--", linewidth=1)
        ax.plot([], [], color="0.3", linestyle="--", label="max entropy (uniform gate)")
    elif max_ent is not None:
        ax.axhline(_num(max_ent), color="0.3", linestyle="--", label="max entropy (uniform gate)")
    seen = [_num(v) for r in hist for v in r["diagnostics"]["gate_entropy"].values()]
    seen += [_num(v) for v in max_ent.values()] if isinstance(max_ent, dict) else [_num(max_ent)]
    top = max([v for v in seen if math.isfinite(v)], default=0.0)
    ax.set_ylim(0, top * 1.08 if top > 0 else None)
    _mark_best(ax, data.best_epoch)
    _finish_axes(ax, "epoch", "gate entropy per epoch", "mean gate entropy (nats)")
    return _render(fig, "tower", "gate_entropy.png", "Gate entropy",
                   "Near the maximum: the gate mixes all experts evenly; near 0: each row picks one expert.")


def utilisation_figure(diag: dict[str, Any], epoch: int | None) -> Image:
    names, values, width = _gate_matrix(diag["expert_utilisation"])
    fig = _new_figure(*_heatmap_size(len(names), width))
    ax = fig.subplots()
    _heatmap(ax, values, names, [str(j) for j in range(width)], cmap="magma", vmin=0.0, vmax=1.0)
    ax.set_title(f"expert utilisation (epoch {epoch})")
    ax.set_xlabel("expert")
    ax.set_ylabel("gate")
    return _render(fig, "tower", "expert_utilisation.png", "Expert utilisation",
                   "Share of rows whose largest gate weight goes to each expert; an expert no row picks is idle.")


def attention_figure(diag: dict[str, Any], epoch: int | None) -> Image | None:
    """The encoders' ``attention: {feature: {mean_by_position: [...]}}`` (din, transformer): mean attention weight
    by history position, 1 the most recent item."""
    series = {f"{kind}: {feat}": stats["mean_by_position"] for kind, d in diag["encoders"].items()
              for feat, stats in (d.get("attention") or {}).items()}
    if not series:
        raise ValueError("no attention statistics")
    fig = _new_figure(7.0, 4.0)
    ax = fig.subplots()
    for i, (name, values) in enumerate(series.items()):
        ax.plot(range(1, len(values) + 1), [_num(v) for v in values], marker="o", markersize=3,
                color=f"C{i % 10}", label=name)
    _finish_axes(ax, "history position (1 = most recent item)", "attention by history position",
                 "mean attention weight")
    return _render(fig, "attention", "attention.png", "Attention by history position",
                   f"Mean weight the sequence encoder gives the item at each history position (epoch {epoch}); "
                   "weight on recent items only says recency matters, a flat line that position does not.")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "matrix"


FEATURE_GATES_CAPTION = ("Which features each task uses: each task's learned gate per field (feature_gates; 1 at the "
                         "start, near 0: the task ignores the field).")


def matrix_figures(diag: dict[str, Any], epoch: int | None) -> list[Image]:
    mats = diag["matrices"]
    if not isinstance(mats, dict):
        raise ValueError("expected {name: {rows, cols, values}}")
    images, used = [], set()
    for name, m in mats.items():
        if not isinstance(m, dict) or not isinstance(m.get("values"), list) or not m["values"]:
            raise ValueError(f"matrix '{name}': expected rows, cols and a non-empty values list")
        values = [[_num(x) for x in row] for row in m["values"]]
        n_rows, n_cols = len(values), max(len(r) for r in values)
        if any(len(r) != n_cols for r in values):
            raise ValueError(f"matrix '{name}': rows of different lengths")
        rows = [str(r) for r in (m.get("rows") or range(n_rows))]
        cols = [str(c) for c in (m.get("cols") or range(n_cols))]
        if len(rows) != n_rows or len(cols) != n_cols:
            raise ValueError(f"matrix '{name}': {len(rows)} row / {len(cols)} column labels for a "
                             f"{n_rows}x{n_cols} matrix")
        negative = any(x < 0 for r in values for x in r if not math.isnan(x))
        fig = _new_figure(*_heatmap_size(n_rows, n_cols))
        ax = fig.subplots()
        _heatmap(ax, values, rows, cols, cmap="RdBu_r" if negative else "viridis", diverging=negative)
        ax.set_title(f"{name} (epoch {epoch})")
        slug = f"matrix_{_slug(str(name))}"
        while slug in used:
            slug += "_"
        used.add(slug)
        caption = FEATURE_GATES_CAPTION if name == "feature_gates" else ""
        images.append(_render(fig, "tower", f"{slug}.png", f"Matrix: {name}", caption))
    return images


def order_balance(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[float]]:
    """The balance records to draw and their x position (the global training step).

    The trainer's ``step`` counts over the whole run. When it goes back without a new epoch, a run was
    resumed from its last checkpoint and re-trained steps it had logged before: the newer lines replace
    the older ones. A counter that restarts with every epoch (a plugin's own log) is offset by the
    steps of the epochs before it."""
    steps = [_num(r.get("step")) for r in records]
    if any(math.isnan(s) for s in steps):
        return list(records), [float(i + 1) for i in range(len(records))]
    epochs = [_num(r.get("epoch")) for r in records]
    back = [i for i in range(1, len(steps)) if steps[i] < steps[i - 1]]
    if back and all(epochs[i] > epochs[i - 1] for i in back):  # per-epoch counter
        x, offset = [steps[0]], 0.0
        for i in range(1, len(steps)):
            if steps[i] < steps[i - 1]:
                offset = x[-1]
            x.append(offset + steps[i])
        return list(records), x
    kept: list[int] = []
    for i, s in enumerate(steps):
        while kept and steps[kept[-1]] >= s:
            kept.pop()
        kept.append(i)
    return [records[i] for i in kept], [steps[i] for i in kept]


def _epoch_starts(records: list[dict[str, Any]], x: list[float]) -> list[float]:
    """Between the last logged step of an epoch and the first of the next."""
    return [(x0 + x1) / 2 for x0, x1, a, b in zip(x, x[1:], records, records[1:]) if a.get("epoch") != b.get("epoch")]


def _series(records: list[dict[str, Any]], key: str) -> dict[str, list[float]]:
    names = list(dict.fromkeys(k for r in records if isinstance(r.get(key), dict) for k in r[key]))
    return {n: [_num((r.get(key) or {}).get(n)) if isinstance(r.get(key), dict) else math.nan for r in records]
            for n in names}


def balance_figures(data: RunData) -> list[Image]:
    records = data.balance
    if not records:
        return []
    x, starts = data.balance_x, _epoch_starts(records, data.balance_x)
    specs = [
        ("weights", "balance_weights.png", "Task weights", "weight", "per-task loss weight",
         "The weight the balancer gave each task's loss."),
        ("grad_norms", "balance_grad_norms.png", "Gradient norms", "norm", "gradient norm on the shared parameters",
         "Norm of each task's gradient on the shared parameters: a task with a much larger norm dominates the update."),
        ("cosine", "balance_cosine.png", "Gradient cosine similarity", "cosine",
         "pairwise cosine of task gradients",
         ("Cosine similarity of two tasks' gradients on the shared parameters; below 0 (shaded) the tasks "
          "pull the shared parameters in conflicting directions.")),
    ]
    images = []
    marker = "o" if len(records) <= 60 else None
    window = max(5, len(records) // 50) if len(records) > SMOOTH_ABOVE else 0
    for key, fname, title, ylabel, ax_title, caption in specs:
        series = _series(records, key)
        if not series:
            continue
        fig = _new_figure(8.0, 4.0)
        ax = fig.subplots()
        for i, (n, v) in enumerate(series.items()):
            if window:  # many noisy points: faint raw values under a rolling mean
                ax.plot(x, v, color=f"C{i % 10}", linewidth=0.6, alpha=0.3)
                v = pd.Series(v).rolling(window, center=True, min_periods=1).mean().tolist()
            ax.plot(x, v, color=f"C{i % 10}", label=n, marker=marker, markersize=3, linewidth=1.2)
        for s in starts:
            ax.axvline(s, color="0.8", linewidth=0.8, zorder=0)
        if key == "cosine":
            ax.axhline(0.0, color="black", linewidth=1)
            ax.axhspan(-1.05, 0.0, color="tab:red", alpha=0.08, zorder=0)
            ax.set_ylim(-1.05, 1.05)
        if key == "grad_norms":
            positive = [y for v in series.values() for y in v if y > 0]
            if positive and max(positive) / min(positive) > 100:
                ax.set_yscale("log")
        _finish_axes(ax, "step" + (" (grey lines: epoch starts)" if starts else ""),
                     ax_title + (f" (rolling mean over {window} logged steps)" if window else ""), ylabel,
                     integer_x=False)
        images.append(_render(fig, "balance", fname, title, caption))
    return images


def affinity_figures(data: RunData) -> list[Image]:
    """The mean lookahead affinity matrix (TAG) and its evolution over training, one line per task pair."""
    import numpy as np
    records = [r for r in data.affinity if isinstance(r.get("affinity"), dict)]
    if not records:
        return []
    names = list(records[0]["affinity"])
    stack = np.array([[[_num((r["affinity"].get(a) or {}).get(b)) for b in names] for a in names] for r in records])
    finite = stack[np.isfinite(stack)]
    top = float(np.abs(finite).max()) if finite.size else 0.0
    scale = 10.0 ** math.floor(math.log10(top)) if top > 0 else 1.0
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(np.where(np.isfinite(stack), stack, np.nan), axis=0) if finite.size else stack[0]
    fig = _new_figure(*_heatmap_size(len(names), len(names)))
    ax = fig.subplots()
    _heatmap(ax, (mean / scale).tolist(), names, names, cmap="RdBu", diverging=True)
    ax.set_xlabel("task j (whose loss changes)")
    ax.set_ylabel("task i (whose gradient steps)")
    ax.set_title(f"mean over {len(records)} steps (x {scale:g})")
    images = [_render(fig, "affinity", "affinity_matrix.png", "Affinity matrix",
                      "1 - L_j(after a step along task i's gradient) / L_j(before), averaged over the measured steps; "
                      "> 0: training task i helps task j.")]
    x = [_num(r.get("step")) for r in records]
    fig = _new_figure(8.0, 4.0)
    ax = fig.subplots()
    k = 0
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i != j:
                ax.plot(x, (stack[:, i, j] / scale).tolist(), color=f"C{k % 10}", label=f"{a} -> {b}",
                        marker="o" if len(x) <= 60 else None, markersize=3, linewidth=1.2)
                k += 1
    ax.axhline(0.0, color="black", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"affinity (x {scale:g})")
    ax.set_title("inter-task affinity over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2 if k > 6 else 1)
    images.append(_render(fig, "affinity", "affinity_evolution.png", "Affinity over training",
                          "How the task relations change during training (dynamic task relations)."))
    return images


def conflict_summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task pair over the logged steps: mean, minimum and last cosine, share of steps below 0."""
    out = []
    for pair, values in _series(records, "cosine").items():
        v = [c for c in values if not math.isnan(c)]
        if v:
            out.append({"pair": pair, "mean": sum(v) / len(v), "min": min(v), "last": v[-1],
                        "negative": sum(c < 0 for c in v) / len(v), "steps": len(v)})
    return out


# ---------------------------------------------------------------- HTML

def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return html.escape(str(v))
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _metrics_table(metrics: dict[str, Any]) -> str:
    tasks = {t: m for t, m in metrics.items() if isinstance(m, dict)}
    names = list(dict.fromkeys(k for m in tasks.values() for k in m))
    names = [n for n in names if n != "rows"] + (["rows"] if any("rows" in m for m in tasks.values()) else [])
    return _table(["task", *names], [[t, *[m.get(n, "") for n in names]] for t, m in tasks.items()])


def _component(c: Any) -> str:
    if not isinstance(c, dict):
        return str(c or "?")
    params = ", ".join(f"{k}={v}" for k, v in c.items() if k != "name")
    return f"{c.get('name', '?')}" + (f" ({params})" if params else "")


def _summary(data: RunData) -> str:
    cfg, m = data.config, data.metrics
    epochs = data.history
    speeds = [_num(r.get("rows_per_s")) for r in epochs]
    speeds = [s for s in speeds if not math.isnan(s)]
    rows = [
        ["run directory", str(data.run_dir)],
        ["tower", _component(cfg.get("tower"))],
        ["balancer", _component(cfg.get("balancer"))],
        ["monitor", m.get("monitor", "")],
        ["best epoch", f"{m.get('best_epoch', '?')} of {len(epochs)} trained"],
    ]
    if speeds:
        rows.append(["training speed", f"{sum(speeds) / len(speeds):,.0f} rows/s (mean over epochs)"])
    out = _table(["", ""], rows).replace("<thead><tr><th></th><th></th></tr></thead>", "")
    tasks = cfg.get("tasks") if isinstance(cfg.get("tasks"), list) else []
    if tasks:
        out += "<h3>Tasks</h3>" + _table(
            ["task", "head", "label", "weight", "head params"],
            [[t.get("name"), t.get("head"), t.get("label"), f"{_num(t.get('weight')):g}",
              ", ".join(f"{k}={v}" for k, v in (t.get("params") or {}).items())] for t in tasks if isinstance(t, dict)])
    return out


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}td{font-variant-numeric:tabular-nums}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}.note{color:#a60}
"""


def _figure_html(img: Image) -> str:
    b64 = base64.b64encode(img.png).decode("ascii")
    cap = f"<figcaption>{html.escape(img.caption)}</figcaption>" if img.caption else ""
    return (f'<figure id="{html.escape(img.name)}"><img alt="{html.escape(img.title)}" width="{img.width}" '
            f'height="{img.height}" src="data:image/png;base64,{b64}">{cap}</figure>')


def _calibrator_file(data: RunData) -> dict[str, Any]:
    """``calibrator.json``'s content when ``recmtl calibrate`` wrote one (empty when absent or unreadable)."""
    path = data.run_dir / CALIBRATOR
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        data.notes.append(f"{CALIBRATOR} is not valid JSON; its reliability diagrams are not shown")
        return {}
    return raw if isinstance(raw, dict) else {}


def _bins(entry: Any) -> tuple[list[float], list[float], list[int]] | None:
    if not isinstance(entry, dict):
        return None
    p, o, n = entry.get("predicted"), entry.get("observed"), entry.get("count")
    if not (isinstance(p, list) and isinstance(o, list) and isinstance(n, list) and len(p) == len(o) == len(n) and p):
        return None
    return [_num(v) for v in p], [_num(v) for v in o], [int(_num(v)) for v in n]


def reliability_figure(data: RunData) -> Image | None:
    """One panel per binary/ESMM task: observed positive rate against mean predicted probability per equal-mass bin
    (the diagonal: perfect calibration), for the validation and test splits of ``metrics.json`` and, when the run was
    calibrated, the calibration file's held-out split before and after; each curve's label gives its bin counts."""
    saved = data.metrics.get("reliability") if isinstance(data.metrics.get("reliability"), dict) else {}
    cal = _calibrator_file(data)
    curves: dict[str, list[tuple[str, tuple[list[float], list[float], list[int]]]]] = {}
    for split in ("validation", "test"):
        for task, entry in (saved.get(split) or {}).items():
            b = _bins(entry)
            if b:
                epoch = entry.get("epoch")
                curves.setdefault(task, []).append((f"{split}" + (f" (epoch {epoch})" if epoch else ""), b))
    for task, entry in (cal.get("reliability") or {}).items():
        if isinstance(entry, dict):
            for when in ("before", "after"):
                b = _bins(entry.get(when))
                if b:
                    what = "uncalibrated" if when == "before" else f"{cal.get('method', '')} calibrated"
                    curves.setdefault(task, []).append((f"{entry.get('split', '')} split, {what}", b))
    if not curves:
        return None
    ncols = min(3, len(curves))
    nrows = math.ceil(len(curves) / ncols)
    fig = _new_figure(4.2 * ncols, 4.0 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (task, items) in zip(axes, curves.items()):
        top = max(max(max(p), max(o)) for _, (p, o, _n) in items)
        top = min(1.0, top * 1.05) or 1.0
        ax.plot([0, top], [0, top], color="0.6", linestyle=":", linewidth=1, label="perfectly calibrated")
        for i, (label, (p, o, n)) in enumerate(items):
            counts = f"{min(n)}" if min(n) == max(n) else f"{min(n)}-{max(n)}"
            ax.plot(p, o, marker="o", markersize=3, color=f"C{i % 10}", label=f"{label}: {len(n)} bins of {counts} rows")
        ax.set_title(task)
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed positive rate")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    for ax in axes[len(curves):]:
        ax.set_visible(False)
    return _render(fig, "calibration", "reliability.png", "Reliability diagrams",
                   "equal-mass bins of the scores sorted; points above the diagonal: scores too low, below: too high")


def render_html(data: RunData, images: list[Image], extra_diagnostics: dict[str, Any]) -> str:
    by_section: dict[str, list[Image]] = {}
    for img in images:
        by_section.setdefault(img.section, []).append(img)
    title = f"recmtl report: {data.run_dir.resolve().name}"
    parts = [(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
              f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>")]
    for note in data.notes:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    parts.append("<h2>Summary</h2>" + _summary(data))
    m = data.metrics
    if isinstance(m.get("validation"), dict) and m["validation"]:
        parts.append(f"<h3>Validation (best epoch {_fmt(m.get('best_epoch'))})</h3>" + _metrics_table(m["validation"]))
    if isinstance(m.get("test"), dict) and m["test"]:
        parts.append("<h3>Test (best checkpoint)</h3>" + _metrics_table(m["test"]))
    sections = [("curves", "Training curves", ""),
                ("calibration", "Calibration", "Predicted against observed per bin of equal row count (binary and "
                 "ESMM tasks; <code>recmtl calibrate</code> adds its before/after curves)."),
                ("tower", "Tower diagnostics", "What the tower learned about how the tasks relate."),
                ("attention", "Sequence attention", "What the target-attention encoders (din, transformer) attend to."),
                ("balance", "Task balance", "Logged every <code>train.log_every</code> training steps (balance.jsonl)."),
                ("affinity", "Task affinity", "Lookahead inter-task affinity (TAG), measured every "
                 "<code>train.affinity_every</code> steps (affinity.jsonl).")]
    for key, heading, intro in sections:
        if key in by_section:
            parts.append(f"<h2>{heading}</h2>" + (f"<p>{intro}</p>" if intro else ""))
            parts += [(f"<h3>{html.escape(i.title)}</h3>" if i.title != heading else "") + _figure_html(i)
                      for i in by_section[key]]
        if key == "balance" and data.balance:
            conflict = conflict_summary(data.balance)
            if conflict:
                parts.append("<h3>Gradient conflict per task pair</h3>" + _table(
                    ["pair", "mean cosine", "min cosine", "last cosine", "steps with cosine < 0", "logged steps"],
                    [[c["pair"], c["mean"], c["min"], c["last"], f"{c['negative']:.0%}", c["steps"]] for c in conflict]))
    dead = _dead_units(data)
    if dead:
        parts.append("<h2>Dead units</h2><p>Units of each task's head input (the tower's output for it) that were "
                     "constant on every validation row, at the task's best epoch.</p>"
                     + _table(["task", "epoch", "dead units", "units", ""], dead))
    if extra_diagnostics:
        parts.append("<h2>Other tower diagnostics</h2><p>Diagnostics this report does not draw "
                     f"(epoch {_fmt(data.diagnostics_epoch)}), as the tower reported them:</p>"
                     f"<pre>{html.escape(json.dumps(extra_diagnostics, indent=2, default=str))}</pre>")
    if data.config_text:
        parts.append(f"<h2>Config</h2><pre>{html.escape(data.config_text)}</pre>")
    info = data.run_info
    if info:
        rows = [[k, v] for k, v in (info.get("versions") or {}).items()]
        parts.append("<h2>Run</h2>" + _table(["package", "version"], rows))
        if info.get("argv"):
            parts.append(f"<p>command: <code>{html.escape(' '.join(map(str, info['argv'])))}</code></p>")
        if info.get("started"):
            parts.append(f"<p>started: {html.escape(str(info['started']))}</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ---------------------------------------------------------------- the report

def build_images(data: RunData) -> tuple[list[Image], dict[str, Any]]:
    """Every figure the run's data allows, and the diagnostics left undrawn (unknown keys, or a known key
    whose value does not follow the convention, with the reason)."""
    images = [training_curves(data)]
    reliability = reliability_figure(data)
    if reliability is not None:
        images.append(reliability)
    epoch, diag = _best_diagnostics(data)
    data.diagnostics_epoch = epoch
    extra = {k: v for k, v in diag.items()
             if k not in DRAWN_DIAGNOSTICS or (k == "max_entropy" and "gate_entropy" not in diag)}
    builders = [("gate_weights", lambda: gate_weights_figure(diag, epoch)),
                ("gate_entropy", lambda: gate_entropy_figure(data)),
                ("expert_utilisation", lambda: utilisation_figure(diag, epoch)),
                ("matrices", lambda: matrix_figures(diag, epoch)),
                ("encoders", lambda: attention_figure(diag, epoch))]
    for key, build in builders:
        if key not in diag:
            continue
        try:
            out = build()
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            extra[key] = {"not drawn": str(exc), "value": diag[key]}
            continue
        images += out if isinstance(out, list) else ([out] if out else [])
    images += balance_figures(data)
    images += affinity_figures(data)
    return images, extra


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the PNGs and ``index.html`` for ``run_dir`` into ``out_dir`` (default ``RUN_DIR/report``);
    returns the path of ``index.html``."""
    _matplotlib()
    data = load_run_data(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    images, extra = build_images(data)
    for img in images:
        with atomic_path(out / img.name) as tmp:
            tmp.write_bytes(img.png)
    index = out / "index.html"
    with atomic_path(index) as tmp:
        tmp.write_text(render_html(data, images, extra), encoding="utf-8")
    return index
