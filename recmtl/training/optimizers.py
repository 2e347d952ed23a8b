"""The optimisers of a run: a dense one for the dense parameters (and the balancer's), a sparse one for sparse
embedding tables, with an optional weight decay of the rows each batch looks up."""
from __future__ import annotations

from typing import Any

import torch

from recmtl.config import Config
from recmtl.contracts import Balancer
from recmtl.errors import PluginError
from recmtl.training.model import MultiTaskModel, sparse_parameters


def decay_seen_rows(params: list[torch.Tensor], lr: float, weight_decay: float) -> None:
    """Decoupled weight decay on the rows of sparse embedding tables that the current gradient touches:
    ``row *= 1 - lr * weight_decay``. Rows a batch does not look up are left alone, so a step costs time in the
    batch's ids, not in the vocabulary. The gradient is coalesced in place (the optimiser's own coalesce is then
    free)."""
    factor = 1.0 - lr * weight_decay
    if weight_decay <= 0:
        return
    with torch.no_grad():
        for p in params:
            if p.grad is None or not p.grad.is_sparse:
                continue
            grad = p.grad.coalesce()
            p.grad = grad
            rows = grad.indices()[0]
            p.index_copy_(0, rows, p.index_select(0, rows).mul_(factor))


def _with_row_decay(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``cls`` whose step first applies :func:`decay_seen_rows` with each group's ``lr`` and ``row_weight_decay``."""

    class RowDecay(cls):  # type: ignore[valid-type, misc]
        def __init__(self, params: Any, row_weight_decay: float = 0.0, **kwargs: Any) -> None:
            super().__init__(params, **kwargs)
            for group in self.param_groups:
                group.setdefault("row_weight_decay", row_weight_decay)

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            for group in self.param_groups:
                decay_seen_rows(group["params"], group["lr"], group["row_weight_decay"])
            return super().step(closure)

    RowDecay.__name__ = RowDecay.__qualname__ = f"{cls.__name__}RowDecay"
    return RowDecay


def dense_groups(model: MultiTaskModel, dense: list[torch.Tensor], lr: float) -> list[dict[str, Any]]:
    """``dense`` as optimiser parameter groups: one at ``lr``, and one per learning-rate scale the interaction
    block asks for (``Interaction.lr_scales``) at ``scale x lr``; empty groups are left out."""
    scaled: dict[int, float] = {}
    if model.interaction is not None:
        for params, scale in model.interaction.lr_scales():
            if not scale > 0:
                raise PluginError(f"interaction '{type(model.interaction).__name__}' asked for learning-rate scale "
                                  f"{scale!r}; expected a positive number")
            for p in params:
                scaled.setdefault(id(p), float(scale))
    groups: dict[float, list[torch.Tensor]] = {}
    for p in dense:
        groups.setdefault(scaled.get(id(p), 1.0), []).append(p)
    return [{"params": ps, "lr": lr * scale} for scale, ps in groups.items() if ps]


def make_optimizers(config: Config, model: MultiTaskModel, balancer: Balancer) -> list[torch.optim.Optimizer]:
    """A dense optimiser for the dense parameters and a sparse one for sparse embedding tables (with
    ``optimizer.embedding_weight_decay`` on the rows each batch looks up)."""
    sparse = sparse_parameters(model)
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in list(model.parameters()) + list(balancer.parameters()) if id(p) not in sparse_ids]
    opt = config.optimizer
    emb_lr = opt.embedding_lr or opt.lr
    dense_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
                 "adagrad": torch.optim.Adagrad}[opt.name]
    optimizers = [dense_cls(dense_groups(model, dense, opt.lr), lr=opt.lr, weight_decay=opt.weight_decay)]
    if sparse:
        sparse_cls = torch.optim.SparseAdam if opt.name in ("adam", "adamw") else dense_cls  # SGD, Adagrad take sparse
        if opt.embedding_weight_decay:
            optimizers.append(_with_row_decay(sparse_cls)(sparse, lr=emb_lr, row_weight_decay=opt.embedding_weight_decay))
        else:
            optimizers.append(sparse_cls(sparse, lr=emb_lr))
    return optimizers
