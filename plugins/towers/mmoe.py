"""Multi-gate Mixture-of-Experts (MMoE).

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts",
KDD 2018. ``num_experts`` expert MLPs see the same input; each task has its own softmax gate over the
experts and its own tower on the gated mixture.

The first layer of all experts is one matrix product (the input is shared), later layers are one
batched product over experts; every expert has its own random initialisation, so experts do not start
identical (no collapse by construction). ``diagnostics()`` reports each task's mean gate weight per
expert and the gate entropy, averaged over the rows seen since the last call.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from recmtl import Tower, hookimpl
from recmtl.layers import check_units, mlp


class Experts(nn.Module):
    """``num_experts`` MLPs over the same input, evaluated as batched matrix products."""

    def __init__(self, input_dim: int, num_experts: int, units: list[int], dropout: float) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.units = units
        widths = [input_dim] + units
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            bound = 1 / math.sqrt(w_in)
            shape = (w_in, num_experts * w_out) if i == 0 else (num_experts, w_in, w_out)
            self.weights.append(nn.Parameter(torch.empty(shape).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_experts, 1, w_out).uniform_(-bound, bound)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, input_dim] -> [num_experts, batch, units[-1]]``."""
        e, b = self.num_experts, x.shape[0]
        h = (x @ self.weights[0]).view(b, e, -1).transpose(0, 1) + self.biases[0]
        h = self.dropout(torch.relu(h))
        for w, bias in zip(list(self.weights)[1:], list(self.biases)[1:]):
            h = self.dropout(torch.relu(torch.baddbmm(bias, h, w)))
        return h


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
        self.register_buffer("_gate_sum", torch.zeros(len(task_names), num_experts), persistent=False)
        self.register_buffer("_entropy_sum", torch.zeros(len(task_names)), persistent=False)
        self._rows = 0

    @property
    def output_dims(self) -> dict[str, int]:
        return {t: self._out for t in self.task_names}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        experts = self.experts(x)  # [E, B, D]
        gates = torch.softmax(self.gates(x).view(x.shape[0], len(self.task_names), self.num_experts), dim=-1)
        mixed = torch.einsum("bte,ebd->tbd", gates, experts)  # [T, B, D]
        if not self.training:
            with torch.no_grad():
                self._gate_sum += gates.sum(0)
                self._entropy_sum += -(gates * torch.log(gates.clamp_min(1e-12))).sum(-1).sum(0)
                self._rows += x.shape[0]
        return {t: self.towers[t](mixed[i]) for i, t in enumerate(self.task_names)}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    def diagnostics(self) -> dict[str, Any]:
        if self._rows == 0:
            return {}
        mean = (self._gate_sum / self._rows).tolist()
        entropy = (self._entropy_sum / self._rows).tolist()
        self._gate_sum.zero_()
        self._entropy_sum.zero_()
        self._rows = 0
        return {
            "gate_weights": {t: [round(w, 4) for w in mean[i]] for i, t in enumerate(self.task_names)},
            "gate_entropy": {t: round(entropy[i], 4) for i, t in enumerate(self.task_names)},
            "max_entropy": round(math.log(self.num_experts), 4),
        }


@hookimpl
def recmtl_register_towers() -> dict[str, type[Tower]]:
    return {"mmoe": MMoE}
