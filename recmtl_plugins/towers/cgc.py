"""Customized Gate Control (CGC): one extraction level of PLE.

Tang, Liu, Zhao and Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model
for Personalized Recommendations", RecSys 2020, section 4.2: task-specific experts per task and shared
experts; each task's gate mixes its own experts and the shared ones, then a tower per task.
"""
from __future__ import annotations

from recmtl import Tower, hookimpl
from recmtl_plugins.towers.ple import PLE


class CGC(PLE):
    def __init__(self, input_dim: int, task_names: list[str], num_task_experts: int = 1,
                 num_shared_experts: int = 2, expert_units: list[int] = (128, 64), task_units: list[int] = (64,),
                 dropout: float = 0.0) -> None:
        super().__init__(input_dim, task_names, num_levels=1, num_task_experts=num_task_experts,
                         num_shared_experts=num_shared_experts, expert_units=expert_units,
                         task_units=task_units, dropout=dropout)


@hookimpl
def recmtl_register_towers() -> dict[str, type[Tower]]:
    return {"cgc": CGC}
