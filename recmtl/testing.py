"""Contract checks every plugin must pass, public so a plugin author gets them in one line:

    from recmtl.testing import check_tower
    def test_my_tower():
        check_tower(MyTower, num_blocks=2)

Each check raises ``AssertionError`` naming the plugin and the broken promise.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import nn

from recmtl.contracts import Balancer, Encoder, FeatureInfo, Head, Interaction, Logger, TaskInfo, Tower

TASKS = ["task_a", "task_b"]


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _fit(params: list[nn.Parameter], loss_fn: Any, steps: int = 60, lr: float = 0.02,
         sparse: list[nn.Parameter] = ()) -> tuple[float, float]:
    """Adam on ``params``; SparseAdam on the ``sparse`` ones among them (embedding tables with sparse=True)."""
    sparse_ids = {id(p) for p in sparse}
    opts = [torch.optim.Adam([p for p in params if id(p) not in sparse_ids], lr=lr)]
    if sparse:
        opts.append(torch.optim.SparseAdam(list(sparse), lr=lr))
    first = last = None
    for _ in range(steps):
        for opt in opts:
            opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        for opt in opts:
            opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    return first, last


def sample_features() -> dict[str, list[FeatureInfo]]:
    """The feature infos ``check_tower`` gives a tower with ``uses_inputs``: 2 categorical, 2 dense."""
    return {"categorical": [FeatureInfo("c1", "categorical", 10), FeatureInfo("c2", "categorical", 3)],
            "dense": [FeatureInfo("d1", "dense"), FeatureInfo("d2", "dense")]}


def sample_inputs(features: dict[str, list[FeatureInfo]], n: int) -> dict[str, torch.Tensor]:
    """Preprocessed tensors per kind, as a ``uses_inputs`` tower receives them."""
    out = {}
    for kind, infos in features.items():
        if kind == "categorical":
            out[kind] = torch.stack([torch.randint(0, max(f.cardinality, 1), (n,)) for f in infos], 1)
        else:
            out[kind] = torch.randn(n, len(infos))
    return out


def check_tower(cls: type[Tower], input_dim: int = 12, **params: Any) -> Tower:
    """Shapes per task, gradients reach every parameter, a few steps fit a tiny two-task problem, the
    regularization term is a finite scalar. A tower with ``uses_inputs`` is built with ``features=``
    (default: ``sample_features()``) and called with matching preprocessed inputs."""
    torch.manual_seed(0)
    name = _name(cls)
    uses_inputs = bool(getattr(cls, "uses_inputs", False))
    if uses_inputs:
        params.setdefault("features", sample_features())
    tower = cls(input_dim, list(TASKS), **params)
    assert isinstance(tower, Tower), f"{name} must subclass recmtl.Tower"

    def run(x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tower(x, inputs) if uses_inputs else tower(x)

    def inputs_for(n: int) -> dict[str, torch.Tensor]:
        return sample_inputs(params["features"], n) if uses_inputs else {}

    dims = tower.output_dims
    for t in TASKS:
        assert t in dims and int(dims[t]) > 0, f"{name}.output_dims has no positive width for task '{t}': {dims}"
    x = torch.randn(32, input_dim)
    out = run(x, inputs_for(32))
    assert isinstance(out, dict), f"{name}.forward must return a dict task -> tensor"
    for t in TASKS:
        assert t in out, f"{name}.forward returned no entry for task '{t}' (got {sorted(out)})"
        assert tuple(out[t].shape) == (32, dims[t]), f"{name}: task '{t}' output {tuple(out[t].shape)}, expected (32, {dims[t]})"
    scores = {t: torch.sigmoid(o.sum(-1)) for t, o in out.items()}
    reg = tower.regularization(scores)
    assert isinstance(reg, torch.Tensor) and reg.dim() == 0 and torch.isfinite(reg), \
        f"{name}.regularization must return a finite scalar tensor, got {reg!r}"
    (sum(o.sum() for o in out.values()) + reg).backward()
    all_params = {id(p) for p in tower.parameters()}
    for p in tower.shared_parameters():
        assert id(p) in all_params, f"{name}.shared_parameters returned a parameter the tower does not own"
    no_grad = [n for n, p in tower.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"{name}: no gradient reaches {no_grad}"
    # a tiny problem: each task a different linear function of x
    heads = nn.ModuleDict({t: nn.Linear(dims[t], 1) for t in TASKS})
    w = torch.randn(len(TASKS), input_dim)
    xs = torch.randn(256, input_dim)
    xs_inputs = inputs_for(256)
    ys = xs @ w.T
    tower.train()

    def loss() -> torch.Tensor:
        h = run(xs, xs_inputs)
        return sum(((heads[t](h[t]).squeeze(-1) - ys[:, i]) ** 2).mean() for i, t in enumerate(TASKS))

    sparse = [m.weight for m in tower.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    first, last = _fit(list(tower.parameters()) + list(heads.parameters()), loss, sparse=sparse)
    assert last < 0.7 * first, f"{name}: 60 Adam steps did not reduce a tiny regression loss ({first:.4f} -> {last:.4f})"
    tower.eval()
    run(xs, xs_inputs)
    json.dumps(tower.diagnostics())
    return tower


def check_head(cls: type[Head], input_dim: int = 8, **params: Any) -> Head:
    """Output/score shapes, masked rows do not count, gradients reach the input, the loss can be fitted; a
    ``"value"`` head's ``target_values`` give one finite number per label.
    A ``label_type = "class"`` head gets 3 classes, a ``"multi"`` head 3 attributes with a per-entry mask."""
    torch.manual_seed(0)
    name = _name(cls)
    kind = getattr(cls, "label_type", "value")
    k = 3
    classes = (0, 1, 2) if kind == "class" else ("attr_a", "attr_b", "attr_c") if kind == "multi" else ()
    head = cls(input_dim, TaskInfo("task_a", "label_a", "head", 1.0, classes), **params)
    assert isinstance(head, Head), f"{name} must subclass recmtl.Head"
    if kind == "value":  # what the fit pass summarises into TaskInfo.target
        values = np.asarray(cls.target_values(np.array([0.0, 1.0, 2.5], np.float32), **params), dtype=np.float64)
        assert values.shape == (3,) and np.isfinite(values).all(), (
            f"{name}.target_values must return one finite number per label, got {values!r}")
    n = 64
    h = torch.randn(n, input_dim, requires_grad=True)
    upstream = {d: torch.sigmoid(torch.randn(n)) for d in head.depends_on}
    if kind == "class":
        label = torch.randint(0, k, (n,)).float()
        mask = (torch.rand(n) < 0.8).float()
        flipped = torch.where(mask.bool(), label, (label + 1) % k)
    else:
        shape = (n, k) if kind == "multi" else (n,)
        label = (torch.rand(shape) < 0.4).float()
        mask = (torch.rand(shape) < 0.8).float()
        flipped = torch.where(mask.bool(), label, 1 - label)
    out = head(h, upstream)
    assert out.shape[0] == n, f"{name}.forward must keep the batch dimension first, got {tuple(out.shape)}"
    score = head.predict(out)
    want = (n,) if kind == "value" else (n, k)
    assert tuple(score.shape) == want, f"{name}.predict must return {want} scores for label_type '{kind}', got {tuple(score.shape)}"
    loss = head.loss(out, label, mask)
    assert loss.dim() == 0 and torch.isfinite(loss), f"{name}.loss must be a finite scalar, got {loss}"
    assert torch.allclose(loss, head.loss(out, flipped, mask)), f"{name}.loss changed when only unlabelled (masked) rows changed"
    loss.backward()
    assert h.grad is not None and h.grad.abs().sum() > 0, f"{name}: no gradient reaches the tower output"
    if kind == "multi":
        shown = label.numpy().copy()
        shown[mask.numpy() == 0] = float("nan")
        rows = mask.numpy().any(1)
        m = head.metrics(shown[rows], score.detach().numpy()[rows])
    else:
        m = head.metrics(label.numpy()[mask.numpy() > 0], score.detach().numpy()[mask.numpy() > 0])
    assert isinstance(m, dict) and all(isinstance(v, float) for v in m.values()), f"{name}.metrics must return dict of floats"
    declared = set(head.metric_names())
    assert set(m) <= declared, (f"{name}.metrics returned {sorted(set(m) - declared)} which metric_names() does not "
                                f"declare ({sorted(declared)})")
    hx = torch.randn(n, input_dim)
    if kind == "class":
        target = (hx[:, 0] > 0).float() + (hx[:, 1] > 0).float()
    elif kind == "multi":
        target = (hx[:, :k] > 0).float()
    else:
        target = (hx[:, 0] > 0).float()

    def fit_loss() -> torch.Tensor:
        return head.loss(head(hx, upstream), target, torch.ones(target.shape))

    first, last = _fit(list(head.parameters()), fit_loss, steps=100, lr=0.05)
    assert last < first, f"{name}: training did not reduce the loss ({first:.4f} -> {last:.4f})"
    return head


def check_balancer(cls: type[Balancer], **params: Any) -> Balancer:
    """backward() fills gradients of the shared parameters, returns weights per task, and training with
    it reduces every task's loss on a tiny problem."""
    torch.manual_seed(0)
    name = _name(cls)
    balancer = cls(list(TASKS), {t: 1.0 for t in TASKS}, **params)
    assert isinstance(balancer, Balancer), f"{name} must subclass recmtl.Balancer"
    shared = nn.Linear(6, 16)
    heads = nn.ModuleDict({t: nn.Linear(16, 1) for t in TASKS})
    x = torch.randn(128, 6)
    ys = torch.stack([x[:, 0] + x[:, 1], x[:, 0] - x[:, 2]], 1)
    opt = torch.optim.Adam(list(shared.parameters()) + list(heads.parameters()) + list(balancer.parameters()), lr=0.02)

    def losses() -> dict[str, torch.Tensor]:
        h = torch.relu(shared(x))
        return {t: ((heads[t](h).squeeze(-1) - ys[:, i]) ** 2).mean() for i, t in enumerate(TASKS)}

    start = {t: v.item() for t, v in losses().items()}
    for step in range(80):
        opt.zero_grad()
        weights = balancer.backward(losses(), list(shared.parameters()))
        if step == 0:
            assert set(weights) == set(TASKS), f"{name}.backward must return a weight per task, got {weights}"
            for p in shared.parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: shared parameters got no finite gradient"
            for t in TASKS:
                assert heads[t].weight.grad is not None, f"{name}: task '{t}' parameters got no gradient"
        opt.step()
        if step % 20 == 19:
            balancer.on_epoch_end(step // 20, {t: v.item() for t, v in losses().items()})
    end = {t: v.item() for t, v in losses().items()}
    for t in TASKS:
        assert end[t] < start[t], f"{name}: task '{t}' loss did not fall ({start[t]:.4f} -> {end[t]:.4f})"
    return balancer


def check_encoder(cls: type[Encoder], **params: Any) -> Encoder:
    """Output ``[batch, output_dim]`` for its feature kind, gradients reach its parameters."""
    torch.manual_seed(0)
    name = _name(cls)
    kind = getattr(cls, "kind", "")
    assert kind, f"{name} must declare the feature kind it encodes (class attribute `kind`)"
    n = 16
    if kind == "categorical":
        feats = [FeatureInfo("f1", kind, 10), FeatureInfo("f2", kind, 3)]
        x = torch.stack([torch.randint(0, 10, (n,)), torch.randint(0, 3, (n,))], 1)
    elif kind == "dense":
        feats = [FeatureInfo("f1", kind), FeatureInfo("f2", kind), FeatureInfo("f3", kind)]
        x = torch.randn(n, 3)
    elif kind == "image":  # two 3x8x8 image features, pixels in [0, 1]
        shape = {"channels": 3, "height": 8, "width": 8}
        feats = [FeatureInfo("img1", kind, 0, shape), FeatureInfo("img2", kind, 0, shape)]
        x = torch.rand(n, 2, 3, 8, 8)
    elif kind == "sequence":  # two list features (max_length 5 and 3): ids, padding id = cardinality
        feats = [FeatureInfo("s1", kind, 10, {"max_length": 5}), FeatureInfo("s2", kind, 4, {"max_length": 3})]
        if getattr(cls, "uses_inputs", False):  # s1's candidate shares its vocabulary, s2's has its own (7 ids)
            feats = [FeatureInfo("s1", kind, 10, {"max_length": 5, "target": 0, "target_cardinality": 10, "shared": True}),
                     FeatureInfo("s2", kind, 4, {"max_length": 3, "target": 1, "target_cardinality": 7, "shared": False})]
        lengths = torch.randint(0, 6, (n, 2)).clamp_max(torch.tensor([5, 3]))
        lengths[0] = torch.tensor([5, 3])  # one row of full lists
        ids = torch.stack([torch.randint(0, 10, (n, 5)), torch.randint(0, 4, (n, 5))], 1)
        pad = torch.tensor([10, 4])[None, :, None]
        x = torch.where(torch.arange(5)[None, None, :] < lengths[:, :, None], ids, pad)
    elif kind == "text":  # one text feature: 6 hashed n-gram ids in [1, 50), padding id = 50
        feats = [FeatureInfo("t1", kind, 50, {"max_length": 6, "ngrams": 2})]
        lengths = torch.randint(0, 7, (n, 1))
        lengths[0] = 6
        x = torch.where(torch.arange(6)[None, None, :] < lengths[:, :, None], torch.randint(1, 50, (n, 1, 6)), 50)
    else:
        raise AssertionError(f"{name}: check_encoder knows no sample input for kind '{kind}'")
    enc = cls(feats, **params)
    inputs = {kind: x, "categorical": torch.stack([torch.randint(0, 10, (n,)), torch.randint(0, 7, (n,))], 1)}
    out = enc(x, inputs) if getattr(cls, "uses_inputs", False) else enc(x)
    assert tuple(out.shape) == (n, enc.output_dim), f"{name}: output {tuple(out.shape)}, expected ({n}, {enc.output_dim})"
    if out.requires_grad:
        out.float().sum().backward()
    for pname, p in enc.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
    if getattr(cls, "has_fields", False):  # the field view: [batch, n_fields, field_dim], the same values as forward
        with torch.no_grad():
            flat, fields = enc.encode(x)
            names = list(enc.field_names)
            assert tuple(fields.shape) == (n, len(names), enc.field_dim), \
                f"{name}: fields {tuple(fields.shape)}, expected ({n}, {len(names)}, field_dim={enc.field_dim})"
            assert torch.allclose(flat, enc(x)), f"{name}: encode(x)[0] differs from forward(x)"
            cols = list(enc.field_columns())
            assert len(cols) == enc.output_dim and set(cols) <= set(range(len(names))), \
                f"{name}: field_columns() must give a field index in [0, {len(names)}) for each of {enc.output_dim} columns"
    return enc


def check_interaction(cls: type[Interaction], **params: Any) -> Interaction:
    """Output ``[batch, output_dim]`` from a flat vector and a field view (4 fields ``f0``-``f3`` of width 3, the
    flat vector field-major, ``field_columns=`` passed with ``uses_field_columns``), gradients reach its
    parameters and its inputs, ``regularization()`` is a finite scalar and ``optimizer_groups()`` names only the
    block's parameters."""
    torch.manual_seed(0)
    name = _name(cls)
    n, n_fields, d = 64, 4, 3
    field_names = [f"f{j}" for j in range(n_fields)]
    if getattr(cls, "uses_field_columns", False):
        params = {"field_columns": [j for j in range(n_fields) for _ in range(d)], **params}
    block = cls(n_fields * d, field_names, d, **params)
    fields = torch.randn(n, n_fields, d, requires_grad=True)
    x = fields.flatten(1)
    out = block(x, fields if getattr(cls, "uses_fields", True) else None)
    assert tuple(out.shape) == (n, block.output_dim), f"{name}: output {tuple(out.shape)}, expected ({n}, {block.output_dim})"
    out.sum().backward()
    for pname, p in block.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
    assert fields.grad is not None and fields.grad.abs().sum() > 0, f"{name}: no gradient reaches its inputs"
    reg = block.regularization()
    assert isinstance(reg, torch.Tensor) and reg.dim() == 0 and torch.isfinite(reg), (
        f"{name}.regularization must return a finite scalar tensor, got {reg!r}")
    own = {id(p) for p in block.parameters()}
    for group, options in block.optimizer_groups():
        assert all(id(p) in own for p in group) and isinstance(options, dict), (
            f"{name}.optimizer_groups must give (parameters of the block, options dict) pairs")
    return block


def check_logger(cls: type[Logger], **params: Any) -> Logger:
    """Built with ``params`` it is a :class:`recmtl.Logger` whose ``@hookimpl`` methods are life-cycle hooks of
    ``recmtl.hookspecs`` with the hooks' argument names (pluggy validates them on registration), and ``close()``
    works on a logger that saw no run."""
    import pluggy

    from recmtl import hookspecs
    name = _name(cls)
    logger = cls(**params)
    assert isinstance(logger, Logger), f"{name}: not a recmtl.Logger"
    pm = pluggy.PluginManager("recmtl")
    pm.add_hookspecs(hookspecs)
    pm.register(logger)  # raises PluginValidationError for an unknown hook or argument
    hooks = [h.name for h in pm.get_hookcallers(logger) or []]
    assert hooks, f"{name}: implements no life-cycle hook"
    assert not [h for h in hooks if h.startswith("recmtl_register_")], f"{name}: a logger receives run hooks only"
    pm.unregister(logger)
    logger.close()
    return logger


def check_registered(kind: str, name: str, factory: Any) -> None:
    """Run the contract check matching ``kind`` on a registered plugin with its default parameters."""
    {"tower": check_tower, "head": check_head, "balancer": check_balancer, "encoder": check_encoder,
     "interaction": check_interaction, "logger": check_logger}[kind](factory)


__all__ = ["check_balancer", "check_encoder", "check_head", "check_interaction", "check_logger", "check_registered",
           "check_tower", "sample_features", "sample_inputs"]
