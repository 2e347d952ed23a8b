"""Cross-stitch networks: one column per task, mixed after every layer by a learned task-relation matrix.

Misra, Shrivastava, Gupta and Hebert, "Cross-stitch Networks for Multi-task Learning", CVPR 2016. Each
task has its own MLP column (``units``); after each layer a cross-stitch unit replaces task ``t``'s
activations with ``sum_s alpha[t, s] h_s``, where ``alpha`` (``T x T``, one per layer) is learned. It
starts as the paper recommends, mostly task-specific: ``init_self`` on the diagonal and the rest
shared evenly off it (each row sums to 1). ``diagnostics()`` reports every unit's matrix under
``matrices`` (rows: the task receiving, columns: the task giving).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from recmtl import Tower, hookimpl
from recmtl.layers import Experts, check_units, mlp


class CrossStitch(Tower):
    def __init__(self, input_dim: int, task_names: list[str], units: list[int] = (128, 64),
                 task_units: list[int] = (), init_self: float = 0.9, dropout: float = 0.0) -> None:
        super().__init__(input_dim, task_names)
        units = check_units("units", units)
        task_units = check_units("task_units", task_units)
        if not units:
            raise ValueError("units needs at least one layer")
        if not 0 <= init_self <= 1:
            raise ValueError(f"init_self must be in [0, 1], got {init_self}")
        n = len(task_names)
        # one "expert" per task column, one layer at a time so the units can mix between layers
        widths = [input_dim] + units
        self.columns = nn.ModuleList(Experts(w_in, n, [w_out], dropout) for w_in, w_out in zip(widths[:-1], widths[1:]))
        off = (1 - init_self) / (n - 1) if n > 1 else 0.0
        init = torch.full((n, n), off) + torch.eye(n) * (init_self - off)
        self.alphas = nn.ParameterList(nn.Parameter(init.clone()) for _ in units)
        self.towers = nn.ModuleDict({t: mlp(units[-1], task_units, dropout) for t in task_names})
        self._out = task_units[-1] if task_units else units[-1]

    @property
    def output_dims(self) -> dict[str, int]:
        return {t: self._out for t in self.task_names}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h: torch.Tensor = x
        for layer, alpha in zip(self.columns, self.alphas):
            h = layer(h)  # [T, B, D]
            h = torch.einsum("ts,sbd->tbd", alpha, h)
        return {t: self.towers[t](h[i]) for i, t in enumerate(self.task_names)}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.alphas)

    def diagnostics(self) -> dict[str, Any]:
        return {"matrices": {f"cross_stitch_{i + 1}": {"rows": list(self.task_names), "cols": list(self.task_names),
                                                       "values": [[round(v, 4) for v in row] for row in a.tolist()]}
                             for i, a in enumerate(self.alphas)}}


@hookimpl
def recmtl_register_towers() -> dict[str, type[Tower]]:
    return {"cross_stitch": CrossStitch}
