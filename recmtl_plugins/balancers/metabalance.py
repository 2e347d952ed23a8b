"""MetaBalance: adapting the gradient magnitudes of auxiliary tasks.

He, Feng, Liu, Hu, Jiang, Xie, Chen, Wei, Guo and Yin, "MetaBalance: Improving Multi-Task
Recommendations via Adapting Gradient Magnitudes of Auxiliary Tasks", WWW 2022. One task is the target
(``target_task``, the first task by default); the others are auxiliary. For every shared parameter tensor,
moving averages of the gradient norms ``m_t <- beta m_t + (1 - beta) ||g_t||`` are kept, and each
auxiliary gradient is rescaled towards the target's magnitude with the relax factor ``r``:
``g_aux <- r (m_target / m_aux) g_aux + (1 - r) g_aux``, so its norm becomes
``r ||g_target|| + (1 - r) ||g_aux||`` when the averages equal the current norms (the paper's strategy
that both enlarges and shrinks). The shared parameters get ``g_target + sum g_aux``.
``granularity: all`` treats the shared parameters as one vector instead of tensor by tensor.

A task whose shared gradient is all zero (a batch with no label for it) is left out of the step: its
averages are not updated (a zero would pull them down, and an auxiliary task that is often unlabelled
would then be scaled up past the target for good). So that tasks seen on different numbers of steps stay
comparable, each task's averages are divided by ``1 - beta ** n_t`` (``n_t``: the steps it was present),
a factor that is the same for every task, and cancels, when all are present on every step. With the
target left out the auxiliary gradients are scaled by the target's averages so far (left as they are
before the target has been seen).
"""
from __future__ import annotations

import torch

from recmtl import Balancer, hookimpl
from recmtl.gradients import GradientBalancer, present_tasks


def metabalance(grads: torch.Tensor, avg_norms: torch.Tensor, target: int, relax: float, beta: float,
                sizes: list[int], counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``grads [T, N]`` split into blocks of ``sizes``; ``avg_norms [T, blocks]`` and ``counts [T]`` (steps each
    task was present; none: every task on every step) are updated in place, for the tasks present only.
    Returns (``sum_t g'_t``, each task's norm ratio ``||g'_t|| / ||g_t||``, 0 for a task left out)."""
    present = present_tasks(grads).to(avg_norms.device)
    if counts is not None:
        counts += present.to(counts)
        debias = (1 - beta ** counts.to(avg_norms)).clamp_min(1e-12)  # > 0 where present or seen before
    out = torch.empty_like(grads)
    offset = 0
    for k, n in enumerate(sizes):
        block = grads[:, offset:offset + n]
        norms = block.norm(dim=1).to(avg_norms)
        avg_norms[:, k] = torch.where(present, beta * avg_norms[:, k] + (1 - beta) * norms, avg_norms[:, k])
        avg = avg_norms[:, k] if counts is None else avg_norms[:, k] / debias
        ratio = (avg[target] / (avg + 1e-12)).to(grads)
        out[:, offset:offset + n] = block * (relax * ratio + (1 - relax)).unsqueeze(1)
        offset += n
    if counts is not None and int(counts[target]) == 0:  # the target not seen yet: nothing to scale towards
        out = grads.clone()
    out[target] = grads[target]
    norms = grads.norm(dim=1)
    scale = out.norm(dim=1) / norms.clamp_min(1e-12)
    scale[norms == 0] = 0.0
    scale[target] = 1.0 if bool(present[target]) else 0.0
    return out.sum(0), scale


class MetaBalance(GradientBalancer):
    """Returns each task's gradient-norm ratio after rescaling (1.0 for the target task, 0 for a task left
    out). ``relax_factor``
    (paper default 0.7) and ``beta`` (0.9) as in the paper."""

    def __init__(self, task_names: list[str], weights: dict[str, float], target_task: str | None = None,
                 relax_factor: float = 0.7, beta: float = 0.9, granularity: str = "parameter") -> None:
        super().__init__(task_names, weights)
        target_task = target_task or self.task_names[0]
        if target_task not in self.task_names:
            raise ValueError(f"target_task '{target_task}' is not a task (tasks: {', '.join(self.task_names)})")
        if not 0 <= relax_factor <= 1:
            raise ValueError(f"relax_factor must be in [0, 1], got {relax_factor}")
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if granularity not in ("parameter", "all"):
            raise ValueError(f"granularity must be 'parameter' or 'all', got '{granularity}'")
        self.target = self.task_names.index(target_task)
        self.relax, self.beta, self.granularity = float(relax_factor), float(beta), granularity
        self.avg_norms: torch.Tensor | None = None
        self.counts = torch.zeros(len(self.task_names), dtype=torch.long)  # steps each task was present

    def get_extra_state(self) -> dict:
        return {"avg_norms": self.avg_norms, "counts": self.counts}

    def set_extra_state(self, state: dict) -> None:
        self.avg_norms = state["avg_norms"]
        # a checkpoint from before the counts: taken as long warmed up (no correction)
        self.counts = state.get("counts", torch.full((len(self.task_names),), 10**6, dtype=torch.long))

    def combine(self, grads, losses, sizes):
        blocks = list(sizes) if self.granularity == "parameter" else [sum(sizes)]
        if self.avg_norms is None or self.avg_norms.shape[1] != len(blocks):
            self.avg_norms = torch.zeros(grads.shape[0], len(blocks), dtype=torch.float64, device=grads.device)
            self.counts = torch.zeros(grads.shape[0], dtype=torch.long, device=grads.device)
        self.counts = self.counts.to(grads.device)
        return metabalance(grads, self.avg_norms, self.target, self.relax, self.beta, blocks, self.counts)


@hookimpl
def recmtl_register_balancers() -> dict[str, type[Balancer]]:
    return {"metabalance": MetaBalance}
