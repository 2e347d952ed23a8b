"""How many CPU threads training uses when ``train.threads`` is not set, and how they wait.

torch's default (one thread per core, OpenMP threads that spin while they wait) collapses when another
process keeps a core busy: a parallel region waits for a thread that is not running while the other spins
on the CPU that thread needs (benchmarks/RESULTS.md, "Training threads on a shared CPU"). So, without
``train.threads``:

- **OpenMP threads sleep while they wait** (``OMP_WAIT_POLICY=PASSIVE``, set before torch starts its thread
  pool unless ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is already set): beside other work they give the
  CPU back instead of burning it;
- **one thread per CPU this process may use**: its CPU affinity (``os.sched_getaffinity``: ``taskset``, a
  container's cpuset) and the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
  ``cpu.cfs_period_us``, the smallest along the cgroup's path; a quota of 2.5 CPUs allows 2 threads), shared
  evenly by the ranks ``torchrun`` starts on one machine, at most torch's own default (which follows
  ``OMP_NUM_THREADS``).

Then, in one CPU process, :class:`ThreadTuner` moves the count to what measures fastest (neither the most
threads nor fewer win everywhere). Counting the CPUs other processes keep busy and subtracting them was
tried too, and was slower beside a CPU-bound neighbour (RESULTS.md). Nothing here imports torch: the
training loop applies the count with ``torch.set_num_threads``.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path


def set_wait_policy() -> str | None:
    """Let OpenMP threads sleep while they wait (``OMP_WAIT_POLICY=PASSIVE``) unless the user chose a policy
    (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set) or torch is already imported (its pool has read the
    environment then). Returns the policy in effect, None when OpenMP's default applies."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ or "torch" in sys.modules:
        return os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"


def affinity_cpus() -> set[int]:
    """The CPUs this process may run on (all of ``os.cpu_count()`` where affinity is unknown)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def _ancestors(path: str) -> list[str]:
    """``/a/b`` -> ``["a/b", "a", ""]``: a cgroup and its parents, relative to the hierarchy's root."""
    parts = [p for p in path.strip().split("/") if p]
    return ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_cpu_limit(root: Path = Path("/")) -> float | None:
    """The CPUs the cgroup quota of this process allows (quota / period, the smallest along its cgroup's
    path, cgroup v2 or v1); None without a quota or where cgroups cannot be read."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2: one unified hierarchy
            for rel in _ancestors(path):
                text = _read(root / "sys/fs/cgroup" / rel / "cpu.max")
                if text:
                    quota, _, period = text.partition(" ")
                    if quota != "max" and period:
                        limits.append(int(quota) / int(period))
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's hierarchy
            for mount in ("sys/fs/cgroup/cpu,cpuacct", "sys/fs/cgroup/cpu"):
                for rel in _ancestors(path):
                    quota, period = (_read(root / mount / rel / f"cpu.cfs_{k}_us") for k in ("quota", "period"))
                    if quota and period and int(quota) > 0:
                        limits.append(int(quota) / int(period))
    return min(limits) if limits else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


@dataclass
class Cpus:
    """The CPUs this process may use: ``usable`` = min(affinity, floor(quota)), at least 1."""

    affinity: int
    quota: float | None

    @property
    def usable(self) -> int:
        n = self.affinity if self.quota is None else min(self.affinity, int(self.quota + 1e-9))
        return max(1, n)


def available_cpus(root: Path = Path("/")) -> Cpus:
    return Cpus(len(affinity_cpus()), cgroup_cpu_limit(root))


def auto_threads(ceiling: int, local_world: int = 1, cpus: Cpus | None = None) -> int:
    """The thread count for ``train.threads: null``: the usable CPUs shared by ``local_world`` ranks on one
    machine, at most ``ceiling`` (torch's default), at least 1."""
    cpus = cpus or available_cpus()
    return max(1, min(ceiling, cpus.usable // max(1, local_world)))


class ThreadTuner:
    """Chooses the thread count by the training speed it measures, for ``train.threads: null``.

    Neither one thread per CPU nor fewer wins everywhere: beside a CPU-bound neighbour two sleeping threads on
    2 cores were faster than one, beside other bursty work one was (RESULTS.md). So the loop reports every
    step's rows and compute seconds (forward, backward, optimiser: the part the thread count changes, data
    loading left out) and the tuner probes: the current count for ``probe_s`` seconds of steps, a neighbouring
    count on the ladder ``high, high // 2, ..., 1`` for as long, the current again (A-B-A, so that a drift
    of the load in between cancels out). The neighbour is kept when its rows per second beat the mean of the
    two A windows by ``margin``; the chosen count then runs ``hold_s`` seconds before the next probe (twice as
    long after each probe that kept the count, up to ``max_hold_s``), which tries the other neighbour where
    there are two. The first step after a change is not counted (it pays
    for the change). :meth:`pause` (end of an epoch) drops the window under way."""

    def __init__(self, high: int, probe_s: float = 3.0, hold_s: float = 30.0, max_hold_s: float = 240.0,
                 margin: float = 0.05) -> None:
        self.ladder = sorted({max(1, high >> k) for k in range(high.bit_length())}, reverse=True)
        self.current = self.ladder[0]
        self.probe_s, self.hold_s, self.max_hold_s, self.margin = probe_s, hold_s, max_hold_s, margin
        self.hold = hold_s
        self.direction = 1  # +1: probe the next smaller count first
        self.phase = "a1"  # a1 -> b -> a2 -> hold -> a1 ...
        self.rates: dict[str, float] = {}
        self.switches = 0
        self._reset()

    @property
    def enabled(self) -> bool:
        return len(self.ladder) > 1

    def _reset(self) -> None:
        self.rows = 0
        self.seconds = 0.0
        self.skip = True  # the first step of a window is not counted

    def pause(self) -> None:
        """Forget the window under way (validation, checkpoints and the next epoch's first read are not steps)."""
        self._reset()

    def _neighbour(self) -> int:
        i = self.ladder.index(self.current)
        for d in (self.direction, -self.direction):
            if 0 <= i + d < len(self.ladder):
                self.direction = d
                return self.ladder[i + d]
        return self.current

    def step(self, rows: int, seconds: float) -> int | None:
        """Record one training step; returns the thread count to switch to now, or None."""
        if not self.enabled:
            return None
        if self.skip:
            self.skip = False
            return None
        self.rows += rows
        self.seconds += seconds
        window = self.hold if self.phase == "hold" else self.probe_s
        if self.seconds < window:
            return None
        rate = self.rows / self.seconds
        self._reset()
        if self.phase == "hold":
            self.phase = "a1"
            return None
        if self.phase == "a1":
            self.rates = {"a1": rate}
            self.phase, self.other = "b", self._neighbour()
            return self.other if self.other != self.current else None
        if self.phase == "b":
            self.rates["b"] = rate
            self.phase = "a2"
            return self.current
        # a2: decide
        base = (self.rates["a1"] + rate) / 2
        self.phase = "hold"
        if self.rates["b"] > base * (1 + self.margin):
            self.current = self.other
            self.switches += 1
            self.hold = self.hold_s
            return self.current  # and next time probe further the same way
        self.direction = -self.direction  # try the other neighbour next time
        self.hold = min(2 * self.hold, self.max_hold_s)
        return None
