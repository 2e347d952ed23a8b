"""The page of a compare directory (``recmtl compare``, ``recmtl group --train``): from ``DIR/compare.json`` only,
PNGs and one self-contained ``DIR/report/index.html`` drawn like ``recmtl report`` (a leaf, as report is)."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from recmtl.errors import DataError
from recmtl.files import atomic_path
from recmtl.report import _CSS, Image, _figure_html, _heatmap, _heatmap_size, _matplotlib, _new_figure, _render, _table

RESULT = "compare.json"


def read_result(folder: Path) -> dict[str, Any]:
    path = folder / RESULT
    if not path.is_file():
        raise DataError(f"{folder} has no {RESULT}; run `recmtl compare CONFIG -o {folder}` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc})") from None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def delta_figure(result: dict[str, Any]) -> Image:
    """Per task, each variant's relative difference to single-task (%, + is better) with its 95% interval;
    then Δm."""
    variants = list(result["variants"])
    tasks = [t for t in result["tasks"] if any(t in v["tasks"] for v in result["variants"].values())]
    labels = [*tasks, "Δm"]
    fig = _new_figure(max(6.0, 1.4 * len(labels) * max(1, len(variants)) / 2 + 3), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(variants))
    for k, variant in enumerate(variants):
        entry = result["variants"][variant]
        means, lo, hi = [], [], []
        for t in labels:
            s = entry.get("delta_m_pct") if t == "Δm" else (entry["tasks"].get(t) or {}).get("relative_pct")
            m = s.get("mean") if s else math.nan
            ci = s.get("ci95") if s else None
            means.append(m if _finite(m) else 0.0)
            lo.append(m - ci[0] if ci and _finite(m) else 0.0)
            hi.append(ci[1] - m if ci and _finite(m) else 0.0)
        xs = [i + (k - (len(variants) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, means, width, yerr=[lo, hi], capsize=3, label=variant)
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("vs single-task, % (+ better)")
    ax.legend(fontsize="small")
    return _render(fig, "compare", "compare_deltas.png", "Relative difference to single-task",
                   f"Mean over {len(result['seeds'])} seed(s) of the paired relative difference of each task's "
                   "primary metric; bars: 95% interval over seeds.")


def groups_figure(groups: dict[str, Any]) -> Image:
    """The mean affinity matrix ``recmtl group`` chose the groups from."""
    names, matrix = groups["tasks"], groups["affinity"]
    finite = [abs(v) for row in matrix for v in row if _finite(v)]
    top = max(finite) if finite else 0.0
    scale = 10.0 ** math.floor(math.log10(top)) if top > 0 else 1.0
    fig = _new_figure(*_heatmap_size(len(names), len(names)))
    ax = fig.add_subplot()
    _heatmap(ax, [[v / scale if _finite(v) else math.nan for v in row] for row in matrix], names, names, cmap="RdBu",
             diverging=True)
    ax.set_xlabel("task j (whose loss changes)")
    ax.set_ylabel("task i (whose gradient steps)")
    ax.set_title(f"mean affinity (x {scale:g})")
    return _render(fig, "groups", "groups_affinity.png", "Task affinity",
                   "Groups chosen: " + "  ".join("{" + ", ".join(g) + "}" for g in groups["groups"])
                   + f" ({groups.get('method', '?')}; score {groups.get('score', math.nan):.4g}).")


def write_compare_report(folder: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``compare_deltas.png`` and ``index.html`` into ``out_dir`` (default ``DIR/report``)."""
    folder = Path(folder)
    _matplotlib()
    result = read_result(folder)
    out = Path(out_dir) if out_dir is not None else folder / "report"
    images = [delta_figure(result)] if result["variants"] else []
    rows = []
    for variant, entry in result["variants"].items():
        for t, te in entry["tasks"].items():
            pm = result["primary"].get(t, "")
            single = (result["single"].get(t) or {}).get(pm) or {}
            mine = te["metrics"].get(pm) or {}
            d = te.get("delta") or {}
            ci = d.get("ci95")
            verdict = ("negative transfer" if te.get("negative_transfer") else "positive transfer"
                       if te.get("positive_transfer") else "within noise" if te.get("negative_transfer") is False
                       else "n/a")
            rows.append([variant, t, pm, single.get("mean", math.nan), single.get("std", math.nan),
                         mine.get("mean", math.nan), mine.get("std", math.nan), d.get("mean", math.nan),
                         f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "-", verdict])
    dm_rows = [[v, (e.get("delta_m_pct") or {}).get("mean", math.nan), (e.get("delta_m_pct") or {}).get("std", math.nan),
                ", ".join(e.get("negative_transfer") or []) or "-"] for v, e in result["variants"].items()]
    title = f"recmtl compare: {folder.resolve().name}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>{html.escape(result['split'])} metrics, seeds {', '.join(map(str, result['seeds']))}.</p>",
             "<h2>Δm</h2>" + _table(["variant", "Δm % (mean)", "std", "negative transfer"], dm_rows),
             "<h2>Per task</h2>" + _table(["variant", "task", "metric", "single mean", "single std", "multi mean",
                                           "multi std", "Δ (paired)", "95% CI", "verdict"], rows)]
    parts += [_figure_html(i) for i in images]
    if result.get("groups"):
        groups = result["groups"]
        fig = groups_figure(groups)
        images.append(fig)
        vs = [[t, d.get("metric"), d.get("mean", math.nan),
               f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d.get("ci95") else "-"]
              for t, d in (groups.get("vs_all_in_one") or {}).items()]
        parts.append("<h2>Task groups</h2>" + _figure_html(fig)
                     + ("<h3>Grouped minus all-in-one (paired by seed)</h3>"
                        + _table(["task", "metric", "Δ", "95% CI"], vs) if vs else ""))
    parts.append("</body></html>\n")
    for img in images:
        with atomic_path(out / img.name) as tmp:
            tmp.write_bytes(img.png)
    index = out / "index.html"
    with atomic_path(index) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return index
