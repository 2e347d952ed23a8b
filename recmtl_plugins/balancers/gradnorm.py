"""GradNorm: learned task weights that equalise the tasks' relative training rates.

Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss Balancing in
Deep Multitask Networks", ICML 2018. The network minimises ``sum_i w_i L_i``. With ``W`` the last shared
layer, ``G_i = ||grad_W w_i L_i||``, ``G_bar`` their mean, ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))``
the relative inverse training rate (``L_i(0)``: the loss at the first step), the weights follow the
gradient of

    L_grad = sum_i | G_i - [G_bar * r_i ** alpha] |,

where the bracket is a constant (no gradient flows through it), so the gradient norm of a task that
trains slower (larger ``r_i``) is pushed up. ``alpha`` (1.5 by default) is the strength of the pull.
After each update the weights are renormalised to sum to the number of tasks ``K``.

How the weights are trained: ``w`` is a parameter of this balancer, so ``recmtl train`` gives it to the
dense optimiser (same optimiser and learning rate as the network, as in the paper and LibMTL). In
``backward`` the network loss uses ``w`` detached and ``w.grad`` is set to ``d L_grad / d w`` alone, so
the weights learn from the GradNorm loss only; the renormalisation ``w <- K w / sum(w)`` happens at the
start of the next ``backward`` (right after the optimiser step that changed ``w``). Weights are kept
above ``min_weight`` so that none can turn negative. ``W`` is the last shared parameter with two or
more dimensions (the weight matrix of the last shared layer; for MMoE the experts' last layer). The
per-task ``weight`` of the config is not used (every task starts at 1).

A task whose gradient on ``W`` is all zero (a batch with no label for it) is left out of the step: ``G_bar``
and the mean of ``r`` are over the other tasks, its weight gets no gradient, and its ``L_i(0)`` is the
loss of the first step on which it has labels (a zero loss there would make ``r_i`` huge for good). Under
``train.precision: fp16`` the gradient norms carry the loss scale (``Balancer.grad_scale``); it is divided
out of ``w.grad``, which the trainer's optimiser step leaves as it is.
"""
from __future__ import annotations

import torch
from torch import nn

from recmtl import Balancer, hookimpl
from recmtl.gradients import task_gradients


def last_shared_layer(shared_parameters: list[nn.Parameter]) -> list[nn.Parameter]:
    """The weight matrix of the last shared layer: the last trainable tensor with >= 2 dimensions (the last
    tensor when none has)."""
    params = [p for p in shared_parameters if p.requires_grad]
    if not params:
        raise ValueError("gradnorm needs shared parameters (the tower reports none)")
    matrices = [p for p in params if p.dim() >= 2]
    return [matrices[-1] if matrices else params[-1]]


class GradNorm(Balancer):
    def __init__(self, task_names: list[str], weights: dict[str, float], alpha: float = 1.5,
                 min_weight: float = 1e-3) -> None:
        super().__init__(task_names, weights)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.min_weight = float(min_weight)
        k = len(task_names)
        self.task_weights = nn.Parameter(torch.ones(k))
        self.register_buffer("initial_losses", torch.zeros(k))  # L_i(0); zeros until the first step

    @torch.no_grad()
    def renormalise(self) -> None:
        """``w <- K * w / sum(w)`` with every weight at least ``min_weight``."""
        w = self.task_weights.clamp_min(self.min_weight)
        self.task_weights.copy_(len(self.task_names) * w / w.sum())

    def backward(self, losses: dict[str, torch.Tensor], shared_parameters: list[nn.Parameter]) -> dict[str, float]:
        self.renormalise()
        loss_vec = torch.stack([losses[t] for t in self.task_names])
        layer = last_shared_layer(shared_parameters)
        w = self.task_weights
        # ||grad_W (w_i L_i)|| = w_i ||grad_W L_i|| (w_i > 0): first-order in w, no second backward needed
        grad_norms = task_gradients([losses[t] for t in self.task_names], layer).norm(dim=1)
        present = grad_norms > 0  # a task without labels in this batch is left out
        first = present & (self.initial_losses <= 0)  # L_i(0): the loss of the task's first labelled step
        self.initial_losses.copy_(torch.where(first, loss_vec.detach().clamp_min(1e-12), self.initial_losses))
        weight_grad = torch.zeros_like(w)
        if bool(present.any()):
            g = (w * grad_norms)[present]
            ratio = loss_vec.detach()[present] / self.initial_losses[present]
            r = ratio / ratio.mean()
            target = (g.mean() * r ** self.alpha).detach()
            grad_loss = (g - target).abs().sum()
            (weight_grad,) = torch.autograd.grad(grad_loss, w)
        (w.detach() * loss_vec).sum().backward()
        w.grad = weight_grad / float(self.grad_scale)  # G_i were of the loss-scaled gradients (fp16)
        return dict(zip(self.task_names, w.detach().tolist()))


@hookimpl
def recmtl_register_balancers() -> dict[str, type[Balancer]]:
    return {"gradnorm": GradNorm}
