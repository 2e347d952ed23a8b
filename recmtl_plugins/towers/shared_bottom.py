"""Shared-bottom tower: hard parameter sharing.

Caruana, "Multitask Learning", Machine Learning 28, 1997. One bottom MLP shared by every task, then a
small MLP per task.
"""
from __future__ import annotations

import torch
from torch import nn

from recmtl import Tower, hookimpl
from recmtl.layers import check_units, mlp


class SharedBottom(Tower):
    def __init__(self, input_dim: int, task_names: list[str], bottom_units: list[int] = (256, 128),
                 task_units: list[int] = (64,), dropout: float = 0.0) -> None:
        super().__init__(input_dim, task_names)
        bottom_units = check_units("bottom_units", bottom_units)
        task_units = check_units("task_units", task_units)
        self.bottom = mlp(input_dim, bottom_units, dropout)
        width = bottom_units[-1] if bottom_units else input_dim
        self.towers = nn.ModuleDict({t: mlp(width, task_units, dropout) for t in task_names})
        self._out = task_units[-1] if task_units else width

    @property
    def output_dims(self) -> dict[str, int]:
        return {t: self._out for t in self.task_names}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.bottom(x)
        return {t: self.towers[t](shared) for t in self.task_names}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.bottom.parameters())


@hookimpl
def recmtl_register_towers() -> dict[str, type[Tower]]:
    return {"shared_bottom": SharedBottom}
