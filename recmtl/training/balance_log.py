"""The trainer's balance log: every ``train.log_every`` steps, one JSON line in ``RUN_DIR/balance.jsonl``
with the weights the balancer applied, each task's gradient norm on the shared parameters and the cosine
similarity of every task pair (negative = the tasks pull the shared parameters apart)::

    {"epoch": 1, "step": 200, "weights": {"click": 1.0, ...}, "grad_norms": {"click": 0.41, ...},
     "cosine": {"click/conversion": 0.73}}

The gradients are taken before the balancer's backward pass (the graph is kept for it), on the raw,
unweighted task losses. The file is a log: appended and flushed line by line, and ``--resume`` goes on
appending to it with the step count saved in the checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recmtl.gradients import conflict_stats, task_gradients


class BalanceLog:
    """Counts training steps; on every ``every``-th (0 = never) records conflict statistics."""

    def __init__(self, path: str | Path, every: int, task_names: list[str], step: int = 0) -> None:
        self.path = Path(path)
        self.every = int(every)
        self.task_names = list(task_names)
        self.step = step
        self._pending: dict[str, Any] | None = None

    def before_backward(self, losses: dict[str, torch.Tensor], shared: list[nn.Parameter]) -> None:
        """Call once per step with the losses, before the balancer's ``backward``."""
        self.step += 1
        self._pending = None
        if self.every <= 0 or self.step % self.every:
            return
        shared = [p for p in shared if p.requires_grad]
        if not shared:
            self._pending = {"grad_norms": {}, "cosine": {}}
            return
        grads = task_gradients([losses[t] for t in self.task_names], shared, retain_graph=True)
        self._pending = conflict_stats(grads, self.task_names)

    def after_backward(self, epoch: int, applied: dict[str, float]) -> dict[str, Any] | None:
        """Call after the balancer's ``backward`` with the weights it returned; writes the line when due and
        returns it (None on other steps)."""
        if self._pending is None:
            return None
        line = {"epoch": epoch, "step": self.step,
                "weights": {t: round(float(w), 6) for t, w in applied.items()}, **self._pending}
        self._pending = None
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
        return line

