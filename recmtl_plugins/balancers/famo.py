"""FAMO: Fast Adaptive Multitask Optimization.

Liu, Liu, Jiang, Stone and Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023 (Algorithm 1,
official code Cranial-XIX/FAMO). Task logits ``w`` (zeros at start), ``z = softmax(w)``. The network
minimises

    sum_k z_k * log(L_k - m_k + eps) / c,      c = sum_k z_k / (L_k - m_k + eps)   (c a constant),

so its gradient is ``sum_k lambda_k grad L_k`` with ``lambda_k = z_k / (c (L_k - m_k + eps))`` (summing
to 1; these are the weights ``backward`` returns); ``m_k = 0`` is the losses' lower bound. After the
step, with ``delta_k = log(L_k^old - m_k + eps) - log(L_k^new - m_k + eps)`` the decrease of each log
loss, the logits move by one Adam step (learning rate ``w_lr``, weight decay ``gamma``) along
``d = J_z(w)^T delta``: a task whose log loss fell more loses weight, one that fell less gains it.

When ``L^new`` is taken differs from the other implementations. The paper (Algorithm 1), the official code
(``famo.py``'s example and every experiment's trainer) and LibMTL's trainer all re-evaluate the same batch
right after the optimiser step (one extra forward pass, without gradients) and update ``w`` from that.
recmtl's balancer is not called after the optimiser step and cannot re-run the model, so here ``L^new`` is
the loss of the next batch, and ``w`` moves at the start of the next ``backward`` call, with no extra
pass. ``delta_k`` then measures the change from one batch to the next: it also holds the difference
between the two batches' losses (noise around the step's effect), and a step's gain on rows it was
trained on counts only as far as it carries over to new rows.

``w`` is updated by this balancer's own Adam, not by the trainer's optimiser (``w.grad`` is left empty,
which the trainer's optimiser skips); its state is saved with the balancer, so ``--resume`` continues it.
Defaults ``w_lr = 0.025``, ``gamma = 0.01`` are those of the official ``famo.py`` (its experiment scripts
use ``gamma`` 0.001 for NYUv2, CelebA and QM9 and 0.01 for Cityscapes; LibMTL's default is 0.001). The
official experiments also clip the shared parameters' gradient to norm 1 (``max_norm``); this balancer
does not clip. The per-task ``weight`` of the config is not used.

A task whose loss is at its lower bound, ``L_k - m_k <= 0`` (a batch with no label for it: a masked
mean over no rows is 0), is left out of the step (``lambda_k = 0``, ``c`` over the other tasks): kept, its
``1 / eps`` term would take nearly all of the weight (``lambda_k ~ 1``) and stall every other task. A
logit update only uses the tasks present in both batches it compares: the others' ``delta_k`` is set to
the ``z``-weighted mean of those, which gives their logits no gradient (no update when none is in both).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from recmtl import Balancer, hookimpl

EPS = 1e-8


class FAMO(Balancer):
    def __init__(self, task_names: list[str], weights: dict[str, float], w_lr: float = 0.025,
                 gamma: float = 0.01) -> None:
        super().__init__(task_names, weights)
        if w_lr <= 0 or gamma < 0:
            raise ValueError(f"w_lr must be > 0 and gamma >= 0, got w_lr={w_lr}, gamma={gamma}")
        self.logits = nn.Parameter(torch.zeros(len(task_names)))
        self.logit_optimizer = torch.optim.Adam([self.logits], lr=w_lr, weight_decay=gamma)
        self.min_losses = torch.zeros(len(task_names))
        self.prev_losses: torch.Tensor | None = None

    def update(self, new_losses: torch.Tensor) -> None:
        """One step of the logits from the change of log losses since the last ``backward``, over the tasks
        present (above their lower bound) in both."""
        prev = self.prev_losses.to(new_losses.device)
        low = self.min_losses.to(new_losses.device)
        both = (prev - low > 0) & (new_losses - low > 0)
        if not bool(both.any()):
            return
        delta = torch.log(prev - low + EPS) - torch.log(new_losses - low + EPS)
        if not bool(both.all()):  # neutral value: J_z^T delta is then 0 for the others' logits
            z = torch.softmax(self.logits.detach(), -1).to(delta)
            delta = torch.where(both, delta, (z * delta)[both].sum() / z[both].sum())
        with torch.enable_grad():
            (d,) = torch.autograd.grad(torch.softmax(self.logits, -1), self.logits, grad_outputs=delta.to(self.logits.dtype))
        self.logit_optimizer.zero_grad()
        self.logits.grad = d
        self.logit_optimizer.step()
        self.logits.grad = None  # the trainer's optimiser skips a parameter without a gradient

    def backward(self, losses: dict[str, torch.Tensor], shared_parameters: list[nn.Parameter]) -> dict[str, float]:
        loss_vec = torch.stack([losses[t] for t in self.task_names])
        current = loss_vec.detach()
        if self.prev_losses is not None:
            self.update(current)
        self.prev_losses = current
        low = self.min_losses.to(loss_vec.device)
        present = current - low > 0  # a task without labels in this batch (loss 0) is left out
        z = torch.where(present, torch.softmax(self.logits.detach(), -1).to(loss_vec), 0.0)
        gap = loss_vec - low + EPS
        lam = torch.zeros_like(current)
        if bool(present.any()):
            c = (z / gap.detach()).sum()
            (z * torch.log(gap) / c).sum().backward()
            lam = z / (c * gap.detach())
        else:  # nothing to learn from: a zero gradient everywhere, as a plain sum of the losses would give
            (0 * loss_vec).sum().backward()
        return dict(zip(self.task_names, lam.tolist()))

    def get_extra_state(self) -> Any:
        return {"optimizer": self.logit_optimizer.state_dict(), "prev_losses": self.prev_losses}

    def set_extra_state(self, state: Any) -> None:
        self.logit_optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.prev_losses = state["prev_losses"]


@hookimpl
def recmtl_register_balancers() -> dict[str, type[Balancer]]:
    return {"famo": FAMO}
