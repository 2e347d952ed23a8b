"""Feature interactions (issue 16): the encoders' field view, the `interaction` plugin kind and its built-ins
(fm, dcn_v2, autoint) under every tower, ONNX export with the parity check, and the errors before data is read."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from recmtl.config import parse_config
from recmtl.errors import RecmtlError
from recmtl.registry import load_registry
from recmtl.schema import FittedSchema
from recmtl.testing import check_interaction
from recmtl.training.model import MultiTaskModel, example_input, validate_plugins
from recmtl_plugins.interactions.dcn_v2 import DCNv2
from recmtl_plugins.interactions.fm import FM
from tests.conftest import write_config

REGISTRY = load_registry()


def test_fm_is_the_sum_of_pairwise_products():
    torch.manual_seed(0)
    fields = torch.randn(5, 4, 3)
    out = FM(12, list("abcd"), 3, keep_input=False)(fields.flatten(1), fields)
    want = sum(fields[:, i] * fields[:, j] for i in range(4) for j in range(i + 1, 4))
    torch.testing.assert_close(out, want)
    assert FM(12, list("abcd"), 3).output_dim == 15  # the flat vector kept beside it


@pytest.mark.parametrize("normalize", ["none", "batch", "layer", "pairs"])
def test_fm_normalize_options(normalize):
    """normalize rescales only the pairwise term: the flat vector is passed through, the width is unchanged."""
    block = check_interaction(FM, normalize=normalize)
    torch.manual_seed(0)
    fields = torch.randn(8, 4, 3)
    out = block.eval()(fields.flatten(1), fields)
    torch.testing.assert_close(out[:, :12], fields.flatten(1))
    raw = FM(12, list("abcd"), 3, keep_input=False)(fields.flatten(1), fields)
    if normalize == "pairs":
        torch.testing.assert_close(out[:, 12:], raw / 6)  # 4 fields: 6 pairs
    elif normalize == "layer":
        torch.testing.assert_close(out[:, 12:].mean(dim=1), torch.zeros(8), atol=1e-5, rtol=0)
    block.train()
    if normalize == "batch":
        assert block(fields[:1].flatten(1), fields[:1]).shape == (1, 15)  # one row in training: running statistics
        train_out = block(fields.flatten(1), fields)[:, 12:]
        torch.testing.assert_close(train_out.mean(dim=0), torch.zeros(3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="normalize must be one of none, batch, layer, pairs"):
        FM(12, list("abcd"), 3, normalize="bn")


def test_fm_scale_starts_at_zero_and_learns():
    """scale: true multiplies the pairwise term by a learned scalar that starts at 0."""
    torch.manual_seed(0)
    fields = torch.randn(5, 4, 3)
    block = check_interaction(FM, scale=True, normalize="batch")
    block = FM(12, list("abcd"), 3, scale=True)
    out = block(fields.flatten(1), fields)
    assert out[:, 12:].abs().sum() == 0 and out.shape == (5, 15)
    out.sum().backward()
    assert block.scale.grad is not None and block.scale.grad.abs() > 0
    assert FM(12, list("abcd"), 3).scale is None  # off by default
    with pytest.raises(ValueError, match="scale must be true or false"):
        FM(12, list("abcd"), 3, scale="yes")


@pytest.mark.parametrize("params", [{}, {"rank": None}, {"rank": 2}, {"rank": 2, "num_experts": 3},
                                    {"structure": "parallel", "deep_units": [8]},
                                    {"exclude_fields": ["f0"], "weight_decay": 0.1, "gate": True, "gate_l1": 0.01}])
def test_dcn_v2_variants_pass_the_contract(params):
    block = check_interaction(DCNv2, num_layers=2, **params)
    assert block.output_dim == 12 + (8 if params.get("structure") == "parallel" else 0)


def test_dcn_v2_full_rank_layer_is_the_paper_formula():
    torch.manual_seed(0)
    block = DCNv2(4, list("abcd"), 1, num_layers=1, init="random", rank=None)
    x = torch.randn(3, 4)
    w, b = block.full[0].weight, block.bias[0, 0]
    assert w.abs().sum() > 0
    torch.testing.assert_close(block(x, None), x * (x @ w.T + b) + x)


@pytest.mark.parametrize("params", [{}, {"rank": None}, {"rank": 2, "num_experts": 3}])
def test_dcn_v2_identity_init_starts_as_the_flat_vector(params):
    """init: identity (default): every cross layer starts at x_{l+1} = x_l, and one step moves it off."""
    torch.manual_seed(0)
    block = DCNv2(4, list("abcd"), 1, num_layers=2, **params)
    x = torch.randn(8, 4)
    torch.testing.assert_close(block(x, None), x)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    (block(x, None) ** 2).sum().backward()
    opt.step()
    assert not torch.allclose(block(x, None), x)
    with pytest.raises(ValueError, match="init must be identity or random"):
        DCNv2(4, list("abcd"), 1, init="zeros")


def test_dcn_v2_rank_auto_is_an_eighth_of_the_width():
    assert DCNv2(132, ["a", "b"], 16).rank == 16 and DCNv2(12, ["a", "b"], 3).rank == 1
    assert DCNv2(132, ["a", "b"], 16, rank=None).rank is None
    with pytest.raises(ValueError, match="rank must be a positive number, auto"):
        DCNv2(12, ["a", "b"], 3, rank="full")


def test_saved_config_keeps_a_null_plugin_parameter():
    """rank: null (full-rank) is not dcn_v2's default (auto): the run's config.yaml must keep it, or the model
    rebuilt from the run directory would not match its checkpoint."""
    from recmtl.config import dump_config
    raw = {"data": {"train": "x.parquet"}, "features": [{"name": "a", "kind": "categorical"}],
           "tasks": [{"name": "t", "head": "binary"}], "interaction": {"name": "dcn_v2", "rank": None}}
    saved = yaml.safe_load(dump_config(parse_config(raw)))
    assert saved["interaction"] == {"name": "dcn_v2", "rank": None}
    assert "validation" not in saved["data"]  # other nulls are still left out


def test_run_config_writes_out_every_plugin_default():
    """A run directory's config.yaml holds each plugin's parameters with the defaults filled in, so a later change
    of a default (dcn_v2's rank became auto) does not change how a saved run is rebuilt."""
    from recmtl.config import dump_config
    from recmtl.training.model import resolved_config
    raw = {"data": {"train": "x.parquet"},
           "features": [{"name": "a", "kind": "categorical"}, {"name": "b", "kind": "categorical"},
                        {"name": "d", "kind": "dense"}],
           "tasks": [{"name": "t", "head": "binary"}, {"name": "u", "head": "regression"}],
           "interaction": {"name": "dcn_v2", "num_layers": 3}, "tower": {"name": "mmoe", "num_experts": 2}}
    config = parse_config(raw)
    registry = load_registry()
    saved = yaml.safe_load(dump_config(resolved_config(config, registry)))
    assert saved["interaction"]["num_layers"] == 3  # what the user set wins
    assert saved["interaction"]["rank"] == "auto" and saved["interaction"]["init"] == "identity"
    assert saved["tower"]["num_experts"] == 2 and saved["tower"]["expert_units"] == [256, 128]
    assert saved["encoders"]["categorical"]["name"] == "embedding" and "dim" in saved["encoders"]["categorical"]
    assert saved["encoders"]["dense"]["name"] == "dense"
    assert saved["balancer"]["name"] == "fixed"
    assert "log1p" in saved["tasks"][1]["params"]  # the regression head's own default
    again = parse_config(saved)  # the written config is a valid config that validates against the plugins
    validate_plugins(again, registry)
    assert yaml.safe_load(dump_config(resolved_config(again, registry))) == saved  # a fixed point
    assert "validation" not in saved["data"]


def test_autoint_output_scale_starts_at_zero():
    """output_scale: the attention output enters beside the flat vector scaled by a learned 0."""
    from recmtl_plugins.interactions.autoint import AutoInt
    torch.manual_seed(0)
    fields = torch.randn(5, 4, 3)
    block = AutoInt(12, list("abcd"), 3, num_layers=1, output_scale=True)
    out = block(fields.flatten(1), fields)
    torch.testing.assert_close(out[:, :12], fields.flatten(1))
    assert out[:, 12:].abs().sum() == 0
    out.sum().backward()
    assert block.scale.grad is not None and block.scale.grad.abs() > 0
    assert AutoInt(12, list("abcd"), 3).scale is None  # off by default
    assert AutoInt(12, list("abcd"), 3, keep_input=False, output_scale=True).scale is None  # nothing beside it


def test_autoint_row_chunks_give_the_one_shot_numbers():
    """Outside export autoint runs the rows in chunks (cache-sized attention scores): same outputs and gradients."""
    from recmtl_plugins.interactions.autoint import AutoInt, row_chunk
    torch.manual_seed(0)
    block = AutoInt(20, [f"f{i}" for i in range(39)], 4, num_layers=2)
    assert block.chunk == row_chunk(39, 2) == 172 and row_chunk(3, 1) == 4096 and row_chunk(400, 4) == 64
    x, fields = torch.randn(300, 20), torch.randn(300, 39, 4, requires_grad=True)  # 2 chunks: 172 + 128 rows
    chunked = block(x, fields)
    (g_chunked,) = torch.autograd.grad(chunked.square().sum(), fields)
    block.chunk = 0  # the one-shot form (the exported graph)
    one_shot = block(x, fields)
    (g_one_shot,) = torch.autograd.grad(one_shot.square().sum(), fields)
    torch.testing.assert_close(chunked, one_shot)
    torch.testing.assert_close(g_chunked, g_one_shot)


def test_mixture_needs_a_rank():
    with pytest.raises(ValueError, match="set rank"):
        DCNv2(4, list("abcd"), 1, num_experts=2, rank=None)


@pytest.fixture(scope="module")
def fm_run(funnel_dir, tmp_path_factory):
    """One small trained run with the fm block, exported with the parity check."""
    tmp = tmp_path_factory.mktemp("fm_run")
    cfg = write_config(tmp / "c.yaml", funnel_dir, interaction={"name": "fm"},
                       train={"batch_size": 1024, "epochs": 1, "progress": False, "threads": 1})
    run_cli("train", cfg, "--out", tmp / "run")
    run_cli("export", tmp / "run", "-o", tmp / "m.onnx")  # exits 2 when the parity check fails
    return tmp


def run_cli(*args) -> None:
    from recmtl.cli import main
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert exc.code in (0, None), f"{args[0]} exited {exc.code}"


def test_fm_trains_and_exports(fm_run):
    assert (fm_run / "m.onnx").is_file()
    metrics = json.loads((fm_run / "run" / "metrics.json").read_text())
    assert metrics


def test_fm_batch_normalize_trains_and_exports(funnel_dir, tmp_path):
    """fm with normalize: batch (running statistics at export) and the learned scale passes the parity check."""
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, tower={"name": "shared_bottom", "bottom_units": [16], "task_units": [8]},
                       interaction={"name": "fm", "normalize": "batch", "scale": True},
                       train={"batch_size": 2048, "epochs": 1, "progress": False, "threads": 1})
    run_cli("train", cfg, "--out", tmp_path / "run")
    run_cli("export", tmp_path / "run", "-o", tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").is_file()


def test_dcn_v2_mixture_parallel_exports(funnel_dir, tmp_path):
    """The einsum-heavy variant (mixture of low-rank experts, parallel deep part) passes the parity check."""
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, tower={"name": "shared_bottom", "bottom_units": [16], "task_units": [8]},
                       interaction={"name": "dcn_v2", "num_layers": 2, "rank": 4, "num_experts": 2,
                                    "structure": "parallel", "deep_units": [16]},
                       train={"batch_size": 2048, "epochs": 1, "progress": False, "threads": 1})
    run_cli("train", cfg, "--out", tmp_path / "run")
    run_cli("export", tmp_path / "run", "-o", tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").is_file()


def test_autoint_with_output_scale_exports(funnel_dir, tmp_path):
    """autoint's learned output scale passes the export's parity check."""
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, tower={"name": "shared_bottom", "bottom_units": [16], "task_units": [8]},
                       interaction={"name": "autoint", "num_layers": 1, "num_heads": 1, "attention_dim": 4,
                                    "output_scale": True},
                       train={"batch_size": 2048, "epochs": 1, "progress": False, "threads": 1})
    run_cli("train", cfg, "--out", tmp_path / "run")
    run_cli("export", tmp_path / "run", "-o", tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").is_file()


def model_for(fm_run, **sections) -> MultiTaskModel:
    raw = yaml.safe_load((fm_run / "run" / "config.yaml").read_text())
    raw.update(sections)
    config = parse_config(raw)
    validate_plugins(config, REGISTRY)
    return MultiTaskModel(config, FittedSchema.load(fm_run / "run"), REGISTRY)


TOWER_PARAMS = {"shared_bottom": {"bottom_units": [8], "task_units": [4]}, "stem": {"expert_units": [8], "embedding_dim": 2},
                "soft_sharing": {"units": [8]}, "cross_stitch": {"units": [8]}}
BLOCKS = {"fm": {}, "autoint": {"num_layers": 1}, "dcn_v2": {"num_layers": 1, "rank": 4, "num_experts": 2},
          "dcn_v2 parallel": {"num_layers": 1, "structure": "parallel", "deep_units": [8]}}


@pytest.mark.parametrize("tower", sorted(REGISTRY.names("tower")))
def test_every_tower_on_every_block(fm_run, tower):
    """The model's dry run passes and a training step sends gradients into the block, for each block."""
    import inspect
    accepted = inspect.signature(REGISTRY.get("tower", tower)).parameters
    params = {k: v for k, v in {"expert_units": [8], "task_units": [4], **TOWER_PARAMS.get(tower, {})}.items() if k in accepted}
    for label, block in BLOCKS.items():
        model = model_for(fm_run, interaction={"name": label.split()[0], **block}, tower={"name": tower, **params})
        inputs = {k: example_input(k, e.features, 3) for k, e in model.encoders.items()}
        outputs = model(inputs)
        sum(o.float().sum() for o in outputs.values()).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.interaction.parameters()) or label == "fm", label


