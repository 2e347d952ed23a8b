"""Per-task feature selection (issue 16): feature gates with their [task x field] matrix in diagnostics and the
report, the pepnet tower, `recmtl importance`, all exported with the parity check."""
from __future__ import annotations

import json

import pytest
import torch

from recmtl.training.model import FeatureGates
from tests.conftest import write_config


def test_gates_start_at_one_and_scale_each_tasks_copy():
    gates = FeatureGates(["a", "b"], ["f", "g"], [0, 0, 1], sparsity=0.5)
    with torch.no_grad():
        gates.logits[1, 0] = -30.0  # task b drops field f
    x = torch.ones(4, 3)
    fields = torch.ones(4, 2, 5)
    xs, fs = gates(x, fields)
    assert xs.shape == (8, 3) and fs.shape == (8, 2, 5)
    torch.testing.assert_close(xs[:4], x)  # task a: gate 2*sigmoid(0) = 1
    assert xs[4:, :2].abs().max() < 1e-6 and torch.allclose(xs[4:, 2], torch.ones(4))
    assert gates.penalty().item() == pytest.approx(0.5 * 3.0, abs=1e-4)
    assert gates.matrix()["rows"] == ["a", "b"] and gates.matrix()["cols"] == ["f", "g"]


@pytest.fixture(scope="module")
def gated_run(funnel_dir, tmp_path_factory):
    """pepnet + autoint + feature gates, one epoch, exported with the parity check."""
    from tests.test_interactions import run_cli
    tmp = tmp_path_factory.mktemp("gated")
    cfg = write_config(tmp / "c.yaml", funnel_dir, interaction={"name": "autoint", "num_layers": 1},
                       feature_gates={"sparsity": 0.001},
                       tower={"name": "pepnet", "gate_features": ["user_id", "item_id"], "task_units": [16]},
                       train={"batch_size": 1024, "epochs": 1, "progress": False, "threads": 1})
    run_cli("train", cfg, "--out", tmp / "run")
    run_cli("export", tmp / "run", "-o", tmp / "m.onnx")
    return tmp


def test_gate_matrix_in_diagnostics_and_report(gated_run, cli):
    history = json.loads((gated_run / "run" / "metrics.json").read_text())["history"]
    mats = history[-1]["diagnostics"]["matrices"]
    gates = mats["feature_gates"]
    assert gates["rows"] == ["click", "conversion"] and len(gates["cols"]) == 10 and "user_id" in gates["cols"]
    assert all(0 < v < 2 for row in gates["values"] for v in row)
    assert "ppnet_gates" in mats  # pepnet's own diagnostics beside the gates
    r = cli("report", gated_run / "run", "-o", gated_run / "report")
    assert r.code == 0, r
    assert (gated_run / "report" / "matrix_feature_gates.png").is_file()
    assert "Which features each task uses" in (gated_run / "report" / "index.html").read_text()
    assert (gated_run / "m.onnx").is_file()  # exported: the parity check passed


def test_importance_table_json_and_png(gated_run, funnel_dir, cli):
    r = cli("importance", gated_run / "run", funnel_dir / "valid.parquet", "--repeats", "2", "--rows", "1500",
            "--tasks", "click", "-o", gated_run / "imp")
    assert r.code == 0, r
    assert "useful to all tasks:" in r.out and "no measurable use:" in r.out and "user_id" in r.out
    result = json.loads((gated_run / "imp" / "importance.json").read_text())
    assert result["tasks"] == ["click"] and set(result["importance"]) >= {"user_id", "d01"}
    assert sum(len(v) for v in result["groups"].values()) == 10
    assert (gated_run / "imp" / "importance.png").stat().st_size > 1000


