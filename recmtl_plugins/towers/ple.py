"""Progressive Layered Extraction (PLE).

Tang, Liu, Zhao and Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model
for Personalized Recommendations", RecSys 2020. Each extraction level has task-specific experts
(``num_task_experts`` per task) and shared experts (``num_shared_experts``). A task's gate mixes its own
experts and the shared ones; a shared gate mixes all experts and feeds the shared experts of the next
level (every level but the last). ``num_levels`` levels are stacked, then a tower per task.
One level is CGC, Customized Gate Control (the ``cgc`` tower).

Experts are batched and independently initialised (``_moe.Experts``). ``diagnostics()`` names gates
``level<l>/<task>`` and ``level<l>/shared`` (plain task names for one level), with ``expert_names``
saying which experts each gate mixes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from recmtl import Tower, hookimpl
from recmtl.layers import Experts, GateStats, check_units, fp32, mix, mlp


class PLE(Tower):
    def __init__(self, input_dim: int, task_names: list[str], num_levels: int = 2, num_task_experts: int = 1,
                 num_shared_experts: int = 2, expert_units: list[int] = (128, 64), task_units: list[int] = (64,),
                 dropout: float = 0.0) -> None:
        super().__init__(input_dim, task_names)
        if num_levels < 1:
            raise ValueError(f"num_levels must be at least 1, got {num_levels}")
        if num_task_experts < 1 or num_shared_experts < 0:
            raise ValueError("num_task_experts must be at least 1 and num_shared_experts at least 0")
        expert_units = check_units("expert_units", expert_units)
        task_units = check_units("task_units", task_units)
        if not expert_units:
            raise ValueError("expert_units needs at least one layer")
        self.num_levels, self.nt, self.ns = num_levels, num_task_experts, num_shared_experts
        n_tasks, width = len(task_names), expert_units[-1]
        self.task_experts = nn.ModuleList()
        self.shared_experts = nn.ModuleList()
        self.task_gates = nn.ModuleList()  # per level: one Linear per task
        self.shared_gates = nn.ModuleList()  # per level but the last
        sizes: dict[str, int] = {}
        names: dict[str, list[str]] = {}
        for level in range(num_levels):
            d_in = input_dim if level == 0 else width
            self.task_experts.append(Experts(d_in, n_tasks * num_task_experts, expert_units, dropout))
            if num_shared_experts:
                self.shared_experts.append(Experts(d_in, num_shared_experts, expert_units, dropout))
            self.task_gates.append(nn.ModuleList(nn.Linear(d_in, num_task_experts + num_shared_experts)
                                                 for _ in task_names))
            shared_names = [f"shared/{j}" for j in range(num_shared_experts)]
            for t in task_names:
                sizes[self._gate(level, t)] = num_task_experts + num_shared_experts
                names[self._gate(level, t)] = [f"{t}/{j}" for j in range(num_task_experts)] + shared_names
            if level < num_levels - 1 and num_shared_experts:
                self.shared_gates.append(nn.Linear(d_in, n_tasks * num_task_experts + num_shared_experts))
                sizes[self._gate(level, "shared")] = n_tasks * num_task_experts + num_shared_experts
                names[self._gate(level, "shared")] = [f"{t}/{j}" for t in task_names
                                                      for j in range(num_task_experts)] + shared_names
        self.towers = nn.ModuleDict({t: mlp(width, task_units, dropout) for t in task_names})
        self._out = task_units[-1] if task_units else width
        self.stats = GateStats(sizes, names)

    def _gate(self, level: int, who: str) -> str:
        return who if self.num_levels == 1 else f"level{level + 1}/{who}"

    @property
    def output_dims(self) -> dict[str, int]:
        return {t: self._out for t in self.task_names}

    def _mix(self, name: str, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        gate = torch.softmax(fp32(logits), dim=-1)  # [B, n]; fp32 under bf16 autocast
        if GateStats.active(self):
            self.stats.update(name, gate)
        return mix(gate, experts)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n_tasks, nt = len(self.task_names), self.nt
        task_in: list[torch.Tensor] = [x] * n_tasks
        shared_in = x
        for level in range(self.num_levels):
            if level == 0:
                task_out = self.task_experts[level](x)  # [T*nt, B, D]
            else:
                task_out = self.task_experts[level](torch.stack([h for h in task_in for _ in range(nt)]))
            shared_out = self.shared_experts[level](shared_in) if self.ns else task_out[:0]
            new_task_in = []
            for i, t in enumerate(self.task_names):
                experts = torch.cat([task_out[i * nt:(i + 1) * nt], shared_out])
                new_task_in.append(self._mix(self._gate(level, t), self.task_gates[level][i](task_in[i]), experts))
            if level < self.num_levels - 1 and self.ns:
                shared_in = self._mix(self._gate(level, "shared"), self.shared_gates[level](shared_in),
                                      torch.cat([task_out, shared_out]))
            task_in = new_task_in
        return {t: self.towers[t](task_in[i]) for i, t in enumerate(self.task_names)}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.shared_experts.parameters()) + list(self.shared_gates.parameters())

    def diagnostics(self) -> dict[str, Any]:
        return self.stats.diagnostics()


class CGC(PLE):
    """Customized Gate Control (CGC): one extraction level of PLE.

    Tang, Liu, Zhao and Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model
    for Personalized Recommendations", RecSys 2020, section 4.2: task-specific experts per task and shared
    experts; each task's gate mixes its own experts and the shared ones, then a tower per task."""

    def __init__(self, input_dim: int, task_names: list[str], num_task_experts: int = 1,
                 num_shared_experts: int = 2, expert_units: list[int] = (128, 64), task_units: list[int] = (64,),
                 dropout: float = 0.0) -> None:
        super().__init__(input_dim, task_names, num_levels=1, num_task_experts=num_task_experts,
                         num_shared_experts=num_shared_experts, expert_units=expert_units,
                         task_units=task_units, dropout=dropout)


@hookimpl
def recmtl_register_towers() -> dict[str, type[Tower]]:
    return {"ple": PLE, "cgc": CGC}