def test_field_view_names_and_projection(fm_run):
    model = model_for(fm_run, interaction={"name": "autoint", "field_dim": 4})
    assert model.field_names == ["user_id", "item_id", "c03", "c04", "c05", "c06", "d01", "d02", "d03", "d04"]
    inputs = {k: example_input(k, e.features, 2) for k, e in model.encoders.items()}
    x, fields = model.encode_all(inputs)
    assert fields.shape == (2, 10, 4) and x.shape == (2, 6 * 8 + 4)  # embeddings of 8 projected to 4, dense to 4


BAD = [
    ({"interaction": {"name": "fmm"}}, "unknown interaction 'fmm'"),
    ({"interaction": {"name": "dcn_v2", "layers": 2}}, "interaction 'dcn_v2' does not take parameter 'layers'"),
    ({"interaction": {"name": "fm", "field_dim": 0}}, "interaction.field_dim must be a positive width"),
    ({"interaction": {"name": "autoint"}, "features": [{"name": "d01", "kind": "dense"}]},
     "interaction 'autoint' needs at least 2 fields"),
    ({"interaction": {"name": "dcn_v2", "exclude_fields": ["user_id", "itemid"]}},
     "interaction 'dcn_v2': exclude_fields names 'itemid', not a field of the inputs"),
    ({"interaction": {"name": "dcn_v2", "cross_fields": ["c03", "c99"]}},
     "interaction 'dcn_v2': cross_fields names 'c99', not a field of the inputs"),
    ({"interaction": {"name": "dcn_v2", "field_columns": [0]}}, "interaction 'dcn_v2' does not take parameter 'field_columns'"),
]


