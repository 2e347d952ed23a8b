"""Gradient-manipulation balancers: each method's math on small hand-computed cases, and that
``backward`` puts exactly the combined direction into the shared parameters' gradient."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_config
from torch import nn

from recmtl.data.synthetic import funnel
from recmtl.errors import ConfigError
from recmtl.registry import load_registry
from recmtl_plugins.balancers.aligned_mtl import align
from recmtl_plugins.balancers.cagrad import cagrad
from recmtl_plugins.balancers.gradvac import gradvac, vaccinate
from recmtl_plugins.balancers.imtl import imtl_g
from recmtl_plugins.balancers.mgda import min_norm_weights
from recmtl_plugins.balancers.nash_mtl import nash_weights
from recmtl_plugins.balancers.pcgrad import pcgrad

REGISTRY = load_registry()
GRADIENT_BALANCERS = ["pcgrad", "mgda", "cagrad", "imtl", "gradvac", "nash_mtl", "aligned_mtl", "metabalance"]


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def backward_on(name: str, vectors: torch.Tensor, **params):
    """Losses ``L_i = a_i . theta + h_i^2`` (``h_i`` task-specific, = 1): d L_i / d theta is ``a_i`` exactly.
    Returns (theta.grad, h.grad, reported weights)."""
    tasks = [f"t{i}" for i in range(len(vectors))]
    bal = REGISTRY.create("balancer", name, tasks, {x: 1.0 for x in tasks}, **params)
    theta = nn.Parameter(torch.zeros(vectors.shape[1], dtype=torch.float64))
    h = nn.Parameter(torch.ones(len(tasks), dtype=torch.float64))
    losses = {x: vectors[i] @ theta + h[i] ** 2 for i, x in enumerate(tasks)}
    weights = bal.backward(losses, [theta])
    return theta.grad, h.grad, [weights[x] for x in tasks]


def test_every_gradient_balancer_is_registered():
    assert set(GRADIENT_BALANCERS) <= set(REGISTRY.names("balancer"))


# --- PCGrad ---------------------------------------------------------------------------------------

def test_pcgrad_projects_conflicting_vectors():
    # g1 = (1, 0), g2 = (-1, 1): g1.g2 = -1 < 0.
    # g1' = g1 - (-1 / 2) g2 = (0.5, 0.5) (orthogonal to g2); g2' = g2 - (-1 / 1) g1 = (0, 1) (orthogonal to g1)
    direction, coeffs = pcgrad(t([1, 0], [-1, 1]))
    assert direction.tolist() == pytest.approx([0.5, 1.5])
    assert coeffs.tolist() == pytest.approx([2.0, 1.5])  # g1' + g2' = 2 g1 + 1.5 g2


def test_pcgrad_leaves_non_conflicting_vectors_alone():
    direction, coeffs = pcgrad(t([1, 0], [1, 1]))
    assert direction.tolist() == pytest.approx([2.0, 1.0])
    assert coeffs.tolist() == pytest.approx([1.0, 1.0])


def test_pcgrad_backward_sets_the_shared_gradient_and_keeps_task_gradients():
    shared, task, weights = backward_on("pcgrad", t([1, 0], [-1, 1]))
    assert shared.tolist() == pytest.approx([0.5, 1.5])
    assert task.tolist() == pytest.approx([2.0, 2.0])  # d h_i^2 / d h_i, unweighted
    assert weights == pytest.approx([2.0, 1.5])


# --- MGDA -----------------------------------------------------------------------------------------

def closed_form_gamma(g1: torch.Tensor, g2: torch.Tensor) -> float:
    return min(max(float((g2 - g1) @ g2) / float((g1 - g2) @ (g1 - g2)), 0.0), 1.0)


@pytest.mark.parametrize("g1,g2", [([1, 0], [0, 2]), ([1, 0], [2, 0]), ([1, 1], [-2, 0.5]), ([0, 3], [1, -1])])
def test_mgda_two_tasks_matches_the_closed_form(g1, g2):
    g = t(g1, g2)
    gamma = min_norm_weights(g @ g.T)
    assert float(gamma[0]) == pytest.approx(closed_form_gamma(g[0], g[1]), abs=1e-12)
    assert float(gamma.sum()) == pytest.approx(1.0)


def test_mgda_hand_computed_case_through_backward():
    # g1 = (1, 0), g2 = (0, 2): gamma = (g2 - g1).g2 / ||g1 - g2||^2 = 4 / 5
    shared, task, weights = backward_on("mgda", t([1, 0], [0, 2]))
    assert weights == pytest.approx([0.8, 0.2])
    assert shared.tolist() == pytest.approx([0.8, 0.4])  # the min-norm point, orthogonal to g1 - g2
    assert task.tolist() == pytest.approx([2.0, 2.0])


def test_mgda_frank_wolfe_finds_the_min_norm_point_of_three_gradients():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    gamma = min_norm_weights(g @ g.T, max_iter=5000, tol=1e-12)
    best = min(float((w @ g).norm()) for w in torch.distributions.Dirichlet(torch.ones(3, dtype=torch.float64))
               .sample((20000,)))
    assert float((gamma @ g).norm()) <= best + 1e-3
    assert float(gamma.sum()) == pytest.approx(1.0) and (gamma >= 0).all()


def test_mgda_rejects_the_representation_variant():
    with pytest.raises(ConfigError, match="parameters"):
        REGISTRY.create("balancer", "mgda", ["a", "b"], {}, on="representation")


# --- CAGrad ---------------------------------------------------------------------------------------

def test_cagrad_with_c_zero_is_the_average_gradient():
    g = t([1, 0], [-1, 1], [0.5, 2])
    direction, coeffs = cagrad(g, c=0.0)
    assert direction.tolist() == pytest.approx(g.mean(0).tolist())
    assert coeffs.tolist() == pytest.approx([1 / 3] * 3)


def test_cagrad_stays_in_the_ball_and_helps_the_worst_task():
    g = t([1, 0], [-0.8, 0.3])
    g0 = g.mean(0)
    d, _ = cagrad(g, c=0.5, rescale=False)
    assert float((d - g0).norm()) == pytest.approx(0.5 * float(g0.norm()), rel=1e-3)  # on the ball's boundary
    assert float((g @ d).min()) > float((g @ g0).min()) + 1e-3  # the worst task improves more than with g0


# --- IMTL-G ---------------------------------------------------------------------------------------

def test_imtl_hand_computed_two_tasks():
    # g1 = (1, 0), g2 = (0, 3): g = (a, 3 (1 - a)); g.u1 = g.u2 gives a = 3/4, g = (0.75, 0.75)
    direction, alpha = imtl_g(t([1, 0], [0, 3]))
    assert alpha.tolist() == pytest.approx([0.75, 0.25])
    assert direction.tolist() == pytest.approx([0.75, 0.75])


def test_imtl_two_tasks_weights_are_the_swapped_norm_shares():
    g = t([3, 1], [-1, 2])  # norms sqrt(10) and sqrt(5); any angle gives alpha = (|g2|, |g1|) / (|g1| + |g2|)
    _, alpha = imtl_g(g)
    n1, n2 = math.sqrt(10), math.sqrt(5)
    assert alpha.tolist() == pytest.approx([n2 / (n1 + n2), n1 / (n1 + n2)])


def test_imtl_equal_projections_on_every_unit_gradient():
    g = t([2, 0, 1], [-1, 1, 0], [0, 0.5, 3])
    direction, alpha = imtl_g(g)
    unit = g / g.norm(dim=1, keepdim=True)
    proj = unit @ direction
    assert proj.tolist() == pytest.approx([float(proj[0])] * 3, rel=1e-9)
    assert float(alpha.sum()) == pytest.approx(1.0)


def test_imtl_leaves_out_a_task_without_gradient():
    # the third task has no labels in the batch: alpha as for the first two alone, not (0, 0, 1) and a zero update
    direction, alpha = imtl_g(t([1, 0], [0, 3], [0, 0]))
    assert alpha.tolist() == pytest.approx([0.75, 0.25, 0.0])
    assert direction.tolist() == pytest.approx([0.75, 0.75])
    direction, alpha = imtl_g(t([0, 0], [0, 3]))  # one task left: its own gradient
    assert alpha.tolist() == [0.0, 1.0] and direction.tolist() == [0.0, 3.0]
    direction, alpha = imtl_g(t([0, 0], [0, 0]))
    assert alpha.tolist() == [0.0, 0.0] and direction.tolist() == [0.0, 0.0]


# --- GradVac --------------------------------------------------------------------------------------

def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("target", [0.0, 0.5, -0.3])
def test_gradvac_raises_the_cosine_to_its_target(target):
    g1, g2 = t([1, 0], [-1, 1])[0], t([1, 0], [-1, 1])[1]  # cosine -0.7071
    a = vaccinate(g1, g2, target)
    assert a > 0
    assert cos(g1 + a * g2, g2) == pytest.approx(target, abs=1e-12)


def test_gradvac_leaves_pairs_above_target_alone_and_tracks_the_ema():
    g = t([1, 0], [1, 1])  # cosine 0.7071 >= target 0
    targets = torch.zeros(2, 2, dtype=torch.float64)
    direction, coeffs = gradvac(g, targets, beta=0.1)
    assert direction.tolist() == pytest.approx([2.0, 1.0]) and coeffs.tolist() == pytest.approx([1.0, 1.0])
    assert float(targets[0, 1]) == pytest.approx(0.1 * math.sqrt(0.5))  # (1 - beta) 0 + beta phi


def test_gradvac_with_target_zero_equals_pcgrad_on_the_first_step():
    g = t([1, 0], [-1, 1])
    targets = torch.zeros(2, 2, dtype=torch.float64)
    direction, _ = gradvac(g, targets, beta=0.01)
    assert direction.tolist() == pytest.approx([0.5, 1.5])


# --- Nash-MTL -------------------------------------------------------------------------------------

def test_nash_hand_computed_orthogonal_case():
    # G G^T = diag(1, 4): alpha_i^2 M_ii = 1 -> alpha = (1, 0.5)
    assert nash_weights(np.diag([1.0, 4.0])).tolist() == pytest.approx([1.0, 0.5], rel=1e-6)


def test_nash_solution_satisfies_the_bargaining_equations():
    g = np.array([[1.0, 0.2, -0.5], [-0.3, 1.5, 0.1], [0.4, -0.2, 0.8]])
    m = g @ g.T
    alpha = nash_weights(m)
    assert (alpha > 0).all()
    assert (alpha * (m @ alpha)).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)


def test_nash_backward_solves_the_papers_equation_on_the_gram_matrix_itself():
    """alpha_t (G G^T alpha)_t = 1 for G G^T as it is, not divided by its Frobenius norm first (which gave
    sqrt(||G G^T||_F) times the authors' alpha)."""
    g = t([1, 0.5], [-0.5, 2])
    shared, task, weights = backward_on("nash_mtl", g, max_norm=0.0)
    m = g @ g.T
    a = torch.tensor(weights, dtype=torch.float64)
    assert (a * (m @ a)).tolist() == pytest.approx([1.0, 1.0], abs=1e-8)
    assert shared.tolist() == pytest.approx((a @ g).tolist())
    assert float(shared @ shared) == pytest.approx(2.0)  # ||d||^2 = alpha^T M alpha = T
    assert task.tolist() == pytest.approx((2 * a).tolist())  # alpha also weights the task-specific losses


def test_nash_hand_computed_scale_through_backward():
    # g1 = (1, 0), g2 = (0, 2): G G^T = diag(1, 4) -> alpha = (1, 1/2), d = (1, 1); the normalised Gram
    # diag(1, 4) / sqrt(17) gave 17 ** 0.25 = 2.03 times that
    shared, _, weights = backward_on("nash_mtl", t([1, 0], [0, 2]), max_norm=0.0)
    assert weights == pytest.approx([1.0, 0.5], rel=1e-8)
    assert shared.tolist() == pytest.approx([1.0, 1.0])


def test_nash_shared_update_does_not_depend_on_the_gradients_scale():
    g = t([1, 0.5, 0], [-0.5, 2, 1], [0.3, 0, -1])
    small, _, w_small = backward_on("nash_mtl", 1e-3 * g, max_norm=0.0)
    large, _, w_large = backward_on("nash_mtl", g, max_norm=0.0)
    assert small.tolist() == pytest.approx(large.tolist(), rel=1e-7)
    assert w_small == pytest.approx([1e3 * w for w in w_large], rel=1e-7)  # alpha scales as 1 / ||g||


@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_nash_divides_out_the_fp16_loss_scale(max_norm):
    """With fp16 the gradients arrive times the loss scale S, and the optimiser step divides every gradient
    by S: the shared direction must carry S, alpha and the clip must not see it."""
    g = t([1, 0.5], [-0.5, 2])
    tasks = ["a", "b"]

    def run(scale: float) -> list[list[float]]:
        bal = REGISTRY.create("balancer", "nash_mtl", tasks, {}, max_norm=max_norm, update_weights_every=2)
        bal.grad_scale = scale
        out = []
        for _ in range(2):  # a solve step, then a step that reuses alpha
            theta = nn.Parameter(torch.zeros(2, dtype=torch.float64))
            h = nn.Parameter(torch.ones(2, dtype=torch.float64))
            w = bal.backward({x: scale * (g[i] @ theta + h[i] ** 2) for i, x in enumerate(tasks)}, [theta])
            out.append([*(theta.grad / scale).tolist(), *(h.grad / scale).tolist(), *w.values()])
        return out

    for unscaled, fp16 in zip(run(1.0), run(1024.0)):
        assert fp16 == pytest.approx(unscaled, rel=1e-6)  # clip_grad_norm_ adds 1e-6 to the norm


def test_nash_step_under_the_real_fp16_grad_scaler_matches_fp32():
    """One SGD step as the trainer takes it (scale_losses, grad_scale, backward, step) with the fp16 GradScaler
    (loss scale 65536) moves the parameters as the fp32 step does; a scale-free direction that did not carry
    the loss scale would move the shared layer 65536 times less."""
    from recmtl.training.device import Precision

    def step(mode: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        shared, heads = nn.Linear(3, 4), nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])
        params = [*shared.parameters(), *heads.parameters()]
        before = [p.detach().clone() for p in params]
        opt = torch.optim.SGD(params, lr=0.1)
        bal = REGISTRY.create("balancer", "nash_mtl", ["a", "b"], {})
        precision = Precision(mode, torch.device("cpu"))
        x = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.8, -1.0]])
        h = torch.relu(shared(x))
        losses = {"a": heads[0](h).pow(2).mean(), "b": (heads[1](h) - 1).pow(2).mean()}
        opt.zero_grad()
        scaled = precision.scale_losses(losses)
        bal.grad_scale = precision.grad_scale()
        bal.backward(scaled, list(shared.parameters()))
        precision.step([opt])
        return [p.detach() - b for p, b in zip(params, before)]

    for fp32, fp16 in zip(step("fp32"), step("fp16")):
        assert fp16.flatten().tolist() == pytest.approx(fp32.flatten().tolist(), rel=1e-5, abs=1e-7)


