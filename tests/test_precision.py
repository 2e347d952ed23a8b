"""Training precision (issue 21): ``train.precision: auto`` picks bf16 autocast on CPUs with bf16 matrix units and
fp32 elsewhere; bf16 keeps fp32 weights, optimizer state, losses and metrics, and trains with the sparse embedding
path and every balancer."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import SMALL_TOWERS, write_config

from recmtl.config import load_config
from recmtl.data.parquet import ParquetSource
from recmtl.registry import load_registry
from recmtl.schema import fit_schema
from recmtl.training import device
from recmtl.training.batches import blocks, minibatches
from recmtl.training.device import Precision, PrecisionProbe, choose_precision, resolve_precision, wants_probe
from recmtl.training.model import MultiTaskModel, sparse_parameters, validate_plugins
from recmtl.training.optimizers import make_optimizers

REGISTRY = load_registry()
CPU = torch.device("cpu")


@pytest.mark.parametrize("units, want", [("AMX", "bf16"), ("AVX-512 BF16", "bf16"), (None, "fp32")])
def test_auto_picks_bf16_only_with_bf16_matrix_units(monkeypatch, units, want):
    monkeypatch.setattr(device, "cpu_bf16_units", lambda: units)
    assert resolve_precision("auto", CPU) == want
    assert resolve_precision("fp32", CPU) == "fp32"  # --precision fp32 forces the old path
    assert want in device.precision_reason(want, "auto", CPU)


def test_bf16_without_units_warns_once(monkeypatch):
    monkeypatch.setattr(device, "cpu_bf16_units", lambda: None)
    monkeypatch.setattr(device, "_warned_slow_bf16", False)
    told: list[str] = []
    assert resolve_precision("bf16", CPU, told.append) == "bf16"
    assert resolve_precision("bf16", CPU, told.append) == "bf16"
    assert len(told) == 1 and "no bf16 matrix units" in told[0] and "slower than fp32" in told[0]


def test_this_machine_auto_matches_its_units():
    """On the AVX2-only CI machines auto stays fp32; on AMX / AVX-512 BF16 ones it is bf16."""
    assert resolve_precision("auto", CPU) == ("fp32" if device.cpu_bf16_units() is None else "bf16")


@pytest.mark.parametrize("units, spec, world, want", [
    ("AVX-512 BF16", "auto", 1, True), ("AMX", "auto", 1, True), (None, "auto", 1, False),
    ("AMX", "bf16", 1, False), ("AMX", "fp32", 1, False), ("AMX", "auto", 2, False)])
def test_probe_only_settles_auto_on_one_cpu_process_with_units(monkeypatch, units, spec, world, want):
    monkeypatch.setattr(device, "cpu_bf16_units", lambda: units)
    assert wants_probe(spec, CPU, world) is want


@pytest.mark.parametrize("fp32, bf16, want", [
    ([2.0, 2.1, 1.9], [1.0, 1.1, 0.9], "bf16"),  # 2x faster
    ([1.0, 1.0, 1.0], [0.94, 0.96, 0.95], "bf16"),  # 5 % faster: the margin
    ([1.0, 1.0, 1.0], [0.97, 0.98, 0.99], "fp32"),  # within the margin: the fp32 path stays
    ([1.0, 1.0, 1.0], [1.2, 1.3, 1.25], "fp32"),  # bf16 slower (small layers, small batches)
    ([1.0, 9.0, 1.0], [0.8, 0.8, 9.0], "bf16")])  # medians: one step hit by a neighbour does not decide
def test_choose_precision_keeps_fp32_unless_bf16_is_clearly_faster(fp32, bf16, want):
    assert choose_precision({"fp32": fp32, "bf16": bf16}, margin=0.05) == want


@pytest.mark.parametrize("bf16_ms, want", [(5.0, "bf16"), (12.0, "fp32")])
def test_probe_alternates_discards_warm_up_and_decides(bf16_ms, want):
    probe = PrecisionProbe(steps=3, margin=0.05, early_pairs=0)
    modes = []
    while probe.decided is None:
        mode = probe.next_mode()
        modes.append(mode)
        slow_first = 100.0 if len(modes) <= 2 else 1.0  # the warm-up steps are slow and not counted
        decided = probe.record(1000, slow_first * (bf16_ms if mode == "bf16" else 10.0) / 1000)
    assert modes == ["fp32", "bf16"] * 4 and decided == want and probe.next_mode() == want
    assert len(probe.seconds["fp32"]) == len(probe.seconds["bf16"]) == 3
    assert probe.summary()["decided"] == want and probe.record(1000, 1.0) is None  # decided once


@pytest.mark.parametrize("fp32_ms, bf16_ms, want, steps", [
    ([10, 10, 10, 10, 10], [5, 5.5, 5, 5, 5], "bf16", 6),  # 1.8x faster in both first pairs: stops after 2
    ([10, 10, 10, 10, 10], [12, 13, 12, 12, 12], "fp32", 12),  # bf16 slower, not 1.67x: the full probe
    ([10, 10, 10, 10, 10], [17, 18, 20, 20, 20], "fp32", 6),  # bf16 far slower in both first pairs
    ([10, 10, 10, 10, 10], [5, 9.0, 5, 5, 5], "bf16", 12),  # one bf16 step near fp32's: the full probe decides
    ([10, 30, 10, 10, 10], [8, 8, 8, 8, 8], "bf16", 12)])  # a load spike on one fp32 step does not stop it early
def test_probe_stops_early_only_when_every_step_agrees(fp32_ms, bf16_ms, want, steps):
    """The early stop (after 2 measured pairs, one precision faster in every step by 1.67x) takes the decision the
    full probe would; anything less clear-cut runs the full schedule and its median rule."""
    probe = PrecisionProbe()
    times = {"fp32": iter([100.0] + fp32_ms), "bf16": iter([100.0] + bf16_ms)}
    while probe.decided is None:
        probe.record(1000, next(times[probe.next_mode()]) / 1000)
    assert probe.decided == want and probe.summary()["steps"] == steps
    full = PrecisionProbe(early_pairs=0)
    times = {"fp32": iter([100.0] + fp32_ms), "bf16": iter([100.0] + bf16_ms)}
    while full.decided is None:
        full.record(1000, next(times[full.next_mode()]) / 1000)
    assert full.decided == want and full.summary()["steps"] == 12


@pytest.mark.parametrize("decision", ["bf16", "fp32"])
def test_auto_probe_decision_is_printed_and_recorded(cli, funnel_dir, tmp_path, monkeypatch, decision):
    """auto on a CPU with bf16 units: the loop runs the probe and keeps what it decides (the measurement mocked)."""
    monkeypatch.setattr(device, "cpu_bf16_units", lambda: "AVX-512 BF16")
    monkeypatch.setattr(device, "choose_precision", lambda seconds, margin: decision)
    monkeypatch.setattr(device, "decide_early", lambda seconds, pairs, margin: None)
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, train={"batch_size": 512, "epochs": 1, "progress": False,
                                                                "threads": 1})
    r = cli("train", cfg, "--out", tmp_path / "run", "--precision", "auto")
    assert r.code == 0, r
    assert "the first 12 steps alternate fp32 and bf16" in r.err and f"precision {decision} (" in r.err
    info = json.loads((tmp_path / "run" / "run.json").read_text())["precision"]
    assert info["mode"] == decision and info["probe"]["decided"] == decision
    assert set(info["probe"]["ms_per_1000_rows"]) == {"fp32", "bf16"}
    assert "measured" in info["reason"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, funnel_dir):
    """A config over the shared funnel data and its schema fitted on the training file."""
    path = write_config(tmp_path_factory.mktemp("prec") / "c.yaml", funnel_dir)
    cfg = load_config(path)  # the embedding encoder's tables are sparse by default (SparseAdam)
    heads = validate_plugins(cfg, REGISTRY)
    src = ParquetSource(cfg.resolve(cfg.data.train), cfg.columns())
    schema = fit_schema(cfg, src, {t.name: heads[t.name] for t in cfg.tasks})
    batches = list(minibatches(blocks(src, schema, 2048), 128))[:2]
    return cfg, schema, batches


@pytest.mark.parametrize("name", sorted(REGISTRY.names("balancer")))
def test_bf16_trains_with_every_balancer(tiny, name):
    """Two steps as the trainer takes them (autocast, fp32 losses, the balancer's backward, optimizers) under
    bf16: finite fp32 losses, parameters and optimizer state stay fp32, the sparse embedding tables move."""
    cfg, schema, batches = tiny
    torch.manual_seed(0)
    model = MultiTaskModel(cfg, schema, REGISTRY)
    balancer = REGISTRY.create("balancer", name, model.task_names, {t.name: t.weight for t in cfg.tasks})
    optimizers = make_optimizers(cfg, model, balancer)
    precision = Precision("bf16", CPU)
    sparse = sparse_parameters(model)
    assert sparse, "the funnel config's embedding tables are sparse"
    before = [p.detach().clone() for p in sparse]
    for batch in batches:
        with precision.autocast():
            outputs = model(batch.inputs)
            losses = model.losses(outputs, batch.labels, batch.mask)
        assert all(v.dtype == torch.float32 for v in losses.values())  # autocast's fp32 policy for the losses
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        scaled = precision.scale_losses(losses)
        assert all(v.dtype == torch.float32 for v in scaled.values())
        balancer.grad_scale = precision.grad_scale()
        balancer.backward(scaled, model.shared_parameters())
        precision.step(optimizers, unscaled=balancer.parameters())
        assert all(math.isfinite(v.item()) for v in scaled.values())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, sparse))
    for opt in optimizers:
        for state in opt.state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.is_floating_point():
                    assert v.dtype == torch.float32


def test_cli_precision_is_printed_and_recorded(cli, funnel_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, train={"batch_size": 2048, "epochs": 1, "progress": False, "threads": 1})
    r = cli("train", cfg, "--out", tmp_path / "run", "--precision", "fp32")
    assert r.code == 0, r
    assert "precision fp32 (train.precision fp32)" in r.err
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["precision"]["mode"] == "fp32" and info["precision"]["train.precision"] == "fp32"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert np.isfinite(metrics["validation"]["click"]["auc"])
    r = cli("train", cfg, "--out", tmp_path / "bad", "--precision", "int4")
    assert r.code == 2 and "precision" in r.err and "Traceback" not in r.err, r


def test_resumed_run_keeps_the_probe_decision(cli, funnel_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(device, "cpu_bf16_units", lambda: "AMX")
    monkeypatch.setattr(device, "choose_precision", lambda seconds, margin: "bf16")
    monkeypatch.setattr(device, "decide_early", lambda seconds, pairs, margin: None)
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, train={"batch_size": 512, "epochs": 1, "progress": False,
                                                                "threads": 1})
    assert cli("train", cfg, "--out", tmp_path / "run").code == 0
    monkeypatch.setattr(device, "choose_precision", lambda seconds, margin: "fp32")  # a probe now would say fp32
    r = cli("train", cfg, "--out", tmp_path / "run", "--resume", "--set", "train.epochs=2")
    assert r.code == 0, r
    assert "alternate fp32 and bf16" not in r.err.split("resuming")[-1]  # no second probe
    assert "precision bf16 (auto: the probe's decision when the run started, kept on resume)" in r.err
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert state["precision_mode"] == "bf16"


def test_esmm_loss_stays_finite_when_bf16_would_round_pctcvr_to_one():
    """The NaN of a bf16 pepnet run (issue 21): under autocast a confident CTR and CVR rounded to exactly 1.0 in
    bf16, the clamp to ``1 - 1e-7`` is 1.0 in bf16, and a label-1 row's loss was ``0 * log1p(-1) = nan``."""
    from recmtl.contracts import TaskInfo
    from recmtl_plugins.heads.esmm import ESMMHead
    head = ESMMHead(4, TaskInfo("conversion", "conversion", "esmm"), ctr_task="click")
    with torch.no_grad():
        head.cvr.weight.fill_(3.0)
        head.cvr.bias.zero_()
    h = torch.ones(2, 4, requires_grad=True)  # pCVR logit 12: sigmoid 0.999994, 1.0 in bf16
    ctr_logit = torch.full((2,), 8.0, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ctr = torch.sigmoid(ctr_logit.to(torch.bfloat16))  # a bf16 upstream score of 1.0 (a plugin head's, say)
        assert ctr[0].item() == 1.0
        out = head(h, {"click": ctr})
        loss = head.loss(out, torch.tensor([1.0, 0.0]), torch.ones(2))
    assert math.isfinite(loss.item())
    assert out.dtype == torch.float32 and out.max().item() < 1.0
    loss.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(ctr_logit.grad).all()


#: what sits between the encoders and the tower: no block, each block (fm also on projected, bf16 fields: a
#: ``field_dim`` other than the embeddings' puts every field through an autocast matmul), the feature gates
BETWEEN = {"none": {}, "fm": {"interaction": {"name": "fm"}},
           "fm projected": {"interaction": {"name": "fm", "field_dim": 4}},
           "dcn_v2": {"interaction": {"name": "dcn_v2", "num_layers": 2}},
           "dcn_v2 mixture": {"interaction": {"name": "dcn_v2", "num_layers": 1, "rank": 4, "num_experts": 2}},
           "autoint": {"interaction": {"name": "autoint", "num_layers": 1}},
           "feature_gates": {"feature_gates": {"sparsity": 0.0005}}}
#: |bf16 - fp32| of the scores (probabilities) of one forward pass with the same weights, at most
SCORE_TOLERANCE = 0.0015  # measured: <= 0.0006 here; 0.001-0.003 with bf16 heads and gates (RESULTS.md)


@pytest.fixture(scope="module")
def tiny_raw(tmp_path_factory, funnel_dir):
    """The funnel config as a dict, its fitted schema and three batches of 256 rows."""
    import yaml
    path = write_config(tmp_path_factory.mktemp("prec_all") / "c.yaml", funnel_dir)
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    heads = validate_plugins(cfg, REGISTRY)
    src = ParquetSource(cfg.resolve(cfg.data.train), cfg.columns())
    schema = fit_schema(cfg, src, {t.name: heads[t.name] for t in cfg.tasks})
    return raw, schema, list(minibatches(blocks(src, schema, 2048), 256))[:3]


def test_every_builtin_tower_is_in_the_bf16_test():
    assert set(SMALL_TOWERS) == set(REGISTRY.names("tower"))


@pytest.fixture
def one_thread():
    """One torch thread for the test (small matmuls: 2 threads on a shared CPU were several times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("tower", sorted(SMALL_TOWERS))
def test_bf16_trains_every_tower_with_every_block_close_to_fp32(tiny_raw, tower, one_thread):
    """Every tower x (no block, fm, dcn_v2, autoint, feature gates): three bf16 training steps give finite fp32
    losses, the heads' raw outputs are fp32 under autocast, and a bf16 forward's scores are within
    ``SCORE_TOLERANCE`` of the fp32 forward's (same weights)."""
    from recmtl.config import parse_config
    raw, schema, batches = tiny_raw
    precision = Precision("bf16", CPU)
    for label, sections in BETWEEN.items():
        config = parse_config({**raw, "tower": {"name": tower, **SMALL_TOWERS[tower]}, **sections})
        validate_plugins(config, REGISTRY)
        torch.manual_seed(0)
        model = MultiTaskModel(config, schema, REGISTRY)
        balancer = REGISTRY.create("balancer", "fixed", model.task_names, {t.name: t.weight for t in config.tasks})
        optimizers = make_optimizers(config, model, balancer)
        for batch in batches:
            with precision.autocast():
                outputs = model(batch.inputs)
                losses = model.losses(outputs, batch.labels, batch.mask)
            assert all(math.isfinite(v.item()) for v in losses.values()), (label, losses)
            dtypes = {t: o.dtype for t, o in outputs.items()}
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            model.backward_regularization()
            balancer.backward(precision.scale_losses(losses), model.shared_parameters())
            precision.step(optimizers)
        assert all(torch.isfinite(p).all() for p in model.parameters()), label
        model.eval()
        with torch.no_grad():
            want = model.predict(batches[0].inputs)
            with precision.autocast():
                got = model.predict(batches[0].inputs)
        for t in model.task_names:
            diff = (got[t].float() - want[t]).abs().max().item()
            assert diff <= SCORE_TOLERANCE, f"{tower} + {label}: task {t} bf16 scores differ from fp32 by {diff:.4f}"
        assert set(dtypes.values()) == {torch.float32}, (label, dtypes)  # the heads' raw outputs under autocast
