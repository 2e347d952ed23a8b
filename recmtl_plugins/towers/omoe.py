"""One-gate Mixture-of-Experts (OMoE).

The baseline of Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018 (section 4.2 and figure 1b): the MMoE architecture with a single softmax
gate shared by every task, so all tasks see the same mixture of experts, followed by a tower per task.
Experts are batched and independently initialised (``_moe.Experts``); ``diagnostics()`` reports the one
gate as ``shared``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from recmtl import Tower, hookimpl
from recmtl.layers import Experts, GateStats, check_units, fp32, mix, mlp


class OMoE(Tower):
    def __init__(self, input_dim: int, task_names: list[str], num_experts: int = 4,
                 expert_units: list[int] = (256, 128), task_units: list[int] = (64,),
                 dropout: float = 0.0) -> None:
        super().__init__(input_dim, task_names)
        expert_units = check_units("expert_units", expert_units)
        task_units = check_units("task_units", task_units)
        self.experts = Experts(input_dim, num_experts, expert_units, dropout)
        self.gate = nn.Linear(input_dim, num_experts)
        width = expert_units[-1]
        self.towers = nn.ModuleDict({t: mlp(width, task_units, dropout) for t in task_names})
        self._out = task_units[-1] if task_units else width
        self.stats = GateStats({"shared": num_experts})

    @property
    def output_dims(self) -> dict[str, int]:
        return {t: self._out for t in self.task_names}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        gate = torch.softmax(fp32(self.gate(x)), dim=-1)  # [B, E]; fp32 under bf16 autocast
        mixed = mix(gate, self.experts(x))
        if GateStats.active(self):
            self.stats.update("shared", gate)
        return {t: self.towers[t](mixed) for t in self.task_names}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters()) + list(self.gate.parameters())

    def diagnostics(self) -> dict[str, Any]:
        return self.stats.diagnostics()


@hookimpl
def recmtl_register_towers() -> dict[str, type[Tower]]:
    return {"omoe": OMoE}