def test_nash_solves_again_after_a_step_that_left_a_task_out():
    bal = REGISTRY.create("balancer", "nash_mtl", ["a", "b"], {}, update_weights_every=3, max_norm=0.0)
    first = bal.backward({"a": t([1, 0])[0] @ (theta := nn.Parameter(torch.zeros(2, dtype=torch.float64))),
                          "b": 0 * theta.sum()}, [theta])
    assert first["b"] == 0.0 and first["a"] == pytest.approx(1.0)
    g = t([1, 0], [0, 2])
    theta = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    second = bal.backward({"a": g[0] @ theta, "b": g[1] @ theta}, [theta])
    assert [second["a"], second["b"]] == pytest.approx([1.0, 0.5])  # solved for this step's gradients
    theta = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    third = bal.backward({"a": 5 * g[0] @ theta, "b": 5 * g[1] @ theta}, [theta])
    assert third == second  # every task present at the last solve: reused until the next due solve


def test_nash_clips_the_shared_update():
    shared, _, _ = backward_on("nash_mtl", t([10, 0], [0, 30]), max_norm=1.0)
    assert float(shared.norm()) == pytest.approx(1.0)


# --- Aligned-MTL ----------------------------------------------------------------------------------

def test_aligned_mtl_hand_computed_orthogonal_case():
    # g1 = (3, 0), g2 = (0, 1): eigenvalues 9 and 1, B = diag(1/3, 1): aligned gradients (1, 0) and (0, 1)
    aligned, _ = align(t([3, 0], [0, 1]))
    assert aligned.tolist() == [pytest.approx([1.0, 0.0]), pytest.approx([0.0, 1.0])]
    shared, _, weights = backward_on("aligned_mtl", t([3, 0], [0, 1]))
    assert weights == pytest.approx([1 / 3, 1.0])
    assert shared.tolist() == pytest.approx([1.0, 1.0])


