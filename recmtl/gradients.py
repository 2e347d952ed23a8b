"""The balancer SDK: per-task gradients on the shared parameters (what gradient-manipulation balancers such as
PCGrad and MGDA, and the trainer's conflict logging, work on; flattened into one row per task), and the bases
``GradientBalancer`` (combine per-task gradients into one direction) and ``LossWeightingBalancer`` (weight the
losses, one backward), plus ``SeededGenerator`` for balancers that draw random numbers."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from recmtl.contracts import Balancer


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
    then set the shared parameters' gradient to ``shared_grad`` (the balancer's combined direction) plus
    whatever gradient they held before the call (e.g. a tower's regularization term, see
    ``Tower.regularization``), which the task losses' own shared gradient replaces but must not erase."""
    shared = [p for p in shared if p.requires_grad]
    before = [None if p.grad is None else p.grad.detach().clone() for p in shared]
    total = sum(w * loss for w, loss in zip(weights, losses))
    total.backward()
    assign_gradient(shared, shared_grad, accumulate=False)
    for p, g in zip(shared, before):
        if g is not None:
            p.grad.add_(g)


def present_tasks(grads: torch.Tensor) -> torch.Tensor:
    """``[T]`` bool: the rows of ``grads [T, N]`` that are not all zero. A task with no label in a batch (every
    row masked) has a zero loss and an all-zero gradient there: balancers leave such a task out of the step,
    since it says nothing about this batch (and would break the methods that normalise or divide by it)."""
    return grads.ne(0).any(dim=1)


def leave_out_absent(combine: Callable[..., tuple[torch.Tensor, torch.Tensor]], grads: torch.Tensor,
                     *per_task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``combine(grads, *per_task) -> (direction [N], coefficients)`` run on the present tasks only (see
    ``present_tasks``; ``per_task`` are ``[T]`` tensors such as the losses, cut to the same rows): the tasks
    left out get coefficient 0, and with no task present the direction is zero. With every task present this
    is ``combine(grads, *per_task)`` itself."""
    present = present_tasks(grads)
    if bool(present.all()):
        return combine(grads, *per_task)
    coeffs = torch.zeros(grads.shape[0], dtype=grads.dtype, device=grads.device)
    if not bool(present.any()):
        return torch.zeros_like(grads[0]), coeffs
    direction, sub = combine(grads[present], *(x[present] for x in per_task))
    coeffs[present] = sub.to(coeffs)
    return direction, coeffs


def conflict_stats(grads: torch.Tensor, task_names: list[str]) -> dict[str, dict[str, float]]:
    """Gradient norm per task and the cosine similarity of every task pair (negative = conflict)."""
    norms = grads.norm(dim=1)
    unit = grads / norms.clamp_min(1e-12).unsqueeze(1)
    cos = unit @ unit.T
    pairs = {f"{a}/{b}": round(float(cos[i, j]), 5) for i, a in enumerate(task_names)
             for j, b in enumerate(task_names) if i < j}
    return {"grad_norms": {t: round(float(n), 6) for t, n in zip(task_names, norms)}, "cosine": pairs}


class GradientBalancer(Balancer):
    """Base of the gradient-manipulation balancers (PCGrad, MGDA, CAGrad, ...): subclasses implement
    ``combine``, which turns the per-task gradients on the shared parameters into one direction.

    Each step costs one ``autograd.grad`` per task through the shared part plus one ordinary backward
    (T + 1 backward passes instead of 1). The config's per-task ``weight`` scales each loss first. The
    shared parameters get the combined direction; every other parameter (task towers, heads, sparse
    embeddings) gets the gradient of ``sum_t w_t L_t``, or of ``sum_t c_t w_t L_t`` when the subclass sets
    ``scale_task_specific`` (its coefficients ``c_t`` then weight the losses everywhere).

    A task whose row of ``grads`` is all zero (no label in the batch) should be left out of the step, not
    combined as a zero vector (``present_tasks``; ``leave_out_absent`` does it for a stateless ``combine``).
    """

    scale_task_specific: bool = False

    def combine(self, grads: torch.Tensor, losses: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``grads [T, N]``: row t is the gradient of ``w_t L_t`` on the shared parameters, flattened;
        ``losses [T]``: the detached ``w_t L_t``; ``sizes``: element count of each shared tensor, in order.
        Returns the shared direction ``[N]`` and one coefficient per task (what ``backward`` reports)."""
        raise NotImplementedError

    def backward(self, losses: dict[str, torch.Tensor], shared_parameters: list[nn.Parameter]) -> dict[str, float]:
        scaled = [self.weights.get(t, 1.0) * losses[t] for t in self.task_names]
        params = [p for p in shared_parameters if p.requires_grad]
        if not params:  # nothing shared (e.g. independent towers): plain weighted sum
            sum(scaled).backward()
            return {t: float(self.weights.get(t, 1.0)) for t in self.task_names}
        grads = task_gradients(scaled, params)
        with torch.no_grad():
            direction, coeffs = self.combine(grads, torch.stack([x.detach() for x in scaled]).to(grads.dtype),
                                             [p.numel() for p in params])
        coeffs = coeffs.detach().to(torch.float64).cpu()
        task_weights = coeffs.tolist() if self.scale_task_specific else [1.0] * len(scaled)
        backward_with_shared_gradient(scaled, task_weights, params, direction.detach())
        return {t: float(c) * float(self.weights.get(t, 1.0)) for t, c in zip(self.task_names, coeffs)}


class LossWeightingBalancer(Balancer):
    """Base of the loss-weighting balancers (fixed, DWA, RLW, ...): subclasses implement ``task_weights``, and
    ``backward`` minimises ``sum_t w_t L_t`` with one ordinary backward pass, returning the ``w_t`` it used."""

    def task_weights(self, losses: dict[str, torch.Tensor]) -> list[float]:
        """One weight per task, in ``task_names`` order, for this step."""
        raise NotImplementedError

    def backward(self, losses: dict[str, torch.Tensor], shared_parameters: list[nn.Parameter]) -> dict[str, float]:
        w = [float(x) for x in self.task_weights(losses)]
        total = sum(wi * losses[t] for wi, t in zip(w, self.task_names))
        total.backward()
        return dict(zip(self.task_names, w))


class SeededGenerator:
    """Mixin (list it before the Balancer base): the balancer's own ``torch.Generator``, saved in and
    restored from checkpoints, so a ``--resume``d run continues the same random sequence."""

    generator: torch.Generator

    def init_generator(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(int(seed))

    def get_extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
