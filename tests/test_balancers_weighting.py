"""The loss-weighting balancers' math on small hand-computed cases, the trainer's balance.jsonl, and each
balancer training MMoE on funnel data through the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_config
from torch import nn

from recmtl.registry import load_registry
from recmtl_plugins.balancers.dbmtl import DualBalancing
from recmtl_plugins.balancers.dwa import DynamicWeightAverage
from recmtl_plugins.balancers.famo import FAMO
from recmtl_plugins.balancers.gradnorm import GradNorm, last_shared_layer
from recmtl_plugins.balancers.rlw import RandomLossWeighting

TASKS = ["a", "b"]
REGISTRY = load_registry()


def linear_losses(theta: nn.Parameter, values: list[float], slopes: list[list[float]]) -> dict[str, torch.Tensor]:
    """Losses with the given values and gradients ``slopes[i]`` with respect to ``theta`` (flattened)."""
    offset = theta - theta.detach()
    return {t: v + (torch.tensor(s).view_as(theta) * offset).sum() for t, v, s in zip(TASKS, values, slopes)}


# --- uncertainty -------------------------------------------------------------------------------------

def test_uncertainty_leaves_out_a_task_without_labels():
    """d/ds_t of 0.5 exp(-s_t) L_t + 0.5 s_t is 0.5 even when L_t = 0 (no labelled row): that batch would
    lower s_t (raise the task's weight) with nothing learnt; now s_t gets no gradient from it."""
    bal = REGISTRY.create("balancer", "uncertainty", TASKS, {})
    theta = nn.Parameter(torch.zeros(2))
    losses = linear_losses(theta, [2.0, 1.0], [[1, 0], [0, 1]])
    bal.backward({"a": losses["a"], "b": 0 * losses["b"]}, [theta])
    assert bal.log_vars.grad.tolist() == pytest.approx([0.5 - 0.5 * 2.0, 0.0])
    assert theta.grad.tolist() == pytest.approx([0.5, 0.0])


# --- DWA ---------------------------------------------------------------------------------------------

def test_dwa_weights_follow_the_closed_form():
    dwa = DynamicWeightAverage(TASKS, {}, temperature=2.0)
    theta = nn.Parameter(torch.zeros(2))
    w = dwa.backward(linear_losses(theta, [1.0, 2.0], [[1, 0], [0, 1]]), [theta])
    assert w == {"a": 1.0, "b": 1.0}  # epoch 1: no history
    assert theta.grad.tolist() == [1.0, 1.0]
    dwa.on_epoch_end(0, {"a": 1.0, "b": 2.0})
    assert dwa.current_weights().tolist() == [1.0, 1.0]  # epoch 2: one epoch of history is not enough
    dwa.on_epoch_end(1, {"a": 0.5, "b": 1.8})
    r = [0.5 / 1.0, 1.8 / 2.0]  # a halved its loss, b barely moved: b gets more weight
    expected = [2 * math.exp(ri / 2) / sum(math.exp(rj / 2) for rj in r) for ri in r]
    theta.grad = None
    w = dwa.backward(linear_losses(theta, [0.4, 1.7], [[1, 0], [0, 1]]), [theta])
    assert [w["a"], w["b"]] == pytest.approx(expected, rel=1e-12)
    assert w["b"] > w["a"] and sum(w.values()) == pytest.approx(2.0)
    assert theta.grad.tolist() == pytest.approx(expected)  # d(sum w_k L_k)/d theta
    dwa.on_epoch_end(2, {"a": 0.45, "b": 0.9})  # only the last two epochs count
    r = [0.45 / 0.5, 0.9 / 1.8]
    expected = [2 * math.exp(ri / 2) / sum(math.exp(rj / 2) for rj in r) for ri in r]
    assert dwa.current_weights().tolist() == pytest.approx(expected, rel=1e-12)
    # the history is part of the state (resume)
    other = DynamicWeightAverage(TASKS, {})
    other.load_state_dict(dwa.state_dict())
    assert other.current_weights().tolist() == pytest.approx(expected, rel=1e-12)


# --- RLW ---------------------------------------------------------------------------------------------

def test_rlw_weights_are_k_softmax_of_a_seeded_normal_draw():
    names = ["a", "b", "c"]
    rlw = RandomLossWeighting(names, {}, seed=7)
    gen = torch.Generator().manual_seed(7)
    theta = nn.Parameter(torch.zeros(3))
    seen = []
    for _ in range(5):
        theta.grad = None
        losses = {t: (theta[i] * (i + 1)).sum() + 1.0 for i, t in enumerate(names)}
        w = rlw.backward(losses, [theta])
        expected = 3 * torch.softmax(torch.randn(3, generator=gen, dtype=torch.float64), 0)
        assert [w[t] for t in names] == pytest.approx(expected.tolist(), rel=1e-12)
        assert sum(w.values()) == pytest.approx(3.0)
        assert theta.grad.tolist() == pytest.approx([w["a"] * 1, w["b"] * 2, w["c"] * 3], rel=1e-6)
        seen.append(tuple(w.values()))
    assert len(set(seen)) == 5  # a fresh draw every step
    again = RandomLossWeighting(names, {}, seed=7)
    assert [tuple(again.sample().tolist()) for _ in range(5)] == seen
    assert RandomLossWeighting(names, {}, seed=8).sample().tolist() != pytest.approx(list(seen[0]))


def test_rlw_seed_comes_from_the_global_rng_and_resumes():
    torch.manual_seed(1)
    first = RandomLossWeighting(TASKS, {}).sample().tolist()
    torch.manual_seed(1)
    assert RandomLossWeighting(TASKS, {}).sample().tolist() == first
    rlw = RandomLossWeighting(TASKS, {}, seed=3)
    rlw.sample()
    resumed = RandomLossWeighting(TASKS, {}, seed=99)
    resumed.load_state_dict(rlw.state_dict())
    assert resumed.sample().tolist() == rlw.sample().tolist()


def test_rlw_dirichlet_weights_sum_to_k():
    rlw = RandomLossWeighting(["a", "b", "c", "d"], {}, distribution="dirichlet", concentration=0.5, seed=0)
    draws = torch.stack([rlw.sample() for _ in range(2000)])
    assert torch.allclose(draws.sum(1), torch.full((2000,), 4.0, dtype=torch.float64))
    assert (draws > 0).all()
    assert draws.mean(0).tolist() == pytest.approx([1.0] * 4, abs=0.1)  # symmetric Dirichlet: mean 1/K (x K)
    with pytest.raises(ValueError, match="distribution"):
        RandomLossWeighting(TASKS, {}, distribution="uniform")


# --- GradNorm ----------------------------------------------------------------------------------------

def test_gradnorm_picks_the_last_shared_weight_matrix():
    first, second = nn.Linear(3, 4), nn.Linear(4, 2)
    params = list(first.parameters()) + list(second.parameters())
    assert last_shared_layer(params) == [second.weight]
    assert last_shared_layer([second.bias]) == [second.bias]


def test_gradnorm_moves_weight_to_the_slower_task():
    gn = GradNorm(TASKS, {}, alpha=1.5)
    W = nn.Parameter(torch.zeros(1, 2))
    slopes = [[1.0, 1.0], [1.0, 1.0]]  # equal gradient norms n = sqrt(2) on W
    n = math.sqrt(2)
    opt = torch.optim.SGD(list(gn.parameters()), lr=0.05)
    # step 0 sets L(0) = (1, 1): every r_i = 1, gradient norms already equal -> no pull
    w = gn.backward(linear_losses(W, [1.0, 1.0], slopes), [W])
    assert w == {"a": 1.0, "b": 1.0}
    assert gn.task_weights.grad.tolist() == [0.0, 0.0]
    assert W.grad.tolist() == [[2.0, 2.0]]  # sum_i w_i dL_i/dW
    # task a trains faster: L/L(0) = (0.5, 1.0) -> r = (2/3, 4/3); targets G_bar * r^1.5 = (0.544 n, 1.540 n)
    # G = (n, n): a is above its target, b below -> dL_grad/dw = (n * sign(n - 0.544 n), n * sign(n - 1.540 n))
    W.grad = None
    gn.backward(linear_losses(W, [0.5, 1.0], slopes), [W])
    assert gn.task_weights.grad.tolist() == pytest.approx([n, -n])
    assert W.grad.tolist() == [[2.0, 2.0]]  # the network's gradient does not see L_grad
    history = []
    for _ in range(20):
        opt.step()
        opt.zero_grad()
        W.grad = None
        w = gn.backward(linear_losses(W, [0.5, 1.0], slopes), [W])
        history.append(w)
        assert sum(w.values()) == pytest.approx(2.0)  # renormalised to the number of tasks
    b = [h["b"] for h in history]
    assert b[:7] == sorted(b[:7]) and b[6] > 1.4  # b's weight grows by lr * 2n per step...
    # ...until G_a = w_a n meets its target G_bar r_a^1.5 = n (2/3)^1.5 (G_bar = n while sum w = 2):
    # w = ((2/3)^1.5, 2 - (2/3)^1.5) = (0.544, 1.456); SGD then hovers around it
    target_a = (2 / 3) ** 1.5
    assert all(abs(h["a"] - target_a) < 0.08 for h in history[7:])


def test_gradnorm_weight_gradient_comes_only_from_the_gradnorm_loss():
    gn = GradNorm(TASKS, {}, alpha=0.0)  # alpha 0: target = mean gradient norm, whatever the losses
    W = nn.Parameter(torch.zeros(1, 2))
    gn.backward(linear_losses(W, [3.0, 1.0], [[3.0, 4.0], [1.0, 0.0]]), [W])  # norms 5 and 1
    # G = (5, 1), G_bar = 3: d|G_a - 3|/dw_a = 5, d|G_b - 3|/dw_b = -1 (no trace of the losses 3 and 1)
    assert gn.task_weights.grad.tolist() == pytest.approx([5.0, -1.0])
    assert W.grad.tolist() == [[4.0, 4.0]]


# --- DB-MTL ------------------------------------------------------------------------------------------

def exp_losses(theta: nn.Parameter, heads: nn.Parameter, a: list[float], b: list[float]) -> dict[str, torch.Tensor]:
    """L_a = exp(theta . a + heads[0]), L_b = 3 exp(theta . b + heads[1]): grad log L = a, b on theta, 1 on heads."""
    return {"a": torch.exp(theta @ torch.tensor(a) + heads[0]), "b": 3 * torch.exp(theta @ torch.tensor(b) + heads[1])}


def test_dbmtl_first_steps_match_the_hand_computation():
    db = DualBalancing(TASKS, {}, beta=0.9, beta_sigma=0.0)
    theta = nn.Parameter(torch.tensor([0.1, -0.2]))
    heads = nn.Parameter(torch.zeros(2))
    a, b = [3.0, 4.0], [1.0, 0.0]  # grad log L: norms 5 and 1
    w = db.backward(exp_losses(theta, heads, a, b), [theta])
    # h = 0.1 * g (EMA from zero); norms 0.5, 0.1; alpha = max / norm = (1, 5)
    assert [w["a"], w["b"]] == pytest.approx([1.0, 5.0], rel=1e-6)
    assert theta.grad.tolist() == pytest.approx([0.1 * 3 + 5 * 0.1 * 1, 0.1 * 4 + 0], rel=1e-5)
    assert heads.grad.tolist() == pytest.approx([1.0, 1.0], rel=1e-6)  # task-specific: grad of sum log L
    # second step, new gradients: h_a = 0.9 * 0.1 a + 0.1 a2, h_b = 0.9 * 0.1 b + 0.1 b2
    a2, b2 = [0.0, 2.0], [0.0, 1.0]
    theta.grad = heads.grad = None
    w = db.backward(exp_losses(theta, heads, a2, b2), [theta])
    h_a = 0.09 * torch.tensor(a) + 0.1 * torch.tensor(a2)
    h_b = 0.09 * torch.tensor(b) + 0.1 * torch.tensor(b2)
    top = max(h_a.norm(), h_b.norm())
    expected = top / h_a.norm() * h_a + top / h_b.norm() * h_b
    assert theta.grad.tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert [w["a"], w["b"]] == pytest.approx([float(top / h_a.norm()), float(top / h_b.norm())], rel=1e-5)


def test_dbmtl_beta_decays_with_beta_sigma_and_state_resumes():
    db = DualBalancing(TASKS, {}, beta=0.8, beta_sigma=0.5)
    theta, heads = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    a, b = [1.0, 0.0], [0.0, 2.0]
    db.backward(exp_losses(theta, heads, a, b), [theta])  # beta_1 = 0.8: h = 0.2 g
    resumed = DualBalancing(TASKS, {}, beta=0.8, beta_sigma=0.5)
    resumed.load_state_dict(db.state_dict())
    theta.grad = None
    resumed.backward(exp_losses(theta, heads, a, b), [theta])
    beta2 = 0.8 / math.sqrt(2)
    scale = beta2 * 0.2 + (1 - beta2)  # h_k = scale * g_k; norms scale*1, scale*2 -> alpha = (2, 1)
    assert theta.grad.tolist() == pytest.approx([2 * scale, 2 * scale], rel=1e-5)


def test_dbmtl_leaves_out_a_task_without_labels():
    """A task with no labelled row (loss 0, zero gradient) keeps its gradient average and adds nothing; before,
    its shrunken average was scaled back up to the largest norm and pushed theta along its old direction."""
    db = DualBalancing(TASKS, {}, beta=0.9)
    theta, heads = nn.Parameter(torch.tensor([0.1, -0.2])), nn.Parameter(torch.zeros(2))
    a, b = [3.0, 4.0], [1.0, 0.0]
    db.backward(exp_losses(theta, heads, a, b), [theta])
    ema = db.grad_ema.clone()
    theta.grad = heads.grad = None
    losses = exp_losses(theta, heads, a, b)
    w = db.backward({"a": losses["a"], "b": 0 * losses["b"]}, [theta])
    assert db.grad_ema[1].tolist() == ema[1].tolist()  # b's average untouched
    h_a = 0.9 * ema[0] + 0.1 * torch.tensor(a)
    assert w["b"] == 0.0 and w["a"] == pytest.approx(1.0, rel=1e-6)  # alone: scaled to its own norm
    assert theta.grad.tolist() == pytest.approx(h_a.tolist(), rel=1e-5)


def test_gradnorm_leaves_out_a_task_without_labels():
    gn = GradNorm(["a", "b", "c"], {}, alpha=1.5)
    W = nn.Parameter(torch.zeros(1, 2))
    slopes = torch.tensor([[1.0, 1.0], [1.0, 1.0], [3.0, 4.0]])

    def losses(values: list[float], present: list[bool]) -> dict[str, torch.Tensor]:
        offset = (W - W.detach()).flatten()
        return {t: (v + slopes[i] @ offset) * float(p) for i, (t, v, p) in enumerate(zip("abc", values, present))}

    gn.backward(losses([1.0, 1.0, 0.0], [True, True, False]), [W])  # c has no labels on the first step
    assert gn.initial_losses.tolist() == [1.0, 1.0, 0.0]  # L_c(0) not taken from its zero loss
    assert gn.task_weights.grad.tolist() == [0.0, 0.0, 0.0]  # a and b alone: equal norms and rates, no pull
    gn.backward(losses([0.5, 1.0, 2.0], [True, True, True]), [W])
    assert gn.initial_losses.tolist() == [1.0, 1.0, 2.0]  # c's first labelled step
    W.grad = None
    gn.backward(losses([0.5, 1.0, 0.0], [True, True, False]), [W])
    # as the two-task case of test_gradnorm_moves_weight_to_the_slower_task (weights 1 after renormalising)
    n = math.sqrt(2)
    assert gn.task_weights.grad.tolist() == pytest.approx([n, -n, 0.0], rel=1e-5)


@pytest.mark.parametrize("name", ["gradnorm", "dbmtl"])
def test_fp16_loss_scale_is_divided_out(name):
    """With fp16 the losses' gradients carry the loss scale S and the optimiser step divides the network's
    gradients by S (a balancer's own parameters it leaves as they are): scaling by S and dividing out must give
    the fp32 step. Before, gradnorm's weight gradient came out S times too large, and dbmtl's averages mixed the
    units of every loss scale they had seen."""
    from recmtl.training.device import _ScaleGrad  # what Precision.scale_losses wraps the losses in

    def run(scales: list[float]) -> list[list[float]]:
        bal = REGISTRY.create("balancer", name, TASKS, {})
        out = []
        for k, scale in enumerate(scales):  # GradScaler halves the scale on an overflow and doubles it later
            bal.grad_scale = scale
            W = nn.Parameter(torch.tensor([[0.3, -0.2]]))
            values, slopes = [2.0 - 0.3 * k, 1.0 - 0.1 * k], [[1.0 + k, 0.5], [0.2, 2.0 - k]]
            losses = linear_losses(W, values, slopes)
            bal.backward({t: _ScaleGrad.apply(v, torch.tensor(scale)) for t, v in losses.items()}, [W])  # as fp16
            own = [p.grad.flatten().tolist() for p in bal.parameters()]
            out.append([*(W.grad.flatten() / scale).tolist(), *(x for g in own for x in g)])
        return out

    for fp32, fp16 in zip(run([1.0, 1.0, 1.0]), run([1024.0, 512.0, 1024.0])):
        assert fp16 == pytest.approx(fp32, rel=1e-5)


# --- FAMO --------------------------------------------------------------------------------------------

def test_famo_weights_and_logit_update_follow_the_formula():
    famo = FAMO(TASKS, {}, w_lr=0.025, gamma=0.01)
    theta = nn.Parameter(torch.zeros(2))
    w = famo.backward(linear_losses(theta, [2.0, 1.0], [[1, 0], [0, 1]]), [theta])
    # z = (1/2, 1/2), c = z_a / 2 + z_b / 1 = 3/4, lambda = z / (c L) = (1/3, 2/3)
    assert [w["a"], w["b"]] == pytest.approx([1 / 3, 2 / 3], rel=1e-6)
    assert theta.grad.tolist() == pytest.approx([1 / 3, 2 / 3], rel=1e-5)
    assert famo.logits.grad is None  # the trainer's optimiser must not move the logits
    # next step: log losses fell by delta = (log 2 - log 1, log 1 - log 0.9); a fell more
    delta = torch.tensor([math.log(2.0), -math.log(0.9)])
    z = torch.tensor([0.5, 0.5])
    d = (torch.diag(z) - torch.outer(z, z)) @ delta  # J_softmax^T delta
    assert d[0] > 0 > d[1]
    theta.grad = None
    w = famo.backward(linear_losses(theta, [1.0, 0.9], [[1, 0], [0, 1]]), [theta])
    # Adam's first step moves each logit by lr * sign(d) (weight decay at w = 0 adds nothing)
    assert famo.logits.detach().tolist() == pytest.approx([-0.025, 0.025], rel=1e-4)
    z = torch.softmax(torch.tensor([-0.025, 0.025]), 0)
    lam = z / torch.tensor([1.0, 0.9])
    lam = lam / lam.sum()
    assert [w["a"], w["b"]] == pytest.approx(lam.tolist(), rel=1e-5)
    assert w["b"] > w["a"]


def test_famo_leaves_out_a_task_without_labels():
    """A task whose loss is 0 (no labelled row) took lambda ~ 1 through its 1 / eps term and stalled the
    others (2e-8 each); now it is left out, and its logit gets no gradient from the batches without it."""
    three = FAMO(["a", "b", "c"], {}, w_lr=0.025, gamma=0.01)
    two = FAMO(TASKS, {}, w_lr=0.025, gamma=0.01)
    for values, slopes in (([2.0, 1.0], [[1, 0], [0, 1]]), ([1.0, 0.9], [[1, 0], [0, 1]])):
        theta3, theta2 = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
        losses = linear_losses(theta3, values, slopes)
        w3 = three.backward({**losses, "c": 0 * theta3.sum()}, [theta3])
        w2 = two.backward(linear_losses(theta2, values, slopes), [theta2])
        assert w3["c"] == 0.0 and [w3["a"], w3["b"]] == pytest.approx([w2["a"], w2["b"]], rel=1e-5)
        assert theta3.grad.tolist() == pytest.approx(theta2.grad.tolist(), rel=1e-5)
    # the update between the two steps: Adam's first step moves a and b by -/+ lr as with two tasks, c not at all
    assert three.logits.detach().tolist() == pytest.approx([-0.025, 0.025, 0.0], rel=1e-4, abs=1e-9)
    theta = nn.Parameter(torch.zeros(2))
    w = three.backward({"a": 0 * theta.sum(), "b": 0 * theta.sum(), "c": 0 * theta.sum()}, [theta])
    assert w == {"a": 0.0, "b": 0.0, "c": 0.0} and theta.grad.tolist() == [0.0, 0.0]


def test_famo_docstring_says_when_the_others_take_the_new_loss():
    """The paper, the official code and LibMTL re-evaluate the same batch after the step; recmtl uses the next
    batch. The docstring used to say LibMTL did the same as recmtl."""
    import recmtl_plugins.balancers.famo as famo
    doc = " ".join(famo.__doc__.split())
    assert "LibMTL's trainer all re-evaluate the same batch right after the optimiser step" in doc
    assert "like LibMTL" not in doc


def test_famo_state_resumes():
    famo = FAMO(TASKS, {})
    theta = nn.Parameter(torch.zeros(2))
    for values in ([2.0, 1.0], [1.5, 0.95], [1.2, 0.9]):
        famo.backward(linear_losses(theta, values, [[1, 0], [0, 1]]), [theta])
    resumed = FAMO(TASKS, {})
    resumed.load_state_dict(famo.state_dict())
    nxt = [1.0, 0.88]
    assert resumed.backward(linear_losses(theta, nxt, [[1, 0], [0, 1]]), [theta]) == pytest.approx(
        famo.backward(linear_losses(theta, nxt, [[1, 0], [0, 1]]), [theta]))


# --- through the CLI ---------------------------------------------------------------------------------

BALANCERS = ["dwa", "rlw", "gradnorm", "dbmtl", "famo"]


def read_balance_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _train(cli, funnel_dir, tmp_path, balancer: str, epochs: int = 1, log_every: int = 5, *extra: str):
    cfg = write_config(tmp_path / "cfg.yaml", funnel_dir, balancer={"name": balancer})
    run = tmp_path / "run"
    r = cli("train", cfg, "--out", run, "--set", f"train.epochs={epochs}", "--set", "train.threads=1",
            "--set", f"train.log_every={log_every}", *extra)
    assert r.code == 0, r
    return run


@pytest.mark.slow
@pytest.mark.parametrize("balancer", BALANCERS)
def test_balancer_trains_mmoe_on_funnel_data(cli, funnel_dir, tmp_path, balancer):
    epochs = 3 if balancer == "dwa" else 1  # DWA's weights start moving in epoch 3
    run = _train(cli, funnel_dir, tmp_path, balancer, epochs)
    metrics = json.loads((run / "metrics.json").read_text())
    history = metrics["history"]
    assert len(history) == epochs
    assert all(math.isfinite(v) for e in history for v in e["train_loss"].values())
    assert metrics["validation"]["click"]["auc"] > 0.6 and metrics["validation"]["conversion"]["auc"] > 0.6
    assert set(history[-1]["weights"]) == {"click", "conversion"}
    lines = read_balance_log(run / "balance.jsonl")
    assert len(lines) >= 2 and [line["step"] for line in lines] == list(range(5, 5 * len(lines) + 1, 5))
    for line in lines:
        assert set(line) == {"epoch", "step", "weights", "grad_norms", "cosine"}
        assert set(line["weights"]) == set(line["grad_norms"]) == {"click", "conversion"}
        assert all(math.isfinite(w) for w in line["weights"].values())
        assert all(n > 0 for n in line["grad_norms"].values())
        assert list(line["cosine"]) == ["click/conversion"] and -1 <= line["cosine"]["click/conversion"] <= 1
    weights = {tuple(line["weights"].values()) for line in lines if line["epoch"] == epochs}
    assert len(weights) == (1 if balancer == "dwa" else len(lines))  # DWA: fixed within an epoch
    if balancer == "dwa":
        assert history[2]["weights"] != {"click": 1.0, "conversion": 1.0}
        assert sum(history[2]["weights"].values()) == pytest.approx(2.0)


@pytest.mark.slow
def test_balance_log_appends_on_resume_and_can_be_disabled(cli, funnel_dir, tmp_path):
    run = _train(cli, funnel_dir, tmp_path, "fixed", 1, 4)
    first = read_balance_log(run / "balance.jsonl")
    assert first and all(line["weights"] == {"click": 1.0, "conversion": 1.0} for line in first)
    cfg = tmp_path / "cfg.yaml"
    r = cli("train", cfg, "--out", run, "--resume", "--set", "train.epochs=2", "--set", "train.threads=1",
            "--set", "train.log_every=4")
    assert r.code == 0, r
    lines = read_balance_log(run / "balance.jsonl")
    assert lines[:len(first)] == first and len(lines) == 2 * len(first)
    steps = [line["step"] for line in lines]
    assert steps == list(range(4, 4 * len(lines) + 1, 4))  # the step count goes on across the resume
    assert {line["epoch"] for line in lines[len(first):]} == {2}
    (tmp_path / "off").mkdir()
    off = _train(cli, funnel_dir, tmp_path / "off", "fixed", 1, 0)
    assert not (off / "balance.jsonl").exists()
