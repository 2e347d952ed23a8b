"""``recmtl compare``: does multi-task learning help, for which task? From one config it plans and trains every
*cell* -- each task alone and each multi-task variant (tower x balancer), every seed -- each an ordinary run
directory under ``DIR/runs/``, then compares each task's metrics with its single-task baseline.

Layout of a compare directory::

    DIR/plan.json             the base config (as compared: seed, progress and threads left out; and in full) and
                              the cells planned so far
    DIR/configs/NAME.yaml     each cell's config
    DIR/runs/NAME/            each cell's run directory (``recmtl train --out``)
    DIR/done/NAME.json        written when the cell finished: re-running skips it; an unfinished cell resumes
    DIR/compare.json          the analysis (``analyse``); DIR/report/ its page

Capacity: a single-task cell trains the config's own tower (its parameters unchanged) with one task, so each
task gets the same encoders, expert or bottom widths and task tower as in the multi-task model; T single-task
models together hold about T times the shared parameters. A task whose head reads another task's score (a
task parameter naming another task, e.g. ESMM's ``ctr_task``) keeps that task in its single-task cell, since it
cannot be trained without it; only its own metrics are compared.

Statistics, per task and metric over the seeds: mean and sample std; the paired-by-seed difference (cell of seed
s minus the single-task cell of seed s) with a 95% Student-t confidence interval; *negative transfer* when the
whole interval is on the worse side (undetermined with one seed). Δm (Maninis et al., CVPR 2019, computed as
LibMTL's ``count_improvement``): per seed, the mean over tasks of ``±(M_mtl - M_single) / M_single`` (+ where higher
is better), in percent, then mean ± std and the same interval over seeds.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from recmtl.config import Config, dump_config, parse_config
from recmtl.errors import ConfigError, DataError, RecmtlError
from recmtl.files import write_json, write_text
from recmtl.rundir import METRICS, RunDir

PLAN = "plan.json"
RESULT = "compare.json"
SINGLE = "single"
GROUPED = "grouped"
#: config keys that do not change what a cell learns (left out of the fingerprint)
NOT_FINGERPRINTED = (("seed",), ("train", "progress"), ("train", "threads"))
#: metric names whose larger value is better when a head does not say (multilabel's auc_ATTR, f1 variants)
NOT_METRICS = ("rows",)
HIGHER_PREFIXES = ("auc", "gauc", "accuracy", "f1", "micro_f1", "macro_f1", "ndcg", "recall", "precision", "hit")


@dataclass(frozen=True)
class Cell:
    """One training run of a comparison. ``variant`` is what it belongs to (``single``, ``TOWER+BALANCER`` or
    ``grouped``); ``tasks`` what it trains, ``scored`` the tasks whose metrics it contributes."""

    name: str
    variant: str
    tasks: tuple[str, ...]
    scored: tuple[str, ...]
    tower: str
    balancer: str
    seed: int


def grouped_variant(partition: list[list[str]]) -> str:
    """The variant name of one partition's grouped models, e.g. ``grouped a+b|c``."""
    return f"{GROUPED} " + "|".join("+".join(g) for g in partition)


def _dependencies(config: Config) -> dict[str, list[str]]:
    """Each task's upstream tasks: task parameters whose value names another task (ESMM's ``ctr_task``)."""
    names = {t.name for t in config.tasks}
    return {t.name: [v for v in t.params.values() if isinstance(v, str) and v in names and v != t.name]
            for t in config.tasks}


def with_dependencies(config: Config, tasks: Iterable[str]) -> tuple[str, ...]:
    """``tasks`` plus, transitively, the tasks their heads read, in config order."""
    deps, need, todo = _dependencies(config), set(), list(tasks)
    while todo:
        t = todo.pop()
        if t not in need:
            need.add(t)
            todo.extend(deps[t])
    return tuple(t.name for t in config.tasks if t.name in need)


def parse_names(text: str | None, what: str, known: list[str]) -> list[str]:
    """``a,b,c`` -> names, each checked against ``known`` (before any training)."""
    if not text:
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown {what} {', '.join(repr(n) for n in unknown)} (registered: {', '.join(known)})")
    return list(dict.fromkeys(names))


