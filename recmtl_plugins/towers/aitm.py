"""AITM: Adaptive Information Transfer Multi-task, along a conversion funnel.

Xi, Chen, Wang, Li, Zhang, Han, Qin and Li, "Modeling the Sequential Dependence among Audience Multi-step
Conversions with Multi-task Learning in Targeted Display Advertising", KDD 2021. Each task has its own
tower ``q_t``; the tasks form a funnel in config order (impression -> click -> conversion ...), and task
``t`` receives information from task ``t-1``: ``p_t = transfer_t(z_{t-1})`` (one ReLU layer). The
Adaptive Information Transfer module attends over ``{p_t, q_t}``:
``z_t = sum_u w_u h1(u)`` with ``w_u = softmax_u(<h2(u), h3(u)> / sqrt(d))``; the first task has ``z_1 = q_1``.

The behavioural-expectation calibrator (``calibrator_weight``, the paper's alpha; 0 = off) adds
``calibrator_weight x sum_t mean(max(score_t - score_{t-1}, 0))`` to the training loss through
``regularization()``: a later funnel step should not be more likely than the one before it (with an ESMM
head that holds by construction). ``diagnostics()`` reports, per receiving task, the mean attention on
``[transferred, own]`` as ``gate_weights``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from recmtl import Tower, hookimpl
from recmtl.layers import Experts, GateStats, check_units, fp32


class AITM(Tower):
    def __init__(self, input_dim: int, task_names: list[str], units: list[int] = (128, 64),
                 calibrator_weight: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__(input_dim, task_names)
        units = check_units("units", units)
        if not units:
            raise ValueError("units needs at least one layer")
        if calibrator_weight < 0:
            raise ValueError(f"calibrator_weight must be non-negative, got {calibrator_weight}")
        self.calibrator_weight = float(calibrator_weight)
        d = units[-1]
        self.d = d
        self.towers = Experts(input_dim, len(task_names), units, dropout)  # q_t for every task, batched
        n_links = len(task_names) - 1
        self.transfer = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.ReLU()) for _ in range(n_links))
        self.h = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(n_links))  # h1, h2, h3 in one product
        self.stats = GateStats({t: 2 for t in task_names[1:]},
                               {t: [f"from {task_names[i]}", "own"] for i, t in enumerate(task_names[1:])})

    @property
    def output_dims(self) -> dict[str, int]:
        return {t: self.d for t in self.task_names}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        q = self.towers(x)  # [T, B, d]
        z = [q[0]]
        for i, t in enumerate(self.task_names[1:]):
            u = torch.stack([self.transfer[i](z[-1]), q[i + 1]], dim=1)  # [B, 2, d]: transferred, own
            h1, h2, h3 = self.h[i](u).chunk(3, dim=-1)
            w = torch.softmax((fp32(h2) * fp32(h3)).sum(-1) / math.sqrt(self.d), dim=-1)  # [B, 2]; fp32 under autocast
            if GateStats.active(self):
                self.stats.update(t, w)
            z.append((w.unsqueeze(-1) * h1).sum(1))
        return dict(zip(self.task_names, z))

    def regularization(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.calibrator_weight == 0 or not all(t in scores for t in self.task_names):
            return torch.zeros(())
        terms = [torch.relu(scores[b] - scores[a]).mean() for a, b in zip(self.task_names[:-1], self.task_names[1:])]
        return self.calibrator_weight * sum(terms)

    def shared_parameters(self) -> list[nn.Parameter]:
        # every task but the last passes information on: its tower, the links and attention serve two tasks
        return list(self.towers.parameters()) + list(self.transfer.parameters()) + list(self.h.parameters())

    def diagnostics(self) -> dict[str, Any]:
        return self.stats.diagnostics()


@hookimpl
def recmtl_register_towers() -> dict[str, type[Tower]]:
    return {"aitm": AITM}