@pytest.mark.parametrize("sections,message", BAD, ids=[m for _, m in BAD])
def test_bad_interaction_config_fails_before_reading_data(cli, tmp_path, sections, message):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "no_such_data", **sections)
    r = cli("train", cfg, "--out", tmp_path / "run")
    assert r.code == 2 and message in r.err, r
    assert "Traceback" not in r.err


def test_interaction_none_is_todays_model(fm_run):
    model = model_for(fm_run, interaction=None)
    assert model.interaction is None and model.gates is None
    with pytest.raises(RecmtlError, match="unknown interaction 'nope'"):
        validate_plugins(parse_config({**yaml.safe_load((fm_run / "run" / "config.yaml").read_text()),
                                       "interaction": {"name": "nope"}}), REGISTRY)


def test_datagen_interactions_and_task_fields(tmp_path, cli):
    import numpy as np
    import pyarrow.parquet as pq

    from recmtl.data.synthetic import funnel

    def logits(d, col):
        p = pq.read_table(d / "train.truth.parquet")[col].to_numpy().astype(np.float64)
        return np.log(p / (1 - p))

    kw = dict(rows=6000, seed=1, categorical=6, dense=2, cardinality=30, valid_fraction=0, test_fraction=0)
    funnel(tmp_path / "plain", **kw)
    funnel(tmp_path / "pairs", interactions=1.0, **kw)
    plain, pairs = pq.read_table(tmp_path / "plain" / "train.parquet"), pq.read_table(tmp_path / "pairs" / "train.parquet")
    assert plain.drop(["click", "conversion"]).equals(pairs.drop(["click", "conversion"]))  # only the labels change
    extra = logits(tmp_path / "pairs", "click") - logits(tmp_path / "plain", "click")
    assert 0.85 < extra.std() < 1.15  # the term's standard deviation is --interactions
    funnel(tmp_path / "split", task_fields=1, **kw)
    data = pq.read_table(tmp_path / "split" / "train.parquet")
    last = data["c06"].to_numpy()

    def spread(col: str) -> float:
        lg = logits(tmp_path / "split", col)
        return float(np.std([lg[last == v].mean() for v in np.unique(last) if (last == v).sum() > 50]))
    assert spread("click") > 3 * spread("cvr")  # the last field moves click only
    r = cli("datagen", "funnel", tmp_path / "bad", "--rows", "100", "--categorical", "4", "--task-fields", "2")
    assert r.code == 2 and "--task-fields must be in [0, 1]" in r.err, r