def plan_cells(config: Config, seeds: int, towers: list[str], balancers: list[str],
               groups: list[list[str]] | None = None) -> list[Cell]:
    """The cells: each task alone (config's tower, balancer ``fixed``), then every tower x balancer with all
    tasks, then (``groups``) the config's tower and balancer on each group, for seeds ``config.seed + i``."""
    if len(config.tasks) < 2:
        raise ConfigError(f"the config has one task ('{config.tasks[0].name}'): nothing to compare; compare needs "
                          "two or more tasks (single-task baselines against multi-task models)")
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if not config.data.validation and not config.data.test:
        raise ConfigError("compare needs held-out data to compare the models on: set data.test (or at least "
                          "data.validation) in the config")
    towers = towers or [config.tower.name]
    balancers = balancers or [config.balancer.name]
    names = [t.name for t in config.tasks]
    cells = []
    for i in range(seeds):
        seed = config.seed + i
        for t in names:
            cells.append(Cell(f"single-{t}-s{seed}", SINGLE, with_dependencies(config, [t]), (t,),
                              config.tower.name, "fixed", seed))
        for tower in towers:
            for bal in balancers:
                cells.append(Cell(f"{tower}+{bal}-s{seed}", f"{tower}+{bal}", tuple(names), tuple(names), tower, bal,
                                  seed))
        for group in groups or []:
            if len(group) == 1:
                continue  # a singleton group is the single-task cell
            tasks = with_dependencies(config, group)
            cells.append(Cell(f"group-{'+'.join(group)}-s{seed}", GROUPED, tasks, tuple(group), config.tower.name,
                              config.balancer.name, seed))
    return cells


def _component(current: Any, name: str) -> dict[str, Any]:
    """The config's component when it has this name (its parameters kept), else the plugin with its defaults."""
    return {"name": name, **current.params} if current.name == name else {"name": name}


def cell_config(config: Config, cell: Cell) -> dict[str, Any]:
    """The raw config of one cell: the base config with the cell's tasks, tower, balancer and seed."""
    raw = yaml.safe_load(dump_config(config))
    raw["seed"] = cell.seed
    raw["tasks"] = [t for t in raw["tasks"] if t["name"] in cell.tasks]
    raw["tower"] = _component(config.tower, cell.tower)
    raw["balancer"] = _component(config.balancer, cell.balancer)
    es = raw.setdefault("train", {}).setdefault("early_stopping", {})
    monitor = es.get("monitor", "auto")
    if isinstance(monitor, dict):
        es["monitor"] = {t: m for t, m in monitor.items() if t in cell.tasks} or "auto"
    elif monitor == "delta_m" and cell.variant == SINGLE:
        es["monitor"] = "auto"
    elif isinstance(monitor, str) and "/" in monitor and monitor.split("/", 1)[0] not in ("mean", *cell.tasks):
        es["monitor"] = "auto"
    if es.get("monitor") != "delta_m":
        es.pop("reference", None)
    return raw


def fingerprint(config: Config) -> dict[str, Any]:
    """The base config as compared between runs of ``compare`` into one directory."""
    raw = yaml.safe_load(dump_config(config))
    for path in NOT_FINGERPRINTED:
        node = raw
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return raw


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(dict.fromkeys([*a, *b])):
            where = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                return f"{where} is {'absent' if key not in a else json.dumps(a[key])} there and " \
                       f"{'absent' if key not in b else json.dumps(b[key])} here"
            diff = _first_difference(a[key], b[key], where)
            if diff:
                return diff
        return None
    if a != b:
        return f"{path or '(top level)'} is {json.dumps(a)} there and {json.dumps(b)} here"
    return None


def read_plan(out: Path) -> dict[str, Any] | None:
    path = out / PLAN
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); it is not a compare directory, or was damaged") from None


