"""The optimisers of a run: a dense one for the dense parameters (and the balancer's), a sparse one for sparse
embedding tables."""
from __future__ import annotations

import torch

from recmtl.config import Config
from recmtl.contracts import Balancer
from recmtl.training.model import MultiTaskModel, sparse_parameters


def make_optimizers(config: Config, model: MultiTaskModel, balancer: Balancer) -> list[torch.optim.Optimizer]:
    """A dense optimiser for the dense parameters and a sparse one for sparse embedding tables."""
    sparse = sparse_parameters(model)
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in list(model.parameters()) + list(balancer.parameters()) if id(p) not in sparse_ids]
    opt = config.optimizer
    emb_lr = opt.embedding_lr or opt.lr
    dense_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
                 "adagrad": torch.optim.Adagrad}[opt.name]
    optimizers = [dense_cls(dense, lr=opt.lr, weight_decay=opt.weight_decay)]
    if sparse:
        if opt.name in ("adam", "adamw"):
            optimizers.append(torch.optim.SparseAdam(sparse, lr=emb_lr))
        else:  # SGD and Adagrad accept sparse gradients themselves
            optimizers.append(dense_cls(sparse, lr=emb_lr))
    return optimizers
