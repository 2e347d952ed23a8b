"""STEM: Shared and Task-specific EMbeddings, with the All-Forward gate.

Su, Pan, Wang, Xiao, Quan, Chen and Jiang, "STEM: Unleashing the Power of Embeddings for Multi-Task
Recommendation", AAAI 2024. Besides the shared embeddings (the model's encoders, ``x``), every task owns
embedding tables for the categorical features; task ``t``'s experts read its own embeddings (with the
dense features), the shared experts read ``x``. Task ``t``'s gate (reading its own embeddings and ``x``)
mixes *all* experts — the All-Forward network — but the other tasks' experts enter through a
stop-gradient, so task ``t``'s loss trains only the shared part and its own embeddings and experts.

This tower sets ``uses_inputs``: it is built with the feature infos and receives the preprocessed ids, so
it owns its embedding tables (``sparse=True`` by default: updated by the sparse optimiser, exported to
ONNX like the encoders' tables). ``diagnostics()`` reports each task's gate over
``[<task>/<j> for every task ..., shared/<j>]`` (see ``expert_names``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from recmtl import FeatureInfo, Tower, hookimpl
from recmtl.layers import Experts, GateStats, check_units, fp32, mix, mlp


class STEM(Tower):
    uses_inputs = True

    def __init__(self, input_dim: int, task_names: list[str], features: dict[str, list[FeatureInfo]],
                 embedding_dim: int = 8, num_task_experts: int = 1, num_shared_experts: int = 1,
                 expert_units: list[int] = (128, 64), task_units: list[int] = (64,), sparse: bool = True,
                 init_std: float = 0.05, dropout: float = 0.0) -> None:
        super().__init__(input_dim, task_names)
        cats = list(features.get("categorical", []))
        if not cats:
            raise ValueError("stem needs categorical features: its task-specific embeddings embed them")
        if embedding_dim < 1 or num_task_experts < 1 or num_shared_experts < 0:
            raise ValueError("embedding_dim and num_task_experts must be at least 1, num_shared_experts at least 0")
        expert_units = check_units("expert_units", expert_units)
        task_units = check_units("task_units", task_units)
        self.nt, self.ns = num_task_experts, num_shared_experts
        self.n_dense = len(features.get("dense", []))
        cards = [max(int(f.cardinality), 1) for f in cats]
        offsets = np.concatenate([[0], np.cumsum(cards)[:-1]]).astype(np.int64)
        self.register_buffer("offsets", torch.from_numpy(offsets))
        self.embeddings = nn.ModuleDict()  # one table per task, all categorical features fused (ids offset)
        for t in task_names:
            table = nn.Embedding(int(sum(cards)), embedding_dim, sparse=sparse)
            nn.init.normal_(table.weight, std=init_std)
            self.embeddings[t] = table
        task_in = len(cats) * embedding_dim + self.n_dense
        n_tasks = len(task_names)
        self.task_experts = Experts(task_in, n_tasks * num_task_experts, expert_units, dropout)
        self.shared_experts = Experts(input_dim, num_shared_experts, expert_units, dropout) if num_shared_experts else None
        self.gates = nn.ModuleDict({t: nn.Linear(task_in + input_dim, n_tasks * num_task_experts + num_shared_experts)
                                    for t in task_names})
        width = expert_units[-1]
        self.towers = nn.ModuleDict({t: mlp(width, task_units, dropout) for t in task_names})
        self._out = task_units[-1] if task_units else width
        names = [f"{t}/{j}" for t in task_names for j in range(num_task_experts)] + [f"shared/{j}" for j in range(num_shared_experts)]
        self.stats = GateStats({t: len(names) for t in task_names}, {t: names for t in task_names})

    @property
    def output_dims(self) -> dict[str, int]:
        return {t: self._out for t in self.task_names}

    def task_inputs(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per task: its own embeddings of the categorical ids, then the dense features."""
        ids = inputs["categorical"] + self.offsets
        dense = [inputs["dense"]] if self.n_dense else []
        return [torch.cat([self.embeddings[t](ids).flatten(1)] + dense, dim=1) for t in self.task_names]

    def forward(self, x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        nt = self.nt
        own = self.task_inputs(inputs)
        task_out = self.task_experts(torch.stack([h for h in own for _ in range(nt)]))  # [T*nt, B, D]
        shared_out = self.shared_experts(x) if self.shared_experts is not None else task_out[:0]
        out = {}
        for i, t in enumerate(self.task_names):
            # All-Forward: every task's experts, the others' behind a stop-gradient
            blocks = [task_out[j * nt:(j + 1) * nt] if j == i else task_out[j * nt:(j + 1) * nt].detach()
                      for j in range(len(self.task_names))]
            experts = torch.cat(blocks + [shared_out])
            gate = torch.softmax(fp32(self.gates[t](torch.cat([own[i], x], dim=1))), dim=-1)
            if GateStats.active(self):
                self.stats.update(t, gate)
            out[t] = self.towers[t](mix(gate, experts))
        return out

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.shared_experts.parameters()) if self.shared_experts is not None else []

    def diagnostics(self) -> dict[str, Any]:
        return self.stats.diagnostics()


@hookimpl
def recmtl_register_towers() -> dict[str, type[Tower]]:
    return {"stem": STEM}
