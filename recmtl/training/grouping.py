"""``recmtl group``: which tasks to train together, from the lookahead affinity a run logged (``affinity.jsonl``,
``train.affinity_every``; see ``recmtl.training.affinity``), in the manner of TAG (Fifty et al., NeurIPS 2021).

The affinity matrix is the mean over the logged steps (of every all-task cell, for a compare directory). A
partition of the tasks into ``k`` groups scores the sum over tasks of the mean affinity onto the task from the
other members of its group, ``sum_t mean_{i in G(t), i != t} A[i -> t]`` (a task alone contributes 0), so a task
is grouped with those whose training lowers its loss. Up to ``EXHAUSTIVE_MAX`` tasks every partition into ``k``
non-empty groups is scored (Stirling number S(T, k) of them, at most 42,525 for 10 tasks); beyond, a greedy
agglomeration starts from every task alone and merges the two groups whose merge raises the score most (or lowers
it least) until ``k`` remain -- fast, not guaranteed optimal. Unlike TAG's overlapping groups, each task is in
exactly one group, so each is trained once.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from recmtl.errors import ConfigError, DataError
from recmtl.rundir import RunDir

EXHAUSTIVE_MAX = 10


def load_affinity(path: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(task names, mean ``[T, T]`` affinity, the run directories it came from) of a run directory or a compare
    directory (its all-task cells that logged affinity)."""
    from recmtl.training.affinity import mean_affinity
    from recmtl.training.compare import GROUPED, SINGLE, read_plan
    if not path.is_dir():
        raise DataError(f"{path} is not a run directory or a compare directory (it does not exist or is a file)")
    plan = read_plan(path)
    if plan is None:
        runs = [path]
    else:
        runs = [path / "runs" / c["name"] for c in plan["cells"] if c["variant"] not in (SINGLE, GROUPED)]
    found = []
    for run in runs:
        records, _ = RunDir(run).read_affinity_log()
        names, matrix = mean_affinity(records)
        if names:
            found.append((names, matrix, str(run)))
    if not found:
        where = "its multi-task cells have" if plan is not None else "it has"
        raise DataError(f"{path}: {where} no affinity.jsonl; train with train.affinity_every N (e.g. --set "
                        "train.affinity_every=20) to measure the task affinity")
    names = found[0][0]
    mats = [m for n, m, _ in found if n == names]
    return names, np.nanmean(np.stack(mats), axis=0), [r for n, _, r in found if n == names]


def partition_score(affinity: np.ndarray, groups: list[list[int]]) -> float:
    """The sum over tasks of the mean affinity onto the task from the other members of its group."""
    total = 0.0
    for g in groups:
        if len(g) < 2:
            continue
        for t in g:
            vals = [affinity[i, t] for i in g if i != t and math.isfinite(affinity[i, t])]
            total += float(np.mean(vals)) if vals else 0.0
    return total


def _partitions(n: int, k: int) -> Iterator[list[list[int]]]:
    """Every partition of ``range(n)`` into exactly ``k`` non-empty groups (restricted growth strings)."""
    def grow(i: int, groups: list[list[int]]) -> Iterator[list[list[int]]]:
        if n - i < k - len(groups):
            return
        if i == n:
            if len(groups) == k:
                yield [list(g) for g in groups]
            return
        for g in groups:
            g.append(i)
            yield from grow(i + 1, groups)
            g.pop()
        if len(groups) < k:
            groups.append([i])
            yield from grow(i + 1, groups)
            groups.pop()
    yield from grow(0, [])


def best_partition(affinity: np.ndarray, k: int) -> tuple[list[list[int]], float, str]:
    """(groups of task indices, score, method): exhaustive up to ``EXHAUSTIVE_MAX`` tasks, greedy beyond."""
    n = affinity.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"--groups {k}: there are {n} tasks; choose between 1 and {n}")
    if n <= EXHAUSTIVE_MAX:
        best, score = None, -math.inf
        for p in _partitions(n, k):
            s = partition_score(affinity, p)
            if s > score + 1e-15:
                best, score = p, s
        return best, score, "exhaustive"
    groups = [[i] for i in range(n)]
    while len(groups) > k:
        options = []
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                merged = [g for i, g in enumerate(groups) if i not in (a, b)] + [sorted(groups[a] + groups[b])]
                options.append((partition_score(affinity, merged), merged))
        groups = max(options, key=lambda o: o[0])[1]
    return groups, partition_score(affinity, groups), "greedy"


