"""The optimisers: embedding weight decay on the rows each batch looks up (SparseAdam has no weight decay)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import write_config

from recmtl.training.optimizers import _with_row_decay, decay_seen_rows


@pytest.mark.parametrize("cls", [torch.optim.SparseAdam, torch.optim.Adagrad, torch.optim.SGD])
def test_row_decay_touches_only_the_rows_of_the_batch(cls):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    with torch.no_grad():
        emb.weight.fill_(1.0)
    opt = _with_row_decay(cls)([emb.weight], lr=0.1, row_weight_decay=2.0)
    (emb(torch.tensor([1, 1, 4])).sum() * 0).backward()  # a zero gradient: only the decay moves the rows
    opt.step()
    w = emb.weight.detach()[:, 0]
    assert torch.allclose(w[[1, 4]], torch.tensor(0.8)) and torch.all(w[[0, 2, 3, 5, 6, 7, 8, 9]] == 1.0)
    assert type(opt).__name__ == f"{cls.__name__}RowDecay"


def test_decay_seen_rows_without_decay_or_gradient_is_a_no_op():
    p = torch.nn.Parameter(torch.ones(4, 2))
    decay_seen_rows([p], 0.1, 0.0)
    decay_seen_rows([p], 0.1, 1.0)  # no gradient
    assert torch.all(p == 1)


def test_training_with_embedding_weight_decay_shrinks_the_tables(cli, funnel_dir, tmp_path):
    norms = {}
    for wd in (0.0, 20.0):
        run = tmp_path / f"run{wd}"
        cfg = write_config(tmp_path / f"c{wd}.yaml", funnel_dir, optimizer={"lr": 0.005, "embedding_weight_decay": wd},
                           train={"batch_size": 512, "epochs": 1, "progress": False, "threads": 1})
        r = cli("train", cfg, "--out", run)
        assert r.code == 0, r
        state = torch.load(run / "best.pt", weights_only=False)["model"]
        norms[wd] = sum(float(v.norm()) for k, v in state.items() if "embedding" in k or "table" in k)
        assert json.loads((run / "metrics.json").read_text())["validation"]["click"]["auc"] > 0.6
    assert norms[20.0] < 0.9 * norms[0.0], norms