def test_aligned_mtl_makes_task_gradients_orthogonal_with_equal_norms():
    g = t([1, 0, 0], [1, 1, 0], [0.2, -0.5, 2])
    aligned, _ = align(g)
    lam_min = float(torch.linalg.eigvalsh(g @ g.T).min())
    assert (aligned @ aligned.T).numpy() == pytest.approx(lam_min * np.eye(3), abs=1e-9)


def test_aligned_mtl_rank_deficient_system():
    aligned, _ = align(t([1, 1], [2, 2]))  # one direction: rank 1, nothing to divide by zero
    assert torch.isfinite(aligned).all() and float(aligned.norm()) > 0


# --- MetaBalance ----------------------------------------------------------------------------------

@pytest.mark.parametrize("aux", [[1.0, 0.0], [0.0, 10.0]])
def test_metabalance_scales_the_aux_norm_towards_the_target(aux):
    target = [3.0, 4.0]  # norm 5
    shared, _, weights = backward_on("metabalance", t(target, aux), relax_factor=0.7)
    aux_t = torch.tensor(aux, dtype=torch.float64)
    expected_norm = 0.7 * 5.0 + 0.3 * float(aux_t.norm())
    expected = torch.tensor(target, dtype=torch.float64) + aux_t * expected_norm / aux_t.norm()
    assert shared.tolist() == pytest.approx(expected.tolist())
    assert weights == pytest.approx([1.0, expected_norm / float(aux_t.norm())])