def test_third_party_encoders_field_view():
    """An encoder with the field view supplies its own fields and names; one without counts as one field."""
    from torch import nn

    from recmtl.contracts import Encoder, FeatureInfo
    from recmtl.training.model import FieldView

    class Pairs(Encoder):  # two fields of width 4 out of three dense values
        kind = "dense"
        has_fields = True

        def __init__(self, features):
            super().__init__(features)
            self.lin = nn.Linear(3, 8)

        @property
        def output_dim(self):
            return 8

        @property
        def field_names(self):
            return ["left", "right"]

        @property
        def field_dim(self):
            return 4

        def forward(self, x):
            return self.lin(x)

        def fields(self, x):
            return self.lin(x).view(-1, 2, 4)

    class Plain(Encoder):  # no field view
        kind = "image"

        @property
        def output_dim(self):
            return 5

        def forward(self, x):
            return x.flatten(1)[:, :5]

    feats = [FeatureInfo(n, "dense") for n in "abc"]
    encoders = nn.ModuleDict({"dense": Pairs(feats), "image": Plain([FeatureInfo("img", "image")])})
    view = FieldView(encoders, 4)
    assert view.names == ["left", "right", "image"]
    x = {"dense": torch.randn(2, 3), "image": torch.randn(2, 5)}
    flats = {k: e(x[k]) for k, e in encoders.items()}
    fields = {"dense": encoders["dense"].fields(x["dense"]), "image": None}
    out = view(encoders, flats, fields)
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out[:, :2], fields["dense"])  # the encoder's own width: as it is
    assert encoders["dense"].field_columns() == [0] * 4 + [1] * 4 and encoders["image"].field_columns() == [0] * 5


