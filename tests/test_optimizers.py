"""The optimisers: embedding weight decay on the rows each batch looks up (SparseAdam has no weight decay)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import write_config

from recmtl.config import load_config
from recmtl.data.parquet import ParquetSource
from recmtl.registry import load_registry
from recmtl.schema import fit_schema
from recmtl.training.model import MultiTaskModel, validate_plugins
from recmtl.training.optimizers import (
    SparseRowAdam,
    _with_row_decay,
    coalesce_rows,
    decay_seen_rows,
    make_optimizers,
)


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


def _sparse_grad(rows: int, ids: list[int], width: int = 3, seed: int = 0) -> torch.Tensor:
    """An embedding table's gradient as nn.Embedding(sparse=True) makes it: one entry per id looked up (repeats)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(len(ids), width, generator=g)
    return torch.sparse_coo_tensor(torch.tensor([ids]), values, (rows, width))


@pytest.mark.parametrize("rows", [10, 10_000])  # the mask of the table's rows; torch.unique (a large table)
def test_coalesce_rows_is_coalesce(rows):
    ids = [7, 3, 7, 0, 9, 3, 3, 1] + list(range(5, 9))
    grad = _sparse_grad(rows, ids)
    got, want = coalesce_rows(grad), grad.coalesce()
    assert got.is_coalesced() and got.shape == want.shape
    assert torch.equal(got._indices(), want._indices())
    torch.testing.assert_close(got._values(), want._values())
    assert coalesce_rows(got) is got or torch.equal(coalesce_rows(got)._values(), got._values())
    empty = coalesce_rows(_sparse_grad(rows, []))
    assert empty._nnz() == 0


def _twins(cls: type, **kw):
    torch.manual_seed(0)
    start = torch.randn(50, 4)
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    return a, b, torch.optim.SparseAdam([a], **kw), cls([b], **kw)


@pytest.mark.parametrize("kw", [{}, {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6}, {"maximize": True}])
def test_sparse_row_adam_steps_as_sparse_adam(kw):
    a, b, ref, opt = _twins(SparseRowAdam, **kw)
    for step in range(6):
        ids = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(step)).tolist()
        a.grad, b.grad = _sparse_grad(50, ids, 4, step), _sparse_grad(50, ids, 4, step)
        ref.step()
        opt.step()
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[b][key], ref.state[a][key], rtol=1e-6, atol=1e-7)
    assert opt.state[b]["step"] == ref.state[a]["step"] == 6


def test_sparse_row_adam_state_dict_is_sparse_adam_s():
    a, b, ref, opt = _twins(SparseRowAdam, lr=0.01)
    a.grad = b.grad = _sparse_grad(50, [1, 2, 2, 40], 4)
    ref.step()
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # a checkpoint written with torch's SparseAdam resumes
    b.data.copy_(a.data)
    a.grad, b.grad = _sparse_grad(50, [2, 3, 3], 4, 1), _sparse_grad(50, [2, 3, 3], 4, 1)
    ref.step()
    opt.step()
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))  # and the other way


def test_sparse_row_adam_refuses_dense_gradients():
    p = torch.nn.Parameter(torch.ones(4, 2))
    p.grad = torch.ones(4, 2)
    with pytest.raises(RuntimeError, match="sparse gradients of embedding tables"):
        SparseRowAdam([p]).step()


@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_embedding_tables_get_sparse_row_adam(funnel_dir, tmp_path, decay):
    dense, sparse = make_optimizers(*_tiny_model(funnel_dir, tmp_path, embedding_weight_decay=decay))
    assert isinstance(sparse, SparseRowAdam) and type(sparse).__name__.endswith("RowDecay") == bool(decay)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_dense_adam_is_fused_on_cpu_and_steps_as_the_unfused(funnel_dir, tmp_path, name):
    cfg, model, balancer = _tiny_model(funnel_dir, tmp_path, name=name, weight_decay=0.01)
    dense = make_optimizers(cfg, model, balancer)[0]
    assert all(g.get("fused") for g in dense.param_groups) == (name != "sgd")
    params = [p for g in dense.param_groups for p in g["params"]]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = type(dense)(twins, lr=cfg.optimizer.lr, weight_decay=0.01)
    for step in range(5):
        for p, q in zip(params, twins):
            p.grad = torch.sin(p.detach() * 7 + step)
            q.grad = p.grad.clone()
        dense.step()
        plain.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q)


def _tiny_model(funnel_dir, tmp_path, **optimizer):
    cfg = load_config(write_config(tmp_path / "c.yaml", funnel_dir, optimizer=optimizer))
    registry = load_registry()
    heads = validate_plugins(cfg, registry)
    src = ParquetSource(cfg.resolve(cfg.data.train), cfg.columns())
    model = MultiTaskModel(cfg, fit_schema(cfg, src, {t.name: heads[t.name] for t in cfg.tasks}), registry)
    balancer = registry.create("balancer", cfg.balancer.name, model.task_names, {t.name: t.weight for t in cfg.tasks})
    return cfg, model, balancer


def test_fused_adam_under_the_fp16_grad_scaler_steps_as_the_unfused():
    """fp16's GradScaler hands a fused optimiser the scale to divide out itself: the same steps as unscale_ + step."""
    from recmtl.training.device import Precision

    def run(fused: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        emb, lin = torch.nn.Embedding(20, 4, sparse=True), torch.nn.Linear(4, 1)
        opts = [torch.optim.Adam(lin.parameters(), lr=0.01, fused=fused), SparseRowAdam(emb.parameters(), lr=0.01)]
        precision = Precision("fp16", torch.device("cpu"))
        for _ in range(3):
            with precision.autocast():
                loss = lin(emb(torch.tensor([1, 2, 2, 5, 7]))).pow(2).mean()
            for o in opts:
                o.zero_grad(set_to_none=True)
            precision.scale_losses({"t": loss})["t"].backward()
            precision.step(opts)
        return [p.detach() for p in [*lin.parameters(), *emb.parameters()]]
    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b)