def test_metabalance_target_task_and_moving_average():
    bal = REGISTRY.create("balancer", "metabalance", ["ctr", "cvr"], {}, target_task="cvr", beta=0.5)
    theta = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    norms = []
    for ctr, cvr in ((1.0, 4.0), (3.0, 4.0)):
        theta.grad = None
        bal.backward({"ctr": ctr * theta.sum(), "cvr": cvr * theta.sum()}, [theta])
        norms.append(float(theta.grad) - cvr)  # the rescaled ctr gradient
    # step 1: averages ctr 0.5 * 1, cvr 0.5 * 4: the ratio is the current 4 / 1: ctr -> 0.7 * 4 + 0.3 * 1 = 3.1
    # step 2: averages ctr 0.5 * 0.5 + 0.5 * 3 = 1.75, cvr 0.5 * 2 + 0.5 * 4 = 3: ctr -> 3 (0.7 * 3 / 1.75 + 0.3)
    assert norms == pytest.approx([3.1, 4.5])
    with pytest.raises(ConfigError, match="target_task"):
        REGISTRY.create("balancer", "metabalance", ["ctr", "cvr"], {}, target_task="ctcvr")


def test_metabalance_works_tensor_by_tensor():
    bal = REGISTRY.create("balancer", "metabalance", ["a", "b"], {}, relax_factor=1.0)
    p, q = nn.Parameter(torch.zeros(1, dtype=torch.float64)), nn.Parameter(torch.zeros(1, dtype=torch.float64))
    bal.backward({"a": 2 * p.sum() + 1 * q.sum(), "b": 1 * p.sum() + 4 * q.sum()}, [p, q])
    # r = 1: each aux block gets the target block's norm: p: 2 + 2, q: 1 + 1
    assert [float(p.grad), float(q.grad)] == pytest.approx([4.0, 2.0])


