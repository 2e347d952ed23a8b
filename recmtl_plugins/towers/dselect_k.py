"""DSelect-k: differentiable sparse gates for a mixture of experts, one gate per task.

Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong and Chi, "DSelect-k: Differentiable
Selection in the Mixture of Experts with Applications to Multi-Task Learning", NeurIPS 2021 (the
per-example gate). A gate has ``k`` single-expert selectors. Selector ``i`` holds ``m = ceil(log2 n)``
numbers ``z_i(x)`` passed through the smooth-step function
``S(t) = 0 (t <= -gamma/2), 1 (t >= gamma/2), -2/gamma^3 t^3 + 3/(2 gamma) t + 1/2 otherwise``; the
probability that it picks expert ``l`` is the product over bits ``j`` of ``S(z_ij)`` where bit ``j`` of
``l`` is 1 and ``1 - S(z_ij)`` where it is 0 (a binary encoding of the expert index). The gate is
``sum_i softmax(alpha(x))_i r(z_i)``: once every ``S`` has reached 0 or 1 (the flat parts), each selector
is one-hot and the gate uses at most ``k`` experts, exactly ``k`` when the selectors pick different ones.

``entropy_reg`` (the paper's entropy regularisation, default off) adds ``entropy_reg x`` the mean entropy
of the selectors' distributions to the training loss, pushing them to binary states sooner. When ``n``
is not a power of two, the codes past ``n`` are dropped and the gate is renormalised over the ``n``
experts (our choice; the paper assumes a power of two). ``diagnostics()`` adds ``selected_experts``: per
task, the mean number of experts with a non-zero weight per row.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from recmtl import Tower, hookimpl
from recmtl.layers import Experts, GateStats, check_units, entropy, fp32, mix, mlp


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """The cubic smooth-step of the paper: 0 below -gamma/2, 1 above gamma/2, C1 in between."""
    cubic = -2 / gamma ** 3 * t ** 3 + 3 / (2 * gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


class DSelectK(Tower):
    def __init__(self, input_dim: int, task_names: list[str], num_experts: int = 4, k: int = 2,
                 gamma: float = 1.0, entropy_reg: float = 0.0, expert_units: list[int] = (256, 128),
                 task_units: list[int] = (64,), dropout: float = 0.0) -> None:
        super().__init__(input_dim, task_names)
        if num_experts < 2:
            raise ValueError(f"num_experts must be at least 2, got {num_experts}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be between 1 and num_experts={num_experts}, got {k}")
        if gamma <= 0 or entropy_reg < 0:
            raise ValueError("gamma must be positive and entropy_reg non-negative")
        expert_units = check_units("expert_units", expert_units)
        task_units = check_units("task_units", task_units)
        self.n, self.k, self.gamma, self.entropy_reg = num_experts, k, float(gamma), float(entropy_reg)
        self.m = max(1, math.ceil(math.log2(num_experts)))
        n_tasks = len(task_names)
        self.experts = Experts(input_dim, num_experts, expert_units, dropout)
        self.z = nn.Linear(input_dim, n_tasks * k * self.m)  # selector logits of every task
        self.alpha = nn.Linear(input_dim, n_tasks * k)  # selector weights of every task
        # start inside the smooth part of S (zero gradient in the flat parts), as the paper does
        nn.init.uniform_(self.z.weight, -gamma / 100, gamma / 100)
        nn.init.uniform_(self.z.bias, -gamma / 2, gamma / 2)
        codes = (torch.arange(2 ** self.m).unsqueeze(1) >> torch.arange(self.m)) & 1  # [2^m, m] bits
        self.register_buffer("codes", codes[:num_experts].float(), persistent=False)
        width = expert_units[-1]
        self.towers = nn.ModuleDict({t: mlp(width, task_units, dropout) for t in task_names})
        self._out = task_units[-1] if task_units else width
        self.stats = GateStats({t: num_experts for t in task_names})
        self._selected = torch.zeros(n_tasks)
        self._entropy = torch.zeros(())

    @property
    def output_dims(self) -> dict[str, int]:
        return {t: self._out for t in self.task_names}

    def selectors(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, k, n]``: each selector's distribution over the experts."""
        b, n_tasks = x.shape[0], len(self.task_names)
        s = smooth_step(fp32(self.z(x)).view(b, n_tasks, self.k, 1, self.m), self.gamma)  # fp32: a product of m
        r = torch.where(self.codes.bool(), s, 1 - s).prod(-1)  # [B, T, k, n]
        if self.n < 2 ** self.m:
            r = r / r.sum(-1, keepdim=True).clamp_min(1e-12)
        return r

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, n]``: the gate of every task (rows sum to 1)."""
        r = self.selectors(x)
        if self.training and self.entropy_reg > 0:
            self._entropy = entropy(r).mean()
        a = torch.softmax(fp32(self.alpha(x)).view(x.shape[0], len(self.task_names), self.k), dim=-1)
        return torch.einsum("btk,btkn->btn", a, r)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        gates = self.gate_weights(x)
        mixed = mix(gates, self.experts(x))
        if GateStats.active(self):
            for i, t in enumerate(self.task_names):
                self.stats.update(t, gates[:, i])
            self._selected = self._selected + (gates.detach() > 1e-6).sum(-1).sum(0).float().cpu()
        return {t: self.towers[t](mixed[i]) for i, t in enumerate(self.task_names)}

    def regularization(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        term, self._entropy = self._entropy, torch.zeros(())  # keep no graph on the module
        if self.entropy_reg > 0 and term.requires_grad:
            return self.entropy_reg * term
        return torch.zeros(())

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    def diagnostics(self) -> dict[str, Any]:
        rows = self.stats.rows.get(self.task_names[0], 0)
        out = self.stats.diagnostics()
        if rows:
            out["selected_experts"] = {t: round(float(v) / rows, 4) for t, v in zip(self.task_names, self._selected)}
            out["k"] = self.k
        self._selected = torch.zeros(len(self.task_names))
        return out


@hookimpl
def recmtl_register_towers() -> dict[str, type[Tower]]:
    return {"dselect_k": DSelectK}
