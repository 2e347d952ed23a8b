"""Behaviour of the built-in towers beyond the shared contract: collapse guard, diagnostics conventions,
soft sharing's penalty, DSelect-k's sparsity, AITM's funnel transfer and calibrator, STEM's embeddings."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import SMALL_TOWERS
from torch import nn

from recmtl.layers import Experts
from recmtl.registry import load_registry
from recmtl.testing import TASKS, sample_features, sample_inputs
from recmtl.training.model import sparse_parameters
from recmtl_plugins.towers.aitm import AITM
from recmtl_plugins.towers.cross_stitch import CrossStitch
from recmtl_plugins.towers.dselect_k import DSelectK, smooth_step
from recmtl_plugins.towers.soft_sharing import SoftSharing
from recmtl_plugins.towers.stem import STEM

REGISTRY = load_registry()
MOE = ["mmoe", "omoe", "cgc", "ple", "hmoe", "dselect_k", "stem"]
SMALL = {"expert_units": [8]}


def build(name: str, **params):
    cls = REGISTRY.get("tower", name)
    if getattr(cls, "uses_inputs", False):
        params.setdefault("features", sample_features())
    return cls(6, list(TASKS), **params)


def call(tower, x: torch.Tensor):
    return tower(x, sample_inputs(sample_features(), x.shape[0])) if tower.uses_inputs else tower(x)


@pytest.mark.parametrize("name", MOE)
def test_experts_start_different(name):
    torch.manual_seed(0)
    tower = build(name, **SMALL)
    experts = [m for m in tower.modules() if isinstance(m, Experts) and m.num_experts > 1]
    assert experts, f"{name} has no batched experts"
    x = torch.randn(16, 6)
    for m in experts:
        inp = x if m.layer_weights(0).shape[1] == 6 else torch.randn(m.num_experts, 16, m.layer_weights(0).shape[1])
        out = m(inp).flatten(1)  # one row per expert
        dist = torch.cdist(out, out) + torch.eye(m.num_experts) * 1e9
        assert dist.min() > 1e-3, f"{name}: two experts compute the same function at init"


def test_identical_experts_are_refused():
    m = Experts(4, 3, [5])
    with torch.no_grad():
        w = m.layer_weights(0)
        w[1] = w[0]  # a view: writes the shared first-layer matrix
    with pytest.raises(ValueError, match="identical"):
        m.check_distinct()


@pytest.mark.parametrize("name", MOE + ["aitm"])
def test_gate_diagnostics_follow_the_conventions(name):
    torch.manual_seed(0)
    tower = build(name, **({} if name == "aitm" else SMALL)).eval()
    tower.train()
    call(tower, torch.randn(8, 6))
    assert tower.diagnostics() == {}, "training passes must not be counted"
    tower.eval()
    with torch.no_grad():
        call(tower, torch.randn(40, 6))
        call(tower, torch.randn(24, 6))
    d = tower.diagnostics()
    assert set(d) >= {"gate_weights", "gate_entropy", "max_entropy", "expert_utilisation"}
    for gate, weights in d["gate_weights"].items():
        assert math.isclose(sum(weights), 1.0, abs_tol=2e-3), (gate, weights)
        util = d["expert_utilisation"][gate]
        assert len(util) == len(weights) and math.isclose(sum(util), 1.0, abs_tol=1e-3)
        assert all(abs(u * 64 - round(u * 64)) < 0.01 for u in util), "utilisation is a share of the 64 rows"
        limit = d.get("gate_max_entropy", {}).get(gate, d["max_entropy"])
        assert 0 <= d["gate_entropy"][gate] <= limit + 1e-4
        if "expert_names" in d:
            assert len(d["expert_names"][gate]) == len(weights)
    assert tower.diagnostics() == {}, "diagnostics() forgets what it reported"


def test_gate_names_per_tower():
    for name, gates in [("mmoe", set(TASKS)), ("omoe", {"shared"}), ("cgc", set(TASKS)),
                        ("ple", {"level1/task_a", "level1/task_b", "level1/shared", "level2/task_a", "level2/task_b"}),
                        ("aitm", {"task_b"})]:
        tower = build(name).eval()
        call(tower, torch.randn(4, 6))
        assert set(tower.diagnostics()["gate_weights"]) == gates, name
    cgc = build("cgc", num_task_experts=2, num_shared_experts=3).eval()
    cgc(torch.randn(4, 6))
    assert cgc.diagnostics()["expert_names"]["task_a"] == ["task_a/0", "task_a/1", "shared/0", "shared/1", "shared/2"]


def test_hmoe_weights_are_group_times_inner():
    tower = build("hmoe", num_groups=3, experts_per_group=2, **SMALL).eval()
    x = torch.randn(10, 6)
    weights, group = tower.gate_weights(x)
    assert weights.shape == (10, 2, 6) and group.shape == (10, 2, 3)
    assert torch.allclose(weights.view(10, 2, 3, 2).sum(-1), group, atol=1e-6)
    tower(x)
    d = tower.diagnostics()
    assert len(d["group_weights"]["task_a"]) == 3 and math.isclose(sum(d["group_weights"]["task_a"]), 1, abs_tol=2e-3)


def test_cross_stitch_matrices():
    tower = CrossStitch(6, ["a", "b", "c"], units=[8, 4], init_self=0.8)
    d = tower.diagnostics()["matrices"]
    assert list(d) == ["cross_stitch_1", "cross_stitch_2"]
    m = d["cross_stitch_1"]
    assert m["rows"] == m["cols"] == ["a", "b", "c"]
    assert m["values"] == [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]
    # init_self = 1: the columns do not mix, task a's output ignores task b's column
    alone = CrossStitch(6, ["a", "b"], units=[8, 4], init_self=1.0)
    alone(torch.randn(5, 6))["a"].sum().backward()
    b_grad = alone.columns[1].weights[0].grad.view(8, 2, 4)[:, 1]
    assert torch.count_nonzero(b_grad) == 0


def test_soft_sharing_penalty_hand_computed_and_pulls_together():
    tower = SoftSharing(3, ["a", "b"], units=[2], penalty=0.5)
    with torch.no_grad():
        for p in tower.parameters():
            p.zero_()
        tower.columns.layer_weights(0)[0].fill_(1.0)  # task a: weights 1, task b: 0, biases 0
        tower.columns.biases[0][1].fill_(2.0)  # task b: biases 2
    # weights: 6 entries differ by 1 -> each task 0.5 from the mean: 2 * 6 * 0.25 = 3; biases: 2 * 2 * 1 = 4
    assert tower.distance().item() == pytest.approx(7.0)
    assert tower.regularization({}).item() == pytest.approx(3.5)
    assert tower.diagnostics() == {"parameter_distance": 7.0}
    # gradient steps on the penalty alone move the columns towards each other
    torch.manual_seed(0)
    tower = SoftSharing(6, ["a", "b"], units=[8, 4], penalty=1.0)
    before = tower.distance().item()
    assert before > 0 and tower.regularization({}).item() > 0
    opt = torch.optim.SGD(tower.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        tower.regularization({}).backward()
        opt.step()
    # d penalty / d W_t = 2 (W_t - mean): each SGD step scales every deviation by 1 - 2 * 0.1, the distance by 0.8^2
    assert tower.distance().item() == pytest.approx(before * 0.8 ** 10, rel=1e-4)
    assert SoftSharing(6, ["a", "b"], penalty=0.0).regularization({}).item() == 0


def test_smooth_step_values():
    t = torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.5, 2.0])
    assert smooth_step(t, 1.0).tolist() == pytest.approx([0, 0, 0.5, 0.84375, 1, 1])


def test_dselect_k_selects_k_experts_once_binary():
    tower = DSelectK(6, ["a", "b"], num_experts=8, k=3, expert_units=[4], task_units=[])
    codes = {"a": [1, 4, 6], "b": [0, 7, 2]}  # the experts each selector should pick
    with torch.no_grad():
        tower.z.weight.zero_()
        bias = tower.z.bias.view(2, 3, tower.m)
        for ti, t in enumerate("ab"):
            for i, expert in enumerate(codes[t]):
                for j in range(tower.m):  # bit j of the expert index -> +gamma (S = 1) or -gamma (S = 0)
                    bias[ti, i, j] = 1.0 if (expert >> j) & 1 else -1.0
    gates = tower.gate_weights(torch.randn(20, 6))
    for ti, t in enumerate("ab"):
        nonzero = (gates[:, ti] > 0).sum(-1)
        assert nonzero.tolist() == [3] * 20
        assert sorted(torch.nonzero(gates[0, ti]).flatten().tolist()) == sorted(codes[t])
    assert torch.allclose(gates.sum(-1), torch.ones(20, 2))


def test_dselect_k_entropy_regularisation_moves_towards_k_experts():
    def train(entropy_reg: float) -> float:
        torch.manual_seed(0)
        tower = DSelectK(12, ["a", "b"], num_experts=4, k=2, entropy_reg=entropy_reg, expert_units=[8], task_units=[])
        xs = torch.randn(256, 12)
        ys = xs @ torch.randn(2, 12).T
        heads = nn.ModuleDict({n: nn.Linear(8, 1) for n in "ab"})
        opt = torch.optim.Adam(list(tower.parameters()) + list(heads.parameters()), lr=0.02)
        for _ in range(100):
            opt.zero_grad()
            h = tower(xs)
            loss = sum(((heads[n](h[n]).squeeze(-1) - ys[:, i]) ** 2).mean() for i, n in enumerate("ab"))
            (loss + tower.regularization({})).backward()
            opt.step()
        tower.eval()
        with torch.no_grad():
            tower(xs)
        selected = tower.diagnostics()["selected_experts"]
        return sum(selected.values()) / 2

    free, regularised = train(0.0), train(1.0)
    assert regularised < free and regularised < 2.5, (free, regularised)


def test_aitm_transfers_along_the_task_order_and_calibrates():
    torch.manual_seed(0)
    tower = AITM(6, ["impression", "click", "buy"], units=[8], calibrator_weight=0.5)
    out = tower(torch.randn(5, 6))
    out["impression"].sum().backward()
    later = tower.towers.weights[0].grad.view(6, 3, 8)
    assert torch.count_nonzero(later[:, 1:]) == 0, "the first task receives nothing from later ones"
    tower.zero_grad()
    out = tower(torch.randn(5, 6))
    out["buy"].sum().backward()
    grads = tower.towers.weights[0].grad.view(6, 3, 8)
    assert all(torch.count_nonzero(grads[:, i]) > 0 for i in range(3)), "the last task hears every earlier one"
    scores = {"impression": torch.tensor([0.5, 0.2]), "click": torch.tensor([0.7, 0.1]), "buy": torch.tensor([0.1, 0.3])}
    # 0.5 * (mean(relu([0.2, -0.1])) + mean(relu([-0.6, 0.2]))) = 0.5 * (0.1 + 0.1)
    assert tower.regularization(scores).item() == pytest.approx(0.1)
    assert AITM(6, ["a", "b"]).regularization(scores | {"a": scores["click"], "b": scores["buy"]}).item() == 0


def test_stem_owns_sparse_task_embeddings_behind_a_stop_gradient():
    torch.manual_seed(0)
    feats = sample_features()
    tower = STEM(6, ["a", "b"], features=feats, embedding_dim=3, expert_units=[8])
    assert set(tower.embeddings) == {"a", "b"}
    assert all(t.sparse and t.num_embeddings == 13 and t.embedding_dim == 3 for t in tower.embeddings.values())
    assert {id(t.weight) for t in tower.embeddings.values()} <= {id(p) for p in sparse_parameters(tower)}
    inputs = sample_inputs(feats, 7)
    out = tower(torch.randn(7, 6), inputs)
    out["a"].sum().backward()
    assert tower.embeddings["a"].weight.grad is not None
    b_grad = tower.embeddings["b"].weight.grad
    assert b_grad is None or torch.count_nonzero(b_grad.coalesce().values()) == 0, \
        "task a's loss must not train task b's embeddings"
    b_experts = tower.task_experts.weights[0].grad.view(-1, 2, 8)[:, 1]
    assert torch.count_nonzero(b_experts) == 0, "nor task b's experts"
    with pytest.raises(ValueError, match="categorical"):
        STEM(6, ["a", "b"], features={"dense": feats["dense"]})


# ---- every tower through the CLI on a small funnel ------------------------------------------------------------

@pytest.fixture(scope="module")
def small_funnel(tmp_path_factory):
    from recmtl.data.synthetic import funnel
    out = tmp_path_factory.mktemp("towers_funnel")
    funnel(out, rows=4000, seed=5, categorical=6, dense=4, cardinality=50)
    return out


def test_every_builtin_tower_is_in_the_cli_test():
    assert set(SMALL_TOWERS) == set(REGISTRY.names("tower")) - {"independent"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL_TOWERS))
def test_tower_trains_through_the_cli(name, small_funnel, tmp_path, cli):
    import json

    from conftest import write_config
    cfg = write_config(tmp_path / "c.yaml", small_funnel, tower={"name": name, **SMALL_TOWERS[name]},
                       train={"batch_size": 256, "epochs": 1, "progress": False, "threads": 1})
    res = cli("train", cfg, "--out", tmp_path / "run")
    assert res.code == 0, res
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for task in ("click", "conversion"):
        assert math.isfinite(metrics["history"][0]["train_loss"][task])
        assert 0 < metrics["validation"][task]["auc"] < 1
    diag = metrics["history"][0].get("diagnostics", {})
    if name in MOE:
        assert set(diag["gate_weights"]) and all(math.isclose(sum(w), 1, abs_tol=2e-3) for w in diag["gate_weights"].values())
    if name == "cross_stitch":
        assert len(diag["matrices"]["cross_stitch_1"]["values"]) == 2
    # export traces the model (STEM's own embedding tables too, the MoE towers' export layout) and checks parity
    res = cli("export", tmp_path / "run", "-o", tmp_path / "model.onnx")
    assert res.code == 0 and (tmp_path / "model.onnx").is_file(), res


def test_export_layout_of_experts_and_mixing_equals_training_layout(monkeypatch):
    """Under ONNX export, Experts and mix() take a layout onnxruntime runs faster; same numbers."""
    from recmtl.layers import Experts, mix
    torch.manual_seed(0)
    experts = Experts(10, 3, [8, 4]).eval()
    x = torch.randn(5, 10)
    gates = torch.softmax(torch.randn(5, 2, 3), -1)
    gate = torch.softmax(torch.randn(5, 3), -1)
    with torch.no_grad():
        h = experts(x)
        train = (h, mix(gates, h), mix(gate, h))
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
        h2 = experts(x)
        export = (h2, mix(gates, h2), mix(gate, h2))
    assert [t.shape for t in export] == [(3, 5, 4), (2, 5, 4), (5, 4)]
    for a, b in zip(train, export):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_soft_sharing_penalty_is_part_of_training(small_funnel, tmp_path, cli):
    """train.py adds the tower's regularization: a large penalty ends with much closer task columns."""
    import json

    from conftest import write_config
    distance = {}
    for penalty in (0.0, 1.0):
        cfg = write_config(tmp_path / f"c{penalty}.yaml", small_funnel,
                           tower={"name": "soft_sharing", "units": [16, 8], "penalty": penalty},
                           train={"batch_size": 256, "epochs": 1, "progress": False, "threads": 1})
        assert cli("train", cfg, "--out", tmp_path / f"run{penalty}").code == 0
        metrics = json.loads((tmp_path / f"run{penalty}" / "metrics.json").read_text())
        distance[penalty] = metrics["history"][0]["diagnostics"]["parameter_distance"]
    assert distance[1.0] < 0.2 * distance[0.0], distance