# --- all of them ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", GRADIENT_BALANCERS)
def test_config_weights_scale_the_losses_first(name):
    tasks = ["a", "b"]
    bal = REGISTRY.create("balancer", name, tasks, {"a": 1.0, "b": 0.0})
    theta = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    bal.backward({"a": torch.tensor([1.0, 2.0], dtype=torch.float64) @ theta,
                  "b": torch.tensor([-5.0, 1.0], dtype=torch.float64) @ theta}, [theta])
    g = theta.grad
    assert float(g[0] * 2 - g[1]) == pytest.approx(0.0, abs=1e-9)  # only task a's direction is left
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("name", GRADIENT_BALANCERS)
def test_zero_gradient_task_does_not_break_the_step(name):
    shared, _, weights = backward_on(name, t([1, 2], [0, 0]))
    assert torch.isfinite(shared).all() and all(math.isfinite(w) for w in weights)


def steps_with_absent_task(name: str, gradients: list[torch.Tensor], absent: list[bool] | None, **params):
    """Steps of a balancer on ``L_i = g_i . theta + h_i^2``; with ``absent`` a last task whose loss is 0 (a masked
    mean over no labelled rows) is added, on the steps where it says so, or else ``3 g_0 . theta + h^2``.
    Returns per step (theta.grad, h.grad of the first tasks, the weights)."""
    num = gradients[0].shape[0]
    tasks = [f"t{i}" for i in range(num + (absent is not None))]
    bal = REGISTRY.create("balancer", name, tasks, {}, **params)
    out = []
    for k, g in enumerate(gradients):
        theta = nn.Parameter(torch.zeros(g.shape[1], dtype=torch.float64))
        h = nn.Parameter(torch.ones(len(tasks), dtype=torch.float64))
        losses = {x: g[i] @ theta + h[i] ** 2 for i, x in enumerate(tasks[:num])}
        if absent is not None:
            losses[tasks[-1]] = 0 * (theta.sum() + h[-1]) if absent[k] else 3 * g[0] @ theta + h[-1] ** 2
        weights = bal.backward(losses, [theta])
        out.append((theta.grad, h.grad[:num], [weights[x] for x in tasks]))
    return out