def test_dcn_v2_l2_is_the_sum_of_squares_of_the_cross_weights():
    """l2: the block's regularization() is l2 * sum(W^2) over the cross weights (not the biases); 0 by default."""
    torch.manual_seed(0)
    for params, weights in [({"rank": 2}, lambda b: [b.u, b.v]), ({"rank": None, "init": "random"},
                                                                     lambda b: [la.weight for la in b.full]),
                            ({"rank": 2, "num_experts": 2}, lambda b: [b.u, b.v, b.c])]:
        block = DCNv2(4, list("abcd"), 1, num_layers=2, l2=0.01, **params)
        want = 0.01 * sum(w.pow(2).sum() for w in weights(block))
        torch.testing.assert_close(block.regularization(), want)
        assert want > 0
    assert float(DCNv2(4, list("abcd"), 1).regularization()) == 0.0
    with pytest.raises(ValueError, match="l2 must be a non-negative number"):
        DCNv2(4, list("abcd"), 1, l2=-1.0)


def test_dcn_v2_cross_dropout_only_in_training():
    """cross_dropout drops units of the cross term in training; in eval the block is the one without it."""
    torch.manual_seed(0)
    block = DCNv2(6, list("ab"), 3, num_layers=2, init="random", cross_dropout=0.5)
    plain = DCNv2(6, list("ab"), 3, num_layers=2, init="random")
    plain.load_state_dict(block.state_dict())
    x = torch.randn(16, 6)
    block.eval(), plain.eval()
    torch.testing.assert_close(block(x, None), plain(x, None))
    block.train()
    assert not torch.allclose(block(x, None), plain(x, None))
    with pytest.raises(ValueError, match=r"cross_dropout must be in \[0, 1\)"):
        DCNv2(6, list("ab"), 3, cross_dropout=1.0)


