"""bf16 vs fp32 test AUC, paired by seed, from two ``quality/interactions.py --json`` files (issue 21).

Each file maps run names ``{tower}-{block}-s{seed}`` to per-task test AUCs (one precision per file, the same data
and seeds). Prints per tower/block and task: fp32 and bf16 mean ± std over the seeds, the paired difference
bf16 − fp32 (mean ± std), the per-seed differences, wins (bf16 higher) n/N and the largest |difference|, against
issue 21's bound (``--bound``, 0.002 AUC per task).

Usage: python benchmarks/quality/precision_pairs.py FP32.json BF16.json [--bound 0.002]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

TASKS = ("click", "conversion")


def paired(fp32: dict, bf16: dict) -> dict[str, dict[str, dict]]:
    """``{tower-block: {task: {"seeds", "fp32", "bf16", "delta"}}}`` over the seeds present in both files."""
    out: dict[str, dict[str, dict]] = {}
    for name in sorted(set(fp32) & set(bf16)):
        m = re.fullmatch(r"(.+)-s(\d+)", name)
        if m is None:
            continue
        for t in TASKS:
            cell = out.setdefault(m.group(1), {}).setdefault(t, {"seeds": [], "fp32": [], "bf16": [], "delta": []})
            cell["seeds"].append(int(m.group(2)))
            cell["fp32"].append(fp32[name][t])
            cell["bf16"].append(bf16[name][t])
            cell["delta"].append(bf16[name][t] - fp32[name][t])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fp32", type=Path)
    ap.add_argument("bf16", type=Path)
    ap.add_argument("--bound", type=float, default=0.002, help="issue 21's bound on |bf16 - fp32| per task")
    args = ap.parse_args(argv)
    cells = paired(json.loads(args.fp32.read_text()), json.loads(args.bf16.read_text()))
    if not cells:
        print("no run is in both files", file=sys.stderr)
        return 1
    print("| tower-block | task | seeds | fp32 test AUC | bf16 test AUC | bf16 − fp32, paired | per seed | wins | max |Δ| |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for name, tasks in cells.items():
        for t, c in tasks.items():
            d = c["delta"]
            worst = max(worst, max(abs(v) for v in d))
            print(f"| {name} | {t} | {','.join(map(str, c['seeds']))} "
                  f"| {statistics.mean(c['fp32']):.4f} ± {statistics.pstdev(c['fp32']):.4f} "
                  f"| {statistics.mean(c['bf16']):.4f} ± {statistics.pstdev(c['bf16']):.4f} "
                  f"| {statistics.mean(d):+.5f} ± {statistics.pstdev(d):.5f} | {' / '.join(f'{v:+.5f}' for v in d)} "
                  f"| {sum(v > 0 for v in d)}/{len(d)} | {max(abs(v) for v in d):.5f} |")
    print(f"\nlargest per-seed |bf16 - fp32|: {worst:.5f} ({'within' if worst <= args.bound else 'OUTSIDE'} "
          f"the bound {args.bound})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