STEPS = [t([1, 2, 0], [0.5, -1, 1]), t([0.2, 1, -1], [-1, 0.5, 0.3]), t([2, 0, 1], [1, 1, -0.5]),
         t([0.1, -2, 0.4], [0.3, 0.3, 2])]


@pytest.mark.parametrize("name", GRADIENT_BALANCERS)
def test_a_task_without_labels_is_left_out_of_the_step(name):
    """A task with no labelled row in the batch has an all-zero shared gradient: every balancer's step is then
    exactly its step on the other tasks (state included, over several steps), with weight 0 for that task."""
    alone = steps_with_absent_task(name, STEPS, None)
    with_absent = steps_with_absent_task(name, STEPS, [True] * len(STEPS))
    for (shared, task, weights), (shared3, task3, weights3) in zip(alone, with_absent):
        assert torch.isfinite(shared3).all()
        assert shared3.tolist() == pytest.approx(shared.tolist(), rel=1e-9, abs=1e-12)
        assert task3.tolist() == pytest.approx(task.tolist(), rel=1e-9, abs=1e-12)
        assert weights3[:-1] == pytest.approx(weights, rel=1e-9, abs=1e-12) and weights3[-1] == 0.0


@pytest.mark.parametrize("name", GRADIENT_BALANCERS)
def test_a_task_labelled_on_some_steps_only(name):
    for shared, task, weights in steps_with_absent_task(name, STEPS, [True, False, True, False]):
        assert torch.isfinite(shared).all() and torch.isfinite(task).all()
        assert all(math.isfinite(w) for w in weights)
    absent_steps = steps_with_absent_task(name, STEPS, [True, False, True, False])[::2]
    assert [weights[-1] for _, _, weights in absent_steps] == [0.0, 0.0]