def test_interaction_regularization_reaches_the_training_loss(fm_run):
    """The model adds the block's regularization() to the tower's term (and back-propagates it)."""
    model = model_for(fm_run, interaction={"name": "dcn_v2", "num_layers": 1, "l2": 0.5})
    model.train()
    inputs = {k: example_input(k, e.features, 3) for k, e in model.encoders.items()}
    model.run(inputs)
    reg = model.backward_regularization()
    want = model.interaction.regularization().detach() + model.tower.regularization({}).detach()
    assert reg == pytest.approx(float(want), rel=1e-5)
    assert reg > 0 and model.interaction.v.grad is not None and model.interaction.v.grad.abs().sum() > 0


def test_dcn_v2_l2_and_cross_dropout_train_and_export(funnel_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, tower={"name": "shared_bottom", "bottom_units": [16], "task_units": [8]},
                       interaction={"name": "dcn_v2", "num_layers": 2, "l2": 0.001, "cross_dropout": 0.2},
                       train={"batch_size": 2048, "epochs": 1, "progress": False, "threads": 1})
    run_cli("train", cfg, "--out", tmp_path / "run")
    run_cli("export", tmp_path / "run", "-o", tmp_path / "m.onnx")  # the parity check: no dropout at export
    assert (tmp_path / "m.onnx").is_file()


@pytest.mark.parametrize("params", [{}, {"rank": None}, {"rank": 2, "num_experts": 2}])
def test_dcn_v2_gate_starts_at_the_identity_and_learns(params):
    """gate: a zero-initialised scalar per layer on the cross term; the block starts as x (any init), the gates get
    a gradient (the weights keep their random draw), and a gate of 1 is the block without gates."""
    torch.manual_seed(0)
    block = DCNv2(6, list("ab"), 3, num_layers=2, gate=True, **params)
    x = torch.randn(8, 6)
    y = block(x, None)
    torch.testing.assert_close(y, x)
    y.pow(2).sum().backward()
    assert block.gates.grad is not None and block.gates.grad.abs().sum() > 0
    plain = DCNv2(6, list("ab"), 3, num_layers=2, init="random", **params)
    plain.load_state_dict({k: v for k, v in block.state_dict().items() if k != "gates"})
    with torch.no_grad():
        block.gates.fill_(1.0)
    torch.testing.assert_close(block(x, None), plain(x, None))
    with pytest.raises(ValueError, match="gate must be true or false"):
        DCNv2(6, list("ab"), 3, gate="yes")