def prepare(config: Config, out: Path, cells: list[Cell], partition: list[list[str]] | None = None) -> list[Cell]:
    """Write (or extend) ``DIR/plan.json`` and the cells' configs; refuse a directory made from another config.
    Returns every cell of the directory (those planned before and these)."""
    base = fingerprint(config)
    plan = read_plan(out)
    if plan is None and out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not a compare directory (no {PLAN}); choose another -o")
    if plan is not None:
        stored = plan["config"]
        try:  # through the current config model: keys added since with their defaults compare equal
            stored = fingerprint(parse_config({**stored, "seed": 0}, config._base_dir))
        except ConfigError:
            pass
        diff = _first_difference(stored, base)
        if diff:
            raise ConfigError(f"{out} holds a comparison of a different config ({diff}); refusing to mix their cells: "
                              "use another -o, or the same config")
    known = {c["name"]: Cell(**{**c, "tasks": tuple(c["tasks"]), "scored": tuple(c["scored"])})
             for c in (plan or {}).get("cells", [])}
    for cell in cells:
        known.setdefault(cell.name, cell)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for cell in cells:
        path = out / "configs" / f"{cell.name}.yaml"
        if not path.is_file():
            raw = cell_config(config, cell)
            parse_config(raw, config._base_dir, str(path))  # a cell's config must validate before any training
            write_text(path, yaml.safe_dump(raw, sort_keys=False))
    full = yaml.safe_load(dump_config(config))  # what `recmtl group --train` plans more cells from
    partitions = list((plan or {}).get("partitions", []))
    if partition and partition not in partitions:
        partitions.append(partition)
    write_json(out / PLAN, {"config": base, "full": full, "cells": [asdict(c) for c in known.values()],
                            "partitions": partitions})
    return list(known.values())


def is_done(out: Path, cell: Cell) -> bool:
    return (out / "done" / f"{cell.name}.json").is_file() and (out / "runs" / cell.name / METRICS).is_file()