def test_gradvac_keeps_the_targets_of_a_task_without_labels():
    bal = REGISTRY.create("balancer", "gradvac", ["a", "b", "c"], {}, beta=0.5)
    g = t([1, 0], [1, 1], [-1, 2])
    theta = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    bal.backward({x: g[i] @ theta for i, x in enumerate("abc")}, [theta])
    before = bal.targets.clone()
    theta = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    bal.backward({"a": g[0] @ theta, "b": g[1] @ theta, "c": 0 * theta.sum()}, [theta])
    assert bal.targets[2].tolist() == before[2].tolist() and bal.targets[:, 2].tolist() == before[:, 2].tolist()
    assert float(bal.targets[0, 1]) == pytest.approx(0.5 * float(before[0, 1]) + 0.5 * math.sqrt(0.5))


def test_metabalance_averages_skip_the_steps_without_labels():
    """relax 1: an auxiliary task's gradient gets the target's norm. Its moving average counts only the steps it
    was present, and the averages are debiased by the steps each task was seen: a task that turns up late is
    not scaled past the target (counting the zeros, it got 4.7 times the target's norm on its first step here)."""
    bal = REGISTRY.create("balancer", "metabalance", ["target", "aux"], {}, relax_factor=1.0, beta=0.9)
    norms = []
    for k in range(8):
        theta = nn.Parameter(torch.zeros(2, dtype=torch.float64))
        aux = 0 * theta.sum() if k < 5 else torch.tensor([0.0, 1.0], dtype=torch.float64) @ theta
        weights = bal.backward({"target": torch.tensor([3.0, 4.0], dtype=torch.float64) @ theta, "aux": aux}, [theta])
        norms.append(float(theta.grad[1]))  # the rescaled aux gradient (the target's is (3, 4))
        assert weights["aux"] == (0.0 if k < 5 else pytest.approx(5.0))
    assert norms == pytest.approx([4.0] * 5 + [9.0] * 3)  # 4 + 5 once present: the target's norm 5
    bal = REGISTRY.create("balancer", "metabalance", ["target", "aux"], {}, relax_factor=1.0)
    theta = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    bal.backward({"target": 0 * theta.sum(), "aux": torch.tensor([0.0, 1.0], dtype=torch.float64) @ theta}, [theta])
    assert theta.grad.tolist() == [0.0, 1.0]  # no target seen yet: nothing to scale towards