def test_dcn_v2_lr_scale_puts_the_cross_layers_in_their_own_group(fm_run):
    """lr_scale: the cross layers' parameters (not the parallel deep MLP's, not the tower's) train at lr_scale x lr."""
    from recmtl.training.optimizers import make_optimizers

    inter = {"name": "dcn_v2", "num_layers": 2, "structure": "parallel", "deep_units": [8], "lr_scale": 0.1}
    model = model_for(fm_run, interaction=inter)
    config = parse_config(yaml.safe_load((fm_run / "run" / "config.yaml").read_text()))
    dense = make_optimizers(config, model, torch.nn.Module())[0]  # a balancer without parameters
    lr = config.optimizer.lr
    by_lr = {round(g["lr"] / lr, 6): {id(p) for p in g["params"]} for g in dense.param_groups}
    block = model.interaction
    cross = {id(p) for n, p in block.named_parameters() if not n.startswith("deep.")}
    assert set(by_lr) == {1.0, 0.1} and by_lr[0.1] == cross
    assert {id(p) for p in block.deep.parameters()} <= by_lr[1.0]
    assert DCNv2(6, list("ab"), 3).lr_scales() == []
    with pytest.raises(ValueError, match="lr_scale must be a positive number"):
        DCNv2(6, list("ab"), 3, lr_scale=0)


