"""The optimisers of a run: a dense one for the dense parameters (and the balancer's), with the per-group options an
interaction block asks for, a sparse one for sparse embedding tables, with an optional weight decay of the rows each
batch looks up."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from recmtl.config import Config
from recmtl.contracts import Balancer
from recmtl.errors import PluginError
from recmtl.training.model import MultiTaskModel, sparse_parameters

#: :func:`coalesce_rows` marks the rows seen in a table-sized mask (no sort) when the table has at most this many
#: rows per gradient entry, else it sorts them (``torch.unique``)
MASK_ROWS_PER_ENTRY = 8


def coalesce_rows(grad: torch.Tensor) -> torch.Tensor:
    """A sparse gradient of an embedding table (one sparse dimension: rows) coalesced: what ``grad.coalesce()``
    returns (the distinct rows in ascending order, each with the sum of its entries; sums to fp32 rounding),
    computed with ``index_add_`` over the rows' positions instead of coalesce's sort and reduction. The positions
    come from a mask of the table's rows (time in the table's rows) or, for a table much larger than the gradient
    (:data:`MASK_ROWS_PER_ENTRY`), from ``torch.unique`` (a sort of the entries). A coalesced gradient, or one with
    other sparse dimensions, is returned as ``coalesce`` would."""
    if grad.is_coalesced() or grad.sparse_dim() != 1:
        return grad.coalesce()
    ids, values = grad._indices()[0], grad._values()
    n = grad.shape[0]
    if n <= MASK_ROWS_PER_ENTRY * ids.numel():
        seen = torch.zeros(n, dtype=torch.bool, device=ids.device)
        seen[ids] = True
        rows = seen.nonzero().squeeze(1)
        where = (seen.cumsum(0) - 1)[ids]
    else:
        rows, where = torch.unique(ids, sorted=True, return_inverse=True)
    summed = values.new_zeros((rows.numel(), *values.shape[1:])).index_add_(0, where, values)
    return torch.sparse_coo_tensor(rows.unsqueeze(0), summed, grad.shape, is_coalesced=True, check_invariants=False)


class SparseRowAdam(torch.optim.SparseAdam):
    """``torch.optim.SparseAdam`` with a cheaper step: the same update (its formulas, in its order of operations:
    the same numbers), state and ``state_dict`` (checkpoints load into either), but the gradient coalesced by
    :func:`coalesce_rows` and the moments of the rows seen read with ``index_select`` and written back with
    ``index_copy_``, instead of ``sparse_mask`` and sparse additions. For embedding tables (sparse gradients with
    one sparse dimension)."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eps, lr, maximize = group["eps"], float(group["lr"]), group.get("maximize", False)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse or p.grad.sparse_dim() != 1:
                    raise RuntimeError(f"{type(self).__name__} takes sparse gradients of embedding tables (one "
                                       "sparse dimension); use Adam for dense gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                grad = coalesce_rows(p.grad)
                rows, values = grad._indices()[0], grad._values()
                if values.numel() == 0:
                    continue
                if maximize:
                    values = -values
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                old_avg, old_sq = exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows)
                numer = values.sub(old_avg).mul_(1 - beta1).add_(old_avg)  # the new first moment of the rows
                exp_avg.index_copy_(0, rows, numer)
                second = values.pow(2).sub_(old_sq).mul_(1 - beta2).add_(old_sq)
                exp_avg_sq.index_copy_(0, rows, second)
                denom = second.sqrt_().add_(eps)
                step_size = lr * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                p.index_add_(0, rows, -step_size * numer.div_(denom))
        return loss


def decay_seen_rows(params: list[torch.Tensor], lr: float, weight_decay: float) -> None:
    """Decoupled weight decay on the rows of sparse embedding tables that the current gradient touches:
    ``row *= 1 - lr * weight_decay``. Rows a batch does not look up are left alone, so a step costs time in the
    batch's ids, not in the vocabulary. The gradient is coalesced in place (:func:`coalesce_rows`; the
    optimiser's own coalesce is then free)."""
    factor = 1.0 - lr * weight_decay
    if weight_decay <= 0:
        return
    with torch.no_grad():
        for p in params:
            if p.grad is None or not p.grad.is_sparse:
                continue
            grad = coalesce_rows(p.grad)
            p.grad = grad
            rows = grad.indices()[0]
            p.index_copy_(0, rows, p.index_select(0, rows).mul_(factor))