def test_experts_pad_input_width_same_outputs_gradients_and_parameters(monkeypatch):
    """fp32 on CPU: a shared input 13 wide is zero-padded to 16 (with the first weight's rows) at run time; the
    outputs and gradients equal the unpadded ones to fp32 rounding, and parameters/state dict keep their shapes."""
    from recmtl import layers
    torch.manual_seed(0)
    experts = Experts(13, 3, [8, 4]).train()
    shapes = {k: v.shape for k, v in experts.state_dict().items()}
    x = torch.randn(32, 13)
    assert layers.input_pad(x) == 3 and layers.input_pad(torch.randn(32, 16)) == 0
    results = []
    for multiple in (0, layers.EXPERTS_PAD_MULTIPLE):
        monkeypatch.setattr(layers, "EXPERTS_PAD_MULTIPLE", multiple)
        xi = x.clone().requires_grad_()
        out = experts(xi)
        out.square().sum().backward()
        results.append([out.detach(), xi.grad] + [p.grad.clone() for p in experts.parameters()])
        experts.zero_grad(set_to_none=True)
    for a, b in zip(*results):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert {k: v.shape for k, v in experts.state_dict().items()} == shapes
    assert experts.weights[0].shape == (13, 24)


def test_experts_pad_only_in_plain_fp32(monkeypatch):
    """No pad under autocast, for other dtypes, when turned off, or in ONNX export."""
    from recmtl import layers
    x = torch.randn(4, 13)
    assert layers.input_pad(x) == 3 and layers.input_pad(torch.randn(4, 14)) == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layers.input_pad(x) == 0
    assert layers.input_pad(x.double()) == 0 and layers.input_pad(x.bfloat16()) == 0
    monkeypatch.setattr(layers, "EXPERTS_PAD_MULTIPLE", 0)
    assert layers.input_pad(x) == 0
    monkeypatch.setattr(layers, "EXPERTS_PAD_MULTIPLE", 16)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert layers.input_pad(x) == 0