def train_cell(out: str, cell_name: str, plugins: list[str], disabled: list[str],
               overrides: dict[str, Any] | None = None) -> str:
    """Train one cell (resuming it when an earlier attempt left a checkpoint); marks it done. Runs in a worker
    process under ``--workers``, so it takes and returns plain data."""
    from recmtl.config import load_config
    from recmtl.registry import load_registry
    from recmtl.training.loop import train
    outp = Path(out)
    overrides = overrides or {}
    cfg = load_config(outp / "configs" / f"{cell_name}.yaml", [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    run_dir = outp / "runs" / cell_name
    registry = load_registry([*cfg.plugin_modules(), *plugins], disabled)
    train(cfg, run_dir, registry, resume=RunDir(run_dir).holds_run)
    write_json(outp / "done" / f"{cell_name}.json", {"cell": cell_name})
    return cell_name


def run_cells(out: Path, cells: list[Cell], workers: int, plugins: list[str], disabled: list[str],
              say: Callable[[str], None]) -> None:
    """Train the cells not done yet: in this process (``workers`` 1) or in ``workers`` processes, each with
    ``cpus / workers`` torch threads unless the config sets ``train.threads``. Every cell is tried; the failures
    are raised together at the end."""
    todo = [c for c in cells if not is_done(out, c)]
    skipped = len(cells) - len(todo)
    if skipped:
        say(f"{skipped} cell(s) already trained in {out}: skipped")
    (out / "done").mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    if workers <= 1 or len(todo) <= 1:
        for i, cell in enumerate(todo, 1):
            say(f"[{i}/{len(todo)}] training cell {cell.name}")
            try:
                train_cell(str(out), cell.name, plugins, disabled)
            except RecmtlError as exc:
                failures.append(f"{cell.name}: {exc}")
    else:
        import concurrent.futures as cf
        import multiprocessing
        threads = max(1, (os.cpu_count() or 1) // workers)
        overrides = {"train.threads": threads, "train.progress": False}
        say(f"training {len(todo)} cell(s) in {workers} processes ({threads} thread(s) each)")
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(train_cell, str(out), c.name, plugins, disabled,
                                   _thread_overrides(out, c, overrides)): c for c in todo}
            for n, fut in enumerate(cf.as_completed(futures), 1):
                cell = futures[fut]
                try:
                    fut.result()
                    say(f"[{n}/{len(todo)}] cell {cell.name} done")
                except RecmtlError as exc:
                    failures.append(f"{cell.name}: {exc}")
    if failures:
        raise DataError(f"{len(failures)} cell(s) failed (the others are kept; re-run to retry): " + "; ".join(failures))


def _thread_overrides(out: Path, cell: Cell, overrides: dict[str, Any]) -> dict[str, Any]:
    raw = yaml.safe_load((out / "configs" / f"{cell.name}.yaml").read_text())
    if (raw.get("train") or {}).get("threads"):
        return {k: v for k, v in overrides.items() if k != "train.threads"}
    return overrides


# ---- analysis ---------------------------------------------------------------------------------------------
def higher_is_better(head_cls: Any, metric: str) -> bool:
    """Whether larger values of ``metric`` are better: the head's ``higher_is_better``, else by the name's prefix."""
    if metric in getattr(head_cls, "higher_is_better", frozenset()):
        return True
    return metric.split("_")[0] in HIGHER_PREFIXES or metric in HIGHER_PREFIXES


def primary_metric(metrics: dict[str, float], choice: str | None = None) -> str:
    """The metric that Δm and the flag use: ``choice``, else auc, accuracy, rmse, then loss, as reported."""
    if choice:
        return choice
    for m in ("auc", "accuracy", "rmse", "loss"):
        if m in metrics:
            return m
    return sorted(metrics)[0]


def cell_metrics(run_dir: Path, split: str) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """(metrics on ``split``, validation metrics) per task of a finished cell; ``split`` is ``test`` (each task
    from its own best epoch) or ``validation`` (at each task's best epoch)."""
    summary = RunDir(run_dir).read_metrics()
    valid = {t: {k: float(v) for k, v in (e.get("validation") or {}).items() if _is_number(v)}
             for t, e in (summary.get("task_best") or {}).items()}
    if not valid and summary.get("validation"):
        valid = {t: {k: float(v) for k, v in m.items() if _is_number(v)} for t, m in summary["validation"].items()}
    if split == "test":
        test = {t: {k: float(v) for k, v in m.items() if _is_number(v)} for t, m in (summary.get("test") or {}).items()}
        return test, valid
    return valid, valid


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _stats(values: list[float]) -> dict[str, Any]:
    import numpy as np
    arr = np.asarray(values, dtype=float)
    finite = arr[np.isfinite(arr)]
    n = len(finite)
    out: dict[str, Any] = {"mean": float(finite.mean()) if n else math.nan,
                           "std": float(finite.std(ddof=1)) if n > 1 else math.nan, "n": n,
                           "values": [float(v) for v in arr]}
    if n > 1:
        from scipy import stats
        half = float(stats.t.ppf(0.975, n - 1) * finite.std(ddof=1) / math.sqrt(n))
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    else:
        out["ci95"] = None
    return out


def analyse(out: Path, head_classes: dict[str, Any], metric_choice: dict[str, str] | None = None) -> dict[str, Any]:
    """``compare.json``'s content from the finished cells of ``out`` (see the module docstring); every metric
    the runs report is summarised, Δm and the negative-transfer flag use each task's primary metric."""
    plan = read_plan(out)
    if plan is None:
        raise DataError(f"{out} is not a compare directory (no {PLAN}); pass the folder written by `recmtl compare -o`")
    cells = [Cell(**{**c, "tasks": tuple(c["tasks"]), "scored": tuple(c["scored"])}) for c in plan["cells"]]
    cells = [c for c in cells if is_done(out, c)]
    if not cells:
        raise DataError(f"{out} has no finished cell yet; run `recmtl compare` to train them")
    has_test = bool(plan["config"].get("data", {}).get("test"))
    split = "test" if has_test else "validation"
    tasks = [t["name"] for t in plan["config"]["tasks"]]
    # values[variant][task][metric][seed]
    values: dict[str, dict[str, dict[str, dict[int, float]]]] = {}
    valid_single: dict[str, dict[str, dict[int, float]]] = {}
    by_group: dict[tuple[str, ...], dict[str, dict[str, dict[int, float]]]] = {}  # group cells, by their group
    for cell in cells:
        metrics, valid = cell_metrics(out / "runs" / cell.name, split)
        if cell.variant == GROUPED:
            for t in cell.scored:
                for m, v in (metrics.get(t) or {}).items():
                    if m not in NOT_METRICS:
                        by_group.setdefault(cell.scored, {}).setdefault(t, {}).setdefault(m, {})[cell.seed] = v
            continue
        for t in cell.scored:
            for m, v in (metrics.get(t) or {}).items():
                if m in NOT_METRICS:
                    continue
                values.setdefault(cell.variant, {}).setdefault(t, {}).setdefault(m, {})[cell.seed] = v
            if cell.variant == SINGLE:
                for m, v in (valid.get(t) or {}).items():
                    valid_single.setdefault(t, {}).setdefault(m, {})[cell.seed] = v
    single = values.get(SINGLE, {})
    for partition in plan.get("partitions", []):  # each task from its group's cell; a task alone: single-task
        grouped = {t: (by_group.get(tuple(g), {}).get(t) if len(g) > 1 else single.get(t))
                   for g in partition for t in g}
        if all(grouped.values()):
            values[grouped_variant(partition)] = grouped
    primary = {}
    for t in tasks:
        seen = single.get(t) or next((v[t] for v in values.values() if t in v), None)
        if seen:
            primary[t] = primary_metric(seen, (metric_choice or {}).get(t))
            if primary[t] not in seen:
                raise ConfigError(f"--metric {t}={primary[t]}: task '{t}' reports {', '.join(sorted(seen))}")
    higher = {t: {m: higher_is_better(head_classes.get(t), m) for v in values.values() for m in v.get(t, {})}
              for t in tasks}
    result: dict[str, Any] = {"split": split, "tasks": tasks, "primary": primary, "higher_is_better": higher,
                              "seeds": sorted({c.seed for c in cells}), SINGLE: {}, "variants": {},
                              "reference": {t: {m: float(sum(s.values()) / len(s)) for m, s in ms.items()}
                                            for t, ms in valid_single.items()}}
    for t, ms in single.items():
        result[SINGLE][t] = {m: _stats([s[k] for k in sorted(s)]) for m, s in ms.items()}
    for variant, by_task in values.items():
        if variant == SINGLE:
            continue
        entry: dict[str, Any] = {"tasks": {}}
        per_seed_rel: dict[int, list[float]] = {}
        for t, ms in by_task.items():
            te: dict[str, Any] = {"metrics": {m: _stats([s[k] for k in sorted(s)]) for m, s in ms.items()}}
            pm = primary.get(t)
            base = single.get(t, {}).get(pm, {})
            mine = ms.get(pm, {})
            seeds = sorted(set(base) & set(mine))
            if pm and seeds:
                sign = 1.0 if higher[t].get(pm, False) else -1.0
                diff = [mine[s] - base[s] for s in seeds]
                rel = [sign * (mine[s] - base[s]) / base[s] * 100 if base[s] else math.nan for s in seeds]
                d = _stats(diff)
                te["delta"] = {"metric": pm, "seeds": seeds, **d}
                te["relative_pct"] = _stats(rel)
                ci = d["ci95"]
                worse = None if ci is None else (ci[1] < 0 if sign > 0 else ci[0] > 0)
                better = None if ci is None else (ci[0] > 0 if sign > 0 else ci[1] < 0)
                te["negative_transfer"] = worse
                te["positive_transfer"] = better
                for s, r in zip(seeds, rel):
                    per_seed_rel.setdefault(s, []).append(r)
            entry["tasks"][t] = te
        complete = {s: r for s, r in per_seed_rel.items() if len(r) == len(by_task)}
        if complete:
            dm = _stats([sum(r) / len(r) for _, r in sorted(complete.items())])
            entry["delta_m_pct"] = {**dm, "seeds": sorted(complete)}
        entry["negative_transfer"] = sorted(t for t, te in entry["tasks"].items() if te.get("negative_transfer"))
        result["variants"][variant] = entry
    return result


def delta_m(metrics: dict[str, dict[str, float]], reference: dict[str, dict[str, float]],
            higher: Callable[[str, str], bool]) -> float:
    """Δm in percent of ``metrics`` against ``reference`` (both ``{task: {metric: value}}``): the mean over tasks
    of the mean over the reference's metrics of ``±(M - M_ref) / M_ref`` (LibMTL's ``count_improvement``)."""
    per_task = []
    for t, ref in reference.items():
        rel = [(1.0 if higher(t, m) else -1.0) * (metrics[t][m] - r) / r for m, r in ref.items()
               if r and t in metrics and m in metrics[t] and math.isfinite(metrics[t][m])]
        if rel:
            per_task.append(sum(rel) / len(rel))
    return 100.0 * sum(per_task) / len(per_task) if per_task else math.nan


def _pm(s: dict[str, Any] | None, digits: int = 4) -> str:
    if not s or not math.isfinite(s.get("mean", math.nan)):
        return "-"
    std = s.get("std", math.nan)
    return f"{s['mean']:.{digits}f}" + (f" ± {std:.{digits}f}" if math.isfinite(std) else "")


def _ci(s: dict[str, Any], digits: int = 4) -> str:
    ci = s.get("ci95")
    return f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "(1 seed: no interval)"


def format_result(result: dict[str, Any]) -> str:
    """The terminal table: per variant and task the primary metric, its paired difference and the flag; Δm."""
    rows = [["variant", "task", "metric", "single-task", "multi-task", "Δ (paired)", "95% CI", "Δ %", "verdict"]]
    for variant, entry in result["variants"].items():
        for t, te in entry["tasks"].items():
            pm = result["primary"].get(t)
            d = te.get("delta")
            if d is None:
                rows.append([variant, t, pm or "-", "-", _pm(te["metrics"].get(pm)), "-", "-", "-", "no baseline"])
                continue
            verdict = ("negative transfer" if te["negative_transfer"] else "positive transfer"
                       if te["positive_transfer"] else "within noise" if te["negative_transfer"] is False else "n/a")
            rows.append([variant, t, pm, _pm(result[SINGLE].get(t, {}).get(pm)), _pm(te["metrics"].get(pm)),
                         f"{d['mean']:+.4f}", _ci(d), f"{te['relative_pct']['mean']:+.2f}", verdict])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("")
    lines.append(f"Δm (% vs single-task, {result['split']} metrics, {len(result['seeds'])} seed(s); + is better):")
    for variant, entry in result["variants"].items():
        dm = entry.get("delta_m_pct")
        text = "-" if dm is None else f"{_pm(dm, 2)}  95% CI {_ci(dm, 2)}"
        flag = f"  negative transfer: {', '.join(entry['negative_transfer'])}" if entry["negative_transfer"] else ""
        lines.append(f"  {variant}: {text}{flag}")
    return "\n".join(lines)


def compare(config: Config, out: Path, seeds: int, towers: list[str], balancers: list[str], workers: int,
            plugins: list[str], disabled: list[str], head_classes: dict[str, Any],
            metric_choice: dict[str, str] | None = None, groups: list[list[str]] | None = None,
            say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Plan, train the missing cells, analyse; writes ``DIR/compare.json`` and returns it."""
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cells = plan_cells(config, seeds, towers, balancers, groups)
    all_cells = prepare(config, out, cells, groups)
    wanted = {c.name for c in cells}
    run_cells(out, [c for c in all_cells if c.name in wanted], workers, plugins, disabled, say)
    result = analyse(out, head_classes, metric_choice)
    write_json(out / RESULT, result)
    return result


def head_classes_of(config: Config, registry: Any) -> dict[str, Any]:
    """Each task's head class (for metric directions)."""
    return {t.name: registry.get("head", t.head) for t in config.tasks}


def parse_metric_choice(items: list[str], config: Config) -> dict[str, str]:
    """``TASK=METRIC`` items -> mapping, tasks checked."""
    names = [t.name for t in config.tasks]
    out = {}
    for item in items:
        task, sep, metric = item.partition("=")
        if not sep or not metric:
            raise ConfigError(f"--metric '{item}' must look like TASK=METRIC, e.g. click=auc")
        if task not in names:
            raise ConfigError(f"--metric '{item}': no task '{task}' (tasks: {', '.join(names)})")
        out[task] = metric
    return out