def suggest(path: Path, k: int) -> dict[str, Any]:
    """The suggested grouping of the run or compare directory ``path`` into ``k`` groups."""
    names, matrix, runs = load_affinity(path)
    if not 1 <= k <= len(names):
        raise ConfigError(f"--groups {k} is more than the {len(names)} tasks ({', '.join(names)})"
                          if k > len(names) else f"--groups must be at least 1, got {k}")
    groups, score, method = best_partition(matrix, k)
    named = sorted(([names[i] for i in sorted(g)] for g in groups), key=lambda g: names.index(g[0]))
    everyone = partition_score(matrix, [list(range(len(names)))])
    return {"tasks": names, "affinity": matrix.tolist(), "groups": named, "score": score, "method": method,
            "all_in_one_score": everyone, "from": runs}


def format_suggestion(s: dict[str, Any]) -> str:
    names, matrix = s["tasks"], np.asarray(s["affinity"])
    top = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 0.0
    scale = 10.0 ** math.floor(math.log10(top)) if top > 0 else 1.0
    width = max(8, *map(len, names))
    lines = [f"mean lookahead affinity A[i -> j] (x {scale:g}; row i steps, column j's loss changes):",
             " " * width + "  " + "  ".join(n.rjust(width) for n in names)]
    for i, a in enumerate(names):
        lines.append(a.ljust(width) + "  " + "  ".join(f"{matrix[i, j] / scale:{width}.3f}" for j in range(len(names))))
    lines.append("")
    lines.append(f"suggested {len(s['groups'])} group(s) ({s['method']}): "
                 + "  ".join("{" + ", ".join(g) + "}" for g in s["groups"])
                 + f"   score {s['score']:.4g} (all tasks in one group: {s['all_in_one_score']:.4g})")
    return "\n".join(lines)


def config_of(path: Path, plugins: list[str]) -> tuple[Any, bool]:
    """The config of a run directory or compare directory, and whether ``path`` is a compare directory."""
    from recmtl.config import parse_config, read_raw
    from recmtl.rundir import CONFIG, require_trusted_plugins
    from recmtl.training.compare import read_plan
    plan = read_plan(path)
    if plan is not None:
        raw = dict(plan.get("full") or plan["config"])
        raw["seed"] = min(c["seed"] for c in plan["cells"])
        cfg = parse_config(raw, path, str(path / "plan.json"))
    else:
        raw = read_raw(RunDir(path).require(CONFIG))
        cfg = parse_config(raw, path, str(path / CONFIG))
    require_trusted_plugins(path, cfg.plugin_modules(), plugins)
    return cfg, plan is not None


def grouped_vs_all_in_one(result: dict[str, Any], all_in_one: str, partition: list[list[str]]) -> dict[str, Any]:
    """Per task, the grouped models' primary metric minus the all-in-one model's, paired by seed."""
    from recmtl.training.compare import _stats, grouped_variant
    out = {}
    grouped = result["variants"].get(grouped_variant(partition), {}).get("tasks", {})
    whole = result["variants"].get(all_in_one, {}).get("tasks", {})
    for t, te in grouped.items():
        pm = result["primary"].get(t)
        a = te["metrics"].get(pm, {}).get("values")
        b = (whole.get(t) or {}).get("metrics", {}).get(pm, {}).get("values")
        if not a or not b or len(a) != len(b):
            continue
        d = _stats([x - y for x, y in zip(a, b)])
        higher = result["higher_is_better"].get(t, {}).get(pm, False)
        ci = d["ci95"]
        worse = None if ci is None else (ci[1] < 0 if higher else ci[0] > 0)
        out[t] = {"metric": pm, **d, "grouped_worse": worse}
    return out
