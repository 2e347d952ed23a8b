"""The optimisers of a run: a dense one for the dense parameters (and the balancer's), with the per-group options an
interaction block asks for, a sparse one for sparse embedding tables, with an optional weight decay of the rows each
batch looks up."""
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
    """``cls`` whose step first applies :func:`decay_params` with each group's ``lr`` and
    ``block_weight_decay`` (0 where a group has none)."""

    class DecoupledDecay(cls):  # type: ignore[valid-type, misc]
        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            for group in self.param_groups:
                decay_params(group["params"], group["lr"], group.get("block_weight_decay", 0.0))
            return super().step(closure)

    DecoupledDecay.__name__ = DecoupledDecay.__qualname__ = f"{cls.__name__}DecoupledDecay"
    return DecoupledDecay


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
    """A dense optimiser for the dense parameters (with the decoupled decay an interaction block asks for) and a
    sparse one for sparse embedding tables (with ``optimizer.embedding_weight_decay`` on the rows each batch
    looks up)."""
    sparse = sparse_parameters(model)
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in list(model.parameters()) + list(balancer.parameters()) if id(p) not in sparse_ids]
    opt = config.optimizer
    emb_lr = opt.embedding_lr or opt.lr
    dense_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
                 "adagrad": torch.optim.Adagrad}[opt.name]
    groups = dense_groups(model, dense, opt.lr)
    if any("block_weight_decay" in g for g in groups):
        dense_cls = _with_decoupled_decay(dense_cls)
    optimizers = [dense_cls(groups, lr=opt.lr, weight_decay=opt.weight_decay)]
    if sparse:
        sparse_cls = torch.optim.SparseAdam if opt.name in ("adam", "adamw") else dense_cls  # SGD, Adagrad take sparse
        if opt.embedding_weight_decay:
            optimizers.append(_with_row_decay(sparse_cls)(sparse, lr=emb_lr, row_weight_decay=opt.embedding_weight_decay))
        else:
            optimizers.append(sparse_cls(sparse, lr=emb_lr))
    return optimizers