def test_experts_export_graph_has_no_pad():
    """The exported graph of an odd-width Experts is the unpadded one (no Pad, the Gemm's weight 13 rows) and
    onnxruntime gives the torch outputs."""
    import io

    import numpy as np
    import onnx
    import onnxruntime as ort
    torch.manual_seed(0)
    experts = Experts(13, 3, [8, 4]).eval()
    x = torch.randn(5, 13)
    buf = io.BytesIO()
    torch.onnx.export(experts, (x,), buf, input_names=["x"], output_names=["h"], opset_version=17, dynamo=False)
    graph = onnx.load_from_string(buf.getvalue()).graph
    assert "Pad" not in {n.op_type for n in graph.node}
    assert (13, 24) in {tuple(t.dims) for t in graph.initializer}
    got = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, experts(x).numpy(), rtol=1e-5, atol=1e-6)


def _onednn_bf16() -> bool:
    try:
        return hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


@pytest.mark.skipif(not _onednn_bf16(), reason="no oneDNN bf16 linear on this CPU / build")
def test_experts_bf16_fused_first_layer_as_close_to_fp32_as_autocast(monkeypatch):
    """Under CPU bf16 autocast the first expert layer is one fused GEMM (bias, ReLU); its outputs and gradients are
    as close to fp32's as the unfused autocast path (within 10 % of that path's error, and 10 % of fp32's largest entry)
    and come back in fp32 for the fp32 parameters and input; without autocast it is not used."""
    from recmtl import layers
    monkeypatch.setattr(layers, "FUSED_BF16", True)  # on by default only where the CPU has AMX tiles
    torch.manual_seed(0)
    experts = Experts(29, 3, [64, 16]).train()
    x0 = torch.randn(256, 29)
    assert not layers.fused_relu_linear_available(x0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layers.fused_relu_linear_available(x0)
        monkeypatch.setattr(layers, "FUSED_BF16", False)
        assert not layers.fused_relu_linear_available(x0)
        monkeypatch.setattr(layers, "FUSED_BF16", True)

    def run(bf16: bool) -> list[torch.Tensor]:
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = experts(x)
        out.float().square().sum().backward()
        got = [out.detach().float(), x.grad] + [p.grad.clone() for p in experts.parameters()]
        experts.zero_grad(set_to_none=True)
        return got

    ref = run(False)
    fused = run(True)
    monkeypatch.setattr(layers, "fused_relu_linear_available", lambda x: False)
    plain = run(True)
    for r, a, b in zip(ref, fused, plain):
        assert a.dtype == torch.float32 and a.shape == r.shape
        scale = r.abs().max()
        err_fused, err_plain = (a - r).abs().max() / scale, (b - r).abs().max() / scale
        assert err_fused <= 1.1 * err_plain + 1e-3 and err_fused < 0.1, (tuple(r.shape), err_fused, err_plain)
