"""Lookahead inter-task affinity (TAG: Fifty et al., "Efficiently Identifying Task Groupings for Multi-Task
Learning", NeurIPS 2021). Every ``train.affinity_every`` steps (0 = off), on the step's batch: for each task i a
plain SGD step of size ``optimizer.lr`` along task i's gradient on the shared parameters, ``θ' = θ - lr ∇L_i``, and
each task j's loss after it::

    affinity[i][j] = 1 - L_j(θ'_i) / L_j(θ)         (> 0: a step for task i lowers task j's loss)

``L_j(θ)`` and every ``L_j(θ'_i)`` are computed in the same forward mode with the same random state (the same
dropout masks), without gradients; the parameters, buffers (batch-norm statistics) and the random generators are
restored afterwards, so training goes on exactly as without the measurement. One JSON line per measured step in
``RUN_DIR/affinity.jsonl``::

    {"epoch": 1, "step": 50, "lr": 0.001, "affinity": {"click": {"click": 0.012, "conversion": 0.004}, ...}}

Cost per measured step: T gradients through the shared part (``autograd.grad``, the graph kept) and T + 1
forward passes; nothing on the other steps.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class AffinityLog:
    """Counts nothing itself: ``measure`` is called every step with the trainer's global step."""

    def __init__(self, path: str | Path, every: int, task_names: list[str], lr: float) -> None:
        self.path = Path(path)
        self.every = int(every)
        self.task_names = list(task_names)
        self.lr = float(lr)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0 and len(self.task_names) > 1

    def measure(self, step: int, epoch: int, model: nn.Module, inputs: Any,
                losses: dict[str, torch.Tensor], loss_fn: Callable[[Any], dict[str, torch.Tensor]],
                shared: list[nn.Parameter], autocast: Callable[[], AbstractContextManager] = nullcontext) -> None:
        """When ``step`` is due: the ``[T x T]`` matrix for this batch, appended to the log. ``losses`` are the
        step's task losses (their graph is kept); ``loss_fn(inputs)`` recomputes the task losses."""
        if not self.due(step):
            return
        matrix = lookahead_affinity(model, inputs, losses, loss_fn, shared, self.task_names, self.lr, autocast)
        line = {"epoch": epoch, "step": step, "lr": self.lr,
                "affinity": {a: {b: round(float(matrix[i, j]), 7) for j, b in enumerate(self.task_names)}
                             for i, a in enumerate(self.task_names)}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()


def lookahead_affinity(model: nn.Module, inputs: Any, losses: dict[str, torch.Tensor],
                       loss_fn: Callable[[Any], dict[str, torch.Tensor]], shared: list[nn.Parameter],
                       task_names: list[str], lr: float,
                       autocast: Callable[[], AbstractContextManager] = nullcontext) -> np.ndarray:
    """``[T, T]``: row i = the relative loss decrease of every task after an SGD step along task i's gradient on
    ``shared`` (see the module docstring). Leaves parameters, buffers and random state as they were."""
    params = [p for p in shared if p.requires_grad]
    n = len(task_names)
    out = np.full((n, n), np.nan)
    if not params:
        return out
    grads = []
    for t in task_names:
        g = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
        grads.append([None if x is None else x.detach() for x in g])
    saved = [p.detach().clone() for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    device = params[0].device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        cpu_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state(device) if devices else None

        def task_losses() -> np.ndarray:
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, device)
            with autocast():
                now = loss_fn(inputs)
            for b, v in buffers:
                b.data.copy_(v)
            return np.array([float(now[t].detach().float()) for t in task_names])

        try:
            base = task_losses()
            for i in range(n):
                for p, g in zip(params, grads[i]):
                    if g is not None:
                        p.data.add_(g.to(p.dtype), alpha=-lr)  # .data: the kept graph must not see it
                after = task_losses()
                for p, s in zip(params, saved):
                    p.data.copy_(s)
                with np.errstate(divide="ignore", invalid="ignore"):
                    out[i] = np.where(base > 0, 1.0 - after / base, np.nan)
        finally:
            for p, s in zip(params, saved):
                p.data.copy_(s)
            for b, v in buffers:
                b.data.copy_(v)
    return out


def mean_affinity(records: list[dict[str, Any]], last_fraction: float = 1.0) -> tuple[list[str], np.ndarray]:
    """The task names and the mean ``[T, T]`` matrix over the records (the last ``last_fraction`` of them);
    NaN entries are left out of the mean."""
    recs = [r for r in records if isinstance(r.get("affinity"), dict)]
    if not recs:
        return [], np.zeros((0, 0))
    recs = recs[int(len(recs) * (1 - last_fraction)):] or recs[-1:]
    names = list(recs[0]["affinity"])
    stack = np.array([[[float((r["affinity"].get(a) or {}).get(b, np.nan)) for b in names] for a in names]
                      for r in recs])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN entry stays NaN
        return names, np.nanmean(stack, axis=0)
