"""Per-task gradients on the shared parameters: what gradient-manipulation balancers (PCGrad, MGDA, ...)
and the trainer's conflict logging work on. Gradients are flattened into one row per task."""
from __future__ import annotations

import torch
from torch import nn


def task_gradients(losses: list[torch.Tensor], params: list[nn.Parameter], retain_graph: bool = True) -> torch.Tensor:
    """``[num_tasks, num_shared_values]``: row ``i`` is d losses[i] / d params, flattened (zeros where a
    parameter does not depend on the task). The graph is kept so a later ``backward`` still works."""
    params = [p for p in params if p.requires_grad]
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, params)]))
    return torch.stack(rows)


def assign_gradient(params: list[nn.Parameter], flat: torch.Tensor, accumulate: bool = True) -> None:
    """Write a flat gradient vector back into ``p.grad`` (added to what is there when ``accumulate``)."""
    params = [p for p in params if p.requires_grad]
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
        if accumulate and p.grad is not None:
            p.grad.add_(g)
        else:
            p.grad = g.clone()
    if offset != flat.numel():
        raise ValueError(f"gradient has {flat.numel()} values, the parameters {offset}")


def backward_with_shared_gradient(losses: list[torch.Tensor], weights: list[float] | torch.Tensor,
                                  shared: list[nn.Parameter], shared_grad: torch.Tensor) -> None:
    """``backward`` of ``sum_i w_i L_i`` (fills the task-specific parameters: towers, heads, embeddings),
    then set the shared parameters' gradient to ``shared_grad`` (the balancer's combined direction)."""
    total = sum(w * loss for w, loss in zip(weights, losses))
    total.backward()
    assign_gradient(shared, shared_grad, accumulate=False)


def conflict_stats(grads: torch.Tensor, task_names: list[str]) -> dict[str, dict[str, float]]:
    """Gradient norm per task and the cosine similarity of every task pair (negative = conflict)."""
    norms = grads.norm(dim=1)
    unit = grads / norms.clamp_min(1e-12).unsqueeze(1)
    cos = unit @ unit.T
    pairs = {f"{a}/{b}": round(float(cos[i, j]), 5) for i, a in enumerate(task_names)
             for j, b in enumerate(task_names) if i < j}
    return {"grad_norms": {t: round(float(n), 6) for t, n in zip(task_names, norms)}, "cosine": pairs}
