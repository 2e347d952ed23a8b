"""Independent per-task towers: no parameter sharing between tasks beyond the input embeddings."""
from __future__ import annotations

import torch
from torch import nn

from recmtl import Tower, hookimpl
from recmtl.layers import check_units, mlp


class IndependentTowers(Tower):
    """One MLP per task on the shared input (the single-task baseline for negative transfer)."""

    def __init__(self, input_dim: int, task_names: list[str], units: list[int] = (128, 64), dropout: float = 0.0) -> None:
        super().__init__(input_dim, task_names)
        units = check_units("units", units)
        if not units:
            raise ValueError("units needs at least one layer")
        self.towers = nn.ModuleDict({t: mlp(input_dim, units, dropout) for t in task_names})
        self._out = units[-1]

    @property
    def output_dims(self) -> dict[str, int]:
        return {t: self._out for t in self.task_names}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: self.towers[t](x) for t in self.task_names}

    def shared_parameters(self) -> list[nn.Parameter]:
        return []  # nothing is shared


@hookimpl
def recmtl_register_towers():
    return {"independent": IndependentTowers}