def test_dcn_v2_gate_and_lr_scale_train_and_export(funnel_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, tower={"name": "shared_bottom", "bottom_units": [16], "task_units": [8]},
                       interaction={"name": "dcn_v2", "num_layers": 2, "gate": True, "lr_scale": 0.2},
                       train={"batch_size": 2048, "epochs": 1, "progress": False, "threads": 1})
    run_cli("train", cfg, "--out", tmp_path / "run")
    run_cli("export", tmp_path / "run", "-o", tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").is_file()


def _dense_optimizer(fm_run, interaction):
    from recmtl.training.optimizers import make_optimizers

    model = model_for(fm_run, interaction=interaction)
    config = parse_config(yaml.safe_load((fm_run / "run" / "config.yaml").read_text()))
    return model, make_optimizers(config, model, torch.nn.Module())[0], config.optimizer.lr


def test_dcn_v2_weight_decay_is_decoupled_on_the_cross_weights_only(fm_run):
    """weight_decay: the cross weights (not the biases, not the tower) get p <- p - lr * lr_scale * wd * p before
    the optimiser's own step, whatever optimizer.name (here Adam: with zero gradients its step moves nothing)."""
    model, opt, lr = _dense_optimizer(fm_run, {"name": "dcn_v2", "num_layers": 2, "init": "random",
                                               "weight_decay": 2.0, "lr_scale": 0.5})
    block = model.interaction
    decayed = {id(p) for p in block.cross_weights()}
    groups = [g for g in opt.param_groups if "block_weight_decay" in g]
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == decayed
    assert groups[0]["block_weight_decay"] == 2.0 and groups[0]["lr"] == pytest.approx(0.5 * lr)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in model.parameters():
        factor = 1 - 0.5 * lr * 2.0 if id(p) in decayed else 1.0
        torch.testing.assert_close(p.detach(), before[id(p)] * factor)
    assert not isinstance(_dense_optimizer(fm_run, {"name": "dcn_v2"})[1], type(opt))  # the default: no wrapper
    _, plain, _ = _dense_optimizer(fm_run, {"name": "dcn_v2"})
    assert len(plain.param_groups) == 1 and "block_weight_decay" not in plain.param_groups[0]
    with pytest.raises(ValueError, match="weight_decay must be a non-negative number"):
        DCNv2(6, list("ab"), 3, weight_decay=-1)


def test_a_third_party_block_gets_optimizer_groups(fm_run):
    """optimizer_groups() is the contract (a user's block has the built-ins' power); bad options are named."""
    from recmtl.errors import PluginError
    from recmtl.training.optimizers import dense_groups

    model = model_for(fm_run, interaction={"name": "fm"})
    dense = list(model.parameters())
    first = next(model.interaction.parameters(), None) or next(model.tower.parameters())
    model.interaction.optimizer_groups = lambda: [([first], {"weight_decay": 0.1, "lr_scale": 2.0})]
    groups = dense_groups(model, dense, 0.01)
    mine = [g for g in groups if g.get("block_weight_decay")]
    assert len(mine) == 1 and mine[0]["params"] == [first] and mine[0]["lr"] == pytest.approx(0.02)
    model.interaction.optimizer_groups = lambda: [([first], {"decay": 0.1})]
    with pytest.raises(PluginError, match=r"asked for optimiser option\(s\) \['decay'\]"):
        dense_groups(model, dense, 0.01)


def test_dcn_v2_gate_l1_adds_the_gates_absolute_values():
    torch.manual_seed(0)
    block = DCNv2(6, list("ab"), 3, num_layers=2, gate=True, gate_l1=0.1, l2=0.01)
    with torch.no_grad():
        block.gates.copy_(torch.tensor([0.5, -2.0]))
    want = 0.01 * sum(w.pow(2).sum() for w in block.cross_weights()) + 0.1 * 2.5
    torch.testing.assert_close(block.regularization(), want)
    with pytest.raises(ValueError, match="gate_l1 penalises the gates: set gate: true too"):
        DCNv2(6, list("ab"), 3, gate_l1=0.1)


def test_dcn_v2_cross_fields_cross_only_their_columns():
    """exclude_fields / cross_fields: the other fields' columns pass through and do not enter the crosses."""
    torch.manual_seed(0)
    cols = [0] * 4 + [1] * 4 + [2] * 4
    for params in ({"exclude_fields": ["a"]}, {"cross_fields": ["b", "c"]}):
        block = DCNv2(12, list("abc"), 4, num_layers=2, init="random", field_columns=cols, **params)
        x = torch.randn(5, 12)
        y = block(x, None)
        assert block.v.shape[-2] == 8 and block.rank == 1  # auto: the crossed width // 8
        torch.testing.assert_close(y[:, :4], x[:, :4])
        assert not torch.allclose(y[:, 4:], x[:, 4:])
        x2 = x.clone()
        x2[:, :4] = torch.randn(5, 4)
        torch.testing.assert_close(block(x2, None)[:, 4:], y[:, 4:])
    with pytest.raises(ValueError, match="need field_columns"):
        DCNv2(12, list("abc"), 4, exclude_fields=["a"])
    with pytest.raises(ValueError, match="leave no field to cross"):
        DCNv2(12, list("abc"), 4, cross_fields=["a"], exclude_fields=["a"], field_columns=cols)


def test_dcn_v2_new_options_train_and_export(funnel_dir, tmp_path):
    """weight_decay, gate_l1 and exclude_fields through the model (field_columns from the encoders) and the export."""
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, tower={"name": "shared_bottom", "bottom_units": [16], "task_units": [8]},
                       interaction={"name": "dcn_v2", "num_layers": 2, "gate": True, "gate_l1": 0.01,
                                    "weight_decay": 0.5, "exclude_fields": ["user_id", "item_id"]},
                       train={"batch_size": 2048, "epochs": 1, "progress": False, "threads": 1})
    run_cli("train", cfg, "--out", tmp_path / "run")
    run_cli("export", tmp_path / "run", "-o", tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").is_file()


def _bench(name: str):
    import importlib.util
    import sys
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / f"{name}.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_census_blocks_block_parameters():
    """census_blocks.py: ``block+key=value`` variants change the block's parameters (values read as YAML)."""
    bench = _bench("census_blocks")
    sets = bench.variant_sets("fm+normalize=batch+scale=true")
    assert yaml.safe_load(sets["interaction"]) == {"name": "fm", "normalize": "batch", "scale": True}
    assert bench.variant_sets("dcn_v2") == bench.VARIANTS["dcn_v2"]
    with pytest.raises(SystemExit, match="only an interaction block takes parameters"):
        bench.variant_sets("gates+sparsity=0.1")
    with pytest.raises(SystemExit, match="unknown variant 'fmm'"):
        bench.variant_sets("fmm")


def test_fm_scale_reports_the_pairwise_term(fm_run, funnel_dir, capsys):
    """fm_scale.py: one table row per run, the pairwise term's RMS against the flat vector's."""
    assert _bench("fm_scale").main([str(fm_run / "run"), "--data", str(funnel_dir / "valid.parquet"), "--rows", "2048"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("| run |") and row.count("|") == 8 and "x |" in row
