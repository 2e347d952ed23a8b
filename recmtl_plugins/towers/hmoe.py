"""Hierarchical Mixture-of-Experts (HMoE), two levels, one gating tree per task.

Jordan and Jacobs, "Hierarchical Mixtures of Experts and the EM Algorithm", Neural Computation 6(2), 1994:
a gating network chooses among groups of experts and, inside each group, a second gating network
chooses among the group's experts; the output is ``sum_g pi_g(x) sum_e pi_{e|g}(x) expert_{g,e}(x)``.
Made multi-task the way MMoE does for the flat mixture (Ma et al. KDD 2018): the experts are shared and
every task has its own two-level gate (trained by back-propagation, not EM), then its own tower.

``diagnostics()``: ``gate_weights`` per task over all ``num_groups x experts_per_group`` experts (the
product of both levels, group-major), and ``group_weights`` per task (the top level alone).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from recmtl import Tower, hookimpl
from recmtl.layers import Experts, GateStats, check_units, fp32, mix, mlp


class HMoE(Tower):
    def __init__(self, input_dim: int, task_names: list[str], num_groups: int = 2, experts_per_group: int = 2,
                 expert_units: list[int] = (256, 128), task_units: list[int] = (64,), dropout: float = 0.0) -> None:
        super().__init__(input_dim, task_names)
        if num_groups < 1 or experts_per_group < 1:
            raise ValueError(f"num_groups and experts_per_group must be at least 1, got {num_groups}, {experts_per_group}")
        expert_units = check_units("expert_units", expert_units)
        task_units = check_units("task_units", task_units)
        self.g, self.k = num_groups, experts_per_group
        self.experts = Experts(input_dim, num_groups * experts_per_group, expert_units, dropout)
        n_tasks = len(task_names)
        # both levels of every task's gate in one product: T*G group logits, then T*G*K expert logits
        self.gates = nn.Linear(input_dim, n_tasks * num_groups * (1 + experts_per_group))
        width = expert_units[-1]
        self.towers = nn.ModuleDict({t: mlp(width, task_units, dropout) for t in task_names})
        self._out = task_units[-1] if task_units else width
        self.stats = GateStats({t: num_groups * experts_per_group for t in task_names},
                               {t: [f"group{g}/{e}" for g in range(num_groups) for e in range(experts_per_group)]
                                for t in task_names})
        self.group_stats = GateStats({t: num_groups for t in task_names})

    @property
    def output_dims(self) -> dict[str, int]:
        return {t: self._out for t in self.task_names}

    def gate_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, T, G*K] expert weights, [B, T, G] group weights)``."""
        b, n_tasks = x.shape[0], len(self.task_names)
        logits = fp32(self.gates(x))  # the softmaxes in fp32 under bf16 autocast
        split = n_tasks * self.g
        group = torch.softmax(logits[:, :split].view(b, n_tasks, self.g), dim=-1)
        inner = torch.softmax(logits[:, split:].view(b, n_tasks, self.g, self.k), dim=-1)
        return (group.unsqueeze(-1) * inner).flatten(2), group

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        weights, group = self.gate_weights(x)
        mixed = mix(weights, self.experts(x))
        if GateStats.active(self):
            for i, t in enumerate(self.task_names):
                self.stats.update(t, weights[:, i])
                self.group_stats.update(t, group[:, i])
        return {t: self.towers[t](mixed[i]) for i, t in enumerate(self.task_names)}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    def diagnostics(self) -> dict[str, Any]:
        out = self.stats.diagnostics()
        groups = self.group_stats.diagnostics()
        if groups:
            out["group_weights"] = groups["gate_weights"]
            out["group_entropy"] = groups["gate_entropy"]
            out["group_max_entropy"] = round(math.log(self.g), 4)
        return out


@hookimpl
def recmtl_register_towers() -> dict[str, type[Tower]]:
    return {"hmoe": HMoE}