def test_imtl_through_the_cli_leaves_out_batches_without_conversion_labels(cli, tmp_path):
    """Most conversion labels null and batches of 16: on the steps whose batch has none (the balance log's
    gradient norm is 0) IMTL-G takes the click gradient alone (alpha 1), not a zero update (alpha 0)."""
    funnel(tmp_path / "data", rows=2000, seed=3, categorical=6, dense=4, cardinality=50)
    train = pq.read_table(tmp_path / "data" / "train.parquet")
    keep = np.random.default_rng(0).random(train.num_rows) < 0.05
    labels = pa.array(np.where(keep, train["conversion"].to_numpy(), 0), mask=~keep, type=pa.int8())
    pq.write_table(train.set_column(train.schema.get_field_index("conversion"), "conversion", labels),
                   tmp_path / "data" / "train.parquet")
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "data", balancer={"name": "imtl"},
                       tasks=[{"name": "click", "head": "binary"}, {"name": "conversion", "head": "binary"}],
                       train={"batch_size": 16, "epochs": 1, "progress": False, "threads": 1, "log_every": 1})
    r = cli("train", cfg, "--out", tmp_path / "run")
    assert r.code == 0, r
    lines = [json.loads(x) for x in (tmp_path / "run" / "balance.jsonl").read_text().splitlines()]
    absent = [x for x in lines if x["grad_norms"]["conversion"] == 0]
    assert len(absent) > len(lines) / 3 and len(absent) < len(lines)
    assert all(x["weights"] == {"click": 1.0, "conversion": 0.0} for x in absent)


@pytest.mark.slow
@pytest.mark.parametrize("name", GRADIENT_BALANCERS)
def test_balancer_trains_mmoe_on_funnel_data_through_the_cli(name, cli, funnel_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, balancer={"name": name},
                       train={"batch_size": 1024, "epochs": 1, "progress": False, "threads": 1})
    r = cli("train", cfg, "--out", tmp_path / "run")
    assert r.code == 0, r
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    epoch = metrics["history"][0]
    assert all(math.isfinite(v) for v in epoch["train_loss"].values()), epoch
    assert set(epoch["weights"]) == {"click", "conversion"} and all(math.isfinite(w) for w in epoch["weights"].values())
    assert metrics["validation"]["click"]["auc"] > 0.6, metrics["validation"]


@pytest.mark.parametrize("name", ["pcgrad", "gradvac", "nash_mtl", "metabalance"])
def test_state_survives_a_checkpoint(name):
    """What --resume restores: the random order, EMA targets, the step counter, the moving averages."""
    def steps(bal, n):
        out = []
        for k in range(n):
            theta = nn.Parameter(torch.zeros(3, dtype=torch.float64))
            g = torch.tensor([[1.0, -2.0, 0.5 + k], [-1.0, 1.0, 2.0], [0.3, 0.2, -1.5 * k]], dtype=torch.float64)
            bal.backward({x: g[i] @ theta for i, x in enumerate("abc")}, [theta])
            out.append(theta.grad.tolist())
        return out
    params = {"update_weights_every": 2} if name == "nash_mtl" else {}
    ref = REGISTRY.create("balancer", name, list("abc"), {}, **params)
    steps(ref, 3)
    state = copy.deepcopy(ref.state_dict())  # as saved in last.pt (state_dict shares the live tensors)
    expected = steps(ref, 3)
    fresh = REGISTRY.create("balancer", name, list("abc"), {}, **params)
    fresh.load_state_dict(state)
    assert steps(fresh, 3) == expected


def test_shared_gradient_keeps_what_was_there_before():
    """A tower's regularization gradient, back-propagated before the balancer, survives gradient surgery."""
    from recmtl.gradients import backward_with_shared_gradient
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    head = torch.nn.Parameter(torch.tensor(3.0))
    (0.5 * (w ** 2).sum()).backward()  # the "regularization" term: gradient w = (1, 2)
    losses = [(w * head).sum(), (w ** 2).sum()]
    backward_with_shared_gradient(losses, [1.0, 1.0], [w], torch.tensor([10.0, 20.0]))
    assert torch.allclose(w.grad, torch.tensor([11.0, 22.0]))  # combined direction + regularization
    assert torch.allclose(head.grad, torch.tensor(3.0))  # task-specific: d/dhead of the first loss = sum(w)