def _with_decay(cls: type[torch.optim.Optimizer], key: str,
                decay: Callable[[list[torch.Tensor], float, float], None], suffix: str) -> type[torch.optim.Optimizer]:
    """``cls`` whose step first applies ``decay(params, lr, group[key])`` to each parameter group; ``key=value`` given
    to the constructor is every group's default (a group without the key is not decayed)."""

    class Decaying(cls):  # type: ignore[valid-type, misc]
        def __init__(self, params: Any, **kwargs: Any) -> None:
            default = kwargs.pop(key, None)
            super().__init__(params, **kwargs)
            for group in self.param_groups:
                if default is not None:
                    group.setdefault(key, default)

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            for group in self.param_groups:
                decay(group["params"], group["lr"], group.get(key, 0.0))
            return super().step(closure)

    Decaying.__name__ = Decaying.__qualname__ = f"{cls.__name__}{suffix}"
    return Decaying


def _with_row_decay(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``cls`` whose step first applies :func:`decay_seen_rows` with each group's ``lr`` and ``row_weight_decay``."""
    return _with_decay(cls, "row_weight_decay", decay_seen_rows, "RowDecay")


#: the options ``Interaction.optimizer_groups`` may ask for
GROUP_OPTIONS = ("lr_scale", "weight_decay")


def decay_params(params: list[torch.Tensor], lr: float, weight_decay: float) -> None:
    """Decoupled weight decay, as AdamW: ``p *= 1 - lr * weight_decay`` for each parameter with a gradient."""
    if weight_decay <= 0:
        return
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.mul_(1.0 - lr * weight_decay)


def _with_decoupled_decay(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``cls`` whose step first applies :func:`decay_params` with each group's ``lr`` and ``block_weight_decay`` (0
    where a group has none)."""
    return _with_decay(cls, "block_weight_decay", decay_params, "DecoupledDecay")


def dense_groups(model: MultiTaskModel, dense: list[torch.Tensor], lr: float) -> list[dict[str, Any]]:
    """``dense`` as optimiser parameter groups: one at ``lr``, and one per set of options the interaction block
    asks for (``Interaction.optimizer_groups``): ``lr_scale x lr`` and, where ``weight_decay`` is set, a
    ``block_weight_decay`` key (applied by :func:`make_optimizers`' dense optimiser); empty groups are left out."""
    chosen: dict[int, tuple[float, float]] = {}
    if model.interaction is not None:
        name = type(model.interaction).__name__
        for params, options in model.interaction.optimizer_groups():
            unknown = sorted(set(options) - set(GROUP_OPTIONS))
            if unknown:
                raise PluginError(f"interaction '{name}' asked for optimiser option(s) {unknown}; expected "
                                  f"{', '.join(GROUP_OPTIONS)}")
            scale, decay = options.get("lr_scale", 1.0), options.get("weight_decay", 0.0)
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
                raise PluginError(f"interaction '{name}' asked for learning-rate scale {scale!r}; expected a "
                                  "positive number")
            if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay >= 0:
                raise PluginError(f"interaction '{name}' asked for weight decay {decay!r}; expected a "
                                  "non-negative number")
            for p in params:
                chosen.setdefault(id(p), (float(scale), float(decay)))
    groups: dict[tuple[float, float], list[torch.Tensor]] = {}
    for p in dense:
        groups.setdefault(chosen.get(id(p), (1.0, 0.0)), []).append(p)
    return [{"params": ps, "lr": lr * scale, **({"block_weight_decay": decay} if decay else {})}
            for (scale, decay), ps in groups.items() if ps]


def make_optimizers(config: Config, model: MultiTaskModel, balancer: Balancer) -> list[torch.optim.Optimizer]:
    """A dense optimiser for the dense parameters (Adam/AdamW fused on CPU; with the decoupled decay an interaction
    block asks for) and a sparse one for sparse embedding tables (:class:`SparseRowAdam` with ``adam``/``adamw``; with
    ``optimizer.embedding_weight_decay`` on the rows each batch looks up)."""
    sparse = sparse_parameters(model)
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in list(model.parameters()) + list(balancer.parameters()) if id(p) not in sparse_ids]
    opt = config.optimizer
    emb_lr = opt.embedding_lr or opt.lr
    dense_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
                 "adagrad": torch.optim.Adagrad}[opt.name]
    # Adam/AdamW on CPU: torch's fused kernel (one pass over each parameter; the same update to fp32 rounding)
    fused = {"fused": True} if opt.name in ("adam", "adamw") and all(p.device.type == "cpu" for p in dense) else {}
    groups = dense_groups(model, dense, opt.lr)
    dense_opt_cls = _with_decoupled_decay(dense_cls) if any("block_weight_decay" in g for g in groups) else dense_cls
    optimizers = [dense_opt_cls(groups, lr=opt.lr, weight_decay=opt.weight_decay, **fused)]
    if sparse:
        sparse_cls = SparseRowAdam if opt.name in ("adam", "adamw") else dense_cls  # SGD, Adagrad take sparse
        if opt.embedding_weight_decay:
            optimizers.append(_with_row_decay(sparse_cls)(sparse, lr=emb_lr, row_weight_decay=opt.embedding_weight_decay))
        else:
            optimizers.append(sparse_cls(sparse, lr=emb_lr))
    return optimizers
