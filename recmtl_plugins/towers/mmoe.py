"""Multi-gate Mixture-of-Experts (MMoE).

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts",
KDD 2018. ``num_experts`` expert MLPs see the same input; each task has its own softmax gate over the
experts and its own tower on the gated mixture.

The first layer of all experts is one matrix product (the input is shared), later layers are one
batched product over experts; every expert has its own random initialisation, so experts do not start
identical (no collapse by construction, and ``Experts`` refuses identical ones). ``diagnostics()`` reports
each task's mean gate weight per expert, the gate entropy and the expert utilisation (share of rows whose
top expert it is), over the evaluation rows seen since the last call.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from recmtl import Tower, hookimpl
from recmtl.layers import Experts, GateStats, check_units, fp32, mix, mlp

__all__ = ["Experts", "MMoE"]


class MMoE(Tower):
    def __init__(self, input_dim: int, task_names: list[str], num_experts: int = 4,
                 expert_units: list[int] = (256, 128), task_units: list[int] = (64,),
                 dropout: float = 0.0) -> None:
        super().__init__(input_dim, task_names)
        if num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {num_experts}")
        expert_units = check_units("expert_units", expert_units)
        task_units = check_units("task_units", task_units)
        if not expert_units:
            raise ValueError("expert_units needs at least one layer")
        self.num_experts = num_experts
        self.experts = Experts(input_dim, num_experts, expert_units, dropout)
        self.gates = nn.Linear(input_dim, num_experts * len(task_names))  # all task gates in one product
        width = expert_units[-1]
        self.towers = nn.ModuleDict({t: mlp(width, task_units, dropout) for t in task_names})
        self._out = task_units[-1] if task_units else width
        self.stats = GateStats({t: num_experts for t in task_names})

    @property
    def output_dims(self) -> dict[str, int]:
        return {t: self._out for t in self.task_names}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        experts = self.experts(x)  # [E, B, D]
        gates = torch.softmax(fp32(self.gates(x)).view(x.shape[0], len(self.task_names), self.num_experts), dim=-1)
        mixed = mix(gates, experts)  # [T, B, D]
        if GateStats.active(self):
            for i, t in enumerate(self.task_names):
                self.stats.update(t, gates[:, i])
        return {t: self.towers[t](mixed[i]) for i, t in enumerate(self.task_names)}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    def diagnostics(self) -> dict[str, Any]:
        return self.stats.diagnostics()


@hookimpl
def recmtl_register_towers() -> dict[str, type[Tower]]:
    return {"mmoe": MMoE}
