"""The timing loop shared by the step-cost benchmarks (``bench_tower_step.py``, ``bench_interaction_step.py``).

Each round runs every step once in a shuffled order, so load changes on a shared machine hit every variant
alike; the median per variant is reported against a baseline variant.
"""
from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable


def interleaved_times(steps: dict, rounds: int, clock: Callable[[], float] = time.perf_counter) -> dict[object, list[float]]:
    """Seconds (by ``clock``) of each step in each of ``rounds`` rounds, every step once per round in a shuffled
    order."""
    times: dict = {n: [] for n in steps}
    for _ in range(rounds):
        order = list(steps)
        random.shuffle(order)
        for n in order:
            t0 = clock()
            steps[n]()
            times[n].append(clock() - t0)
    return times


def interleaved_medians(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds of each step over ``rounds`` rounds, every step once per round in a shuffled order."""
    return {n: statistics.median(t) for n, t in interleaved_times(steps, rounds).items()}


def step_table(medians: dict[str, float], parameters: dict[str, int], base: str, label: str, vs: str,
               digits: int = 2) -> str:
    """Markdown table: ``label`` | parameters | step (ms, median) | ``vs`` (ratio to ``base``'s median)."""
    lines = [f"| {label} | parameters | step (ms, median) | {vs} |", "|---|---|---|---|"]
    for n, med in medians.items():
        lines.append(f"| {n} | {parameters[n]:,} | {1000 * med:.{digits}f} | {med / medians[base]:.2f}x |")
    return "\n".join(lines)