def test_importance_bad_input(gated_run, funnel_dir, cli, tmp_path):
    import pyarrow.parquet as pq
    r = cli("importance", gated_run / "run", funnel_dir / "valid.parquet", "--tasks", "ctr")
    assert r.code == 2 and "--tasks names unknown task(s) ctr" in r.err, r
    pq.write_table(pq.read_table(funnel_dir / "valid.parquet").drop(["d02"]), tmp_path / "v.parquet")
    r = cli("importance", gated_run / "run", tmp_path / "v.parquet")
    assert r.code == 2 and "d02" in r.err and "Traceback" not in r.err, r


def test_pepnet_gate_features_must_be_categorical_features(cli, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "no_such_data", tower={"name": "pepnet", "gate_features": ["user_idd"]})
    r = cli("train", cfg, "--out", tmp_path / "run")
    assert r.code == 2 and "gate_features names 'user_idd', which is not a categorical feature (did you mean" in r.err, r
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "no_such_data", tower={"name": "pepnet", "gate_features": ["d01"]})
    r = cli("train", cfg, "--out", tmp_path / "run")
    assert r.code == 2 and "'d01', which is not a categorical feature" in r.err, r


def test_pepnet_gates_the_heads_input_as_in_the_paper():
    """PPNet gates every layer's input up to the logit: with gate_output the last hidden layer (the head's input)
    gets its own gate; gate_output: false is the tower without it."""
    from recmtl import FeatureInfo
    from recmtl_plugins.towers.pepnet import PEPNet
    feats = {"categorical": [FeatureInfo(name="user_id", kind="categorical", cardinality=7)]}
    torch.manual_seed(0)
    tower = PEPNet(6, ["a", "b"], feats, task_units=[5, 3], gate_units=4)
    plain = PEPNet(6, ["a", "b"], feats, task_units=[5, 3], gate_units=4, gate_output=False)
    assert [len(tower.ppnet[t]) for t in "ab"] == [3, 3] and [len(plain.ppnet[t]) for t in "ab"] == [2, 2]
    assert tower.ppnet["a"][-1].net[-1].out_features == 3  # one gate value per unit of the head's input
    x, inputs = torch.randn(4, 6), {"categorical": torch.randint(0, 7, (4, 1))}
    with torch.no_grad():  # an output gate of 0 (2·sigmoid(-inf)) switches task a's head input off, not b's
        tower.ppnet["a"][-1].net[-1].bias.fill_(-40.0)
    out = tower(x, inputs)
    assert out["a"].shape == (4, 3) and out["a"].abs().max() < 1e-6 and out["b"].abs().sum() > 0


def test_pepnet_leaky_head_input_and_positive_bias_init():
    """output_activation: leaky_relu changes the last task layer's activation only (its negative side leaks, so no
    head-input unit is 0 on every row); task_bias_init starts every task layer's bias at that value."""
    from recmtl import FeatureInfo
    from recmtl_plugins.towers.pepnet import PEPNet
    feats = {"categorical": [FeatureInfo(name="user_id", kind="categorical", cardinality=7)]}
    torch.manual_seed(0)
    relu = PEPNet(6, ["a"], feats, task_units=[5, 3], gate_units=4)
    leaky = PEPNet(6, ["a"], feats, task_units=[5, 3], gate_units=4, output_activation="leaky_relu")
    leaky.load_state_dict(relu.state_dict())
    x, inputs = torch.randn(256, 6), {"categorical": torch.randint(0, 7, (256, 1))}
    with torch.no_grad():
        r, k = relu(x, inputs)["a"], leaky(x, inputs)["a"]
    assert r.min() >= 0 and k.min() < 0 and torch.equal(r[r > 0], k[r > 0])
    biased = PEPNet(6, ["a"], feats, task_units=[5, 3], gate_units=4, task_bias_init=0.01)
    assert all(torch.all(layer.bias == 0.01) for layer in biased.layers["a"])
    with pytest.raises(ValueError, match="output_activation must be one of relu, leaky_relu, got 'tanh'"):
        PEPNet(6, ["a"], feats, output_activation="tanh")
