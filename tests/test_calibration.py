"""Calibration (issue 19): metrics, calibrators, the downsampling correction, score fusion, in numpy, in the
ONNX graph and through the CLI."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import write_config
from onnx import TensorProto, helper
from sklearn.metrics import brier_score_loss, log_loss

from recmtl import metrics as M
from recmtl.calibration import FUSED_OUTPUT, ScoreMap, correct_downsampling, fit_calibrator, fuse_expression, logit
from recmtl.errors import ConfigError


def _miscalibrated(n: int = 20000, seed: int = 0, bias: float = 0.7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true = 1 / (1 + np.exp(-rng.normal(-1.5, 1.0, n)))
    label = (rng.random(n) < true).astype(np.float64)
    z = np.log(true / (1 - true))
    return label, 1 / (1 + np.exp(-(1.8 * z + bias))), true  # overconfident (and too high)


def test_calibration_metrics_match_their_definitions():
    y, s, true = _miscalibrated()
    rate = y.mean()
    entropy = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    assert M.normalized_entropy(y, s) == pytest.approx(log_loss(y, s) / entropy, rel=1e-6)
    assert M.calibration_ratio(y, s) == pytest.approx(s.sum() / y.sum())
    assert M.brier(y, s) == pytest.approx(brier_score_loss(y, s))
    rel = M.reliability(y, s)
    assert sum(rel["count"]) == len(y) and len(rel["count"]) == M.CALIBRATION_BINS
    assert max(rel["count"]) - min(rel["count"]) <= 1  # equal mass
    assert M.ece(y, true) < 0.02 < M.ece(y, s)
    m = M.binary_metrics(y, s)
    assert set(M.CALIBRATION_METRICS) <= set(m)
    assert np.isnan(M.normalized_entropy(np.ones(4), np.full(4, 0.5))) and np.isnan(M.calibration_ratio(np.zeros(3), np.ones(3)))


@pytest.mark.parametrize("method", ["isotonic", "platt", "temperature"])
def test_calibrators_reduce_ece(method):
    y, s, _ = _miscalibrated(bias=0.0 if method == "temperature" else 0.7)  # one parameter: no shift to fix
    cal = fit_calibrator(method, y[:10000], logit(s[:10000]))
    after = cal.apply(s[10000:])
    assert M.ece(y[10000:], after) < 0.5 * M.ece(y[10000:], s[10000:])
    if method != "isotonic":  # monotone increasing maps keep the order exactly
        assert M.auc(y[10000:], after) == pytest.approx(M.auc(y[10000:], s[10000:]), abs=1e-12)
    json.dumps(cal.to_json())  # plain JSON


def test_downsampling_correction_multiplies_the_odds():
    p = np.array([0.01, 0.2, 0.5, 0.9])
    q = correct_downsampling(p, 0.1)
    np.testing.assert_allclose(q / (1 - q), 0.1 * p / (1 - p))
    assert correct_downsampling(p, 1.0) is p


def test_fusion_parses_safely():
    f = fuse_expression("click^1.0 * conversion^0.5 + 0.1 * -click", ["click", "conversion"])
    c, v = np.array([0.2, 0.5]), np.array([0.04, 0.25])
    np.testing.assert_allclose(f.evaluate({"click": c, "conversion": v}), c * v ** 0.5 - 0.1 * c)
    for bad, says in [("click * nope", "names 'nope'"), ("click *", "not a valid expression"),
                      ("__import__('os').system('x')", "not allowed"), ("click.real", "not allowed"),
                      ("3 * 2", "names no task"), ("click if 1 else 2", "not allowed")]:
        with pytest.raises(ConfigError, match=says):
            fuse_expression(bad, ["click", "conversion"])


@pytest.mark.parametrize("method", ["isotonic", "platt", "temperature"])
def test_graph_score_map_matches_numpy(method):
    from recmtl.export.graph import postprocessing
    y, s, _ = _miscalibrated(4000, seed=1)
    rate = 1.0 if method == "isotonic" else 0.25  # isotonic's steep segments magnify float32 rounding of the rate
    smap = ScoreMap({"click": rate}, {"click": fit_calibrator(method, y, logit(correct_downsampling(s, rate)))})
    g = postprocessing(smap, {"click": "raw"}, {"click": "out"})
    model = helper.make_model(helper.make_graph(
        g.nodes, "t", [helper.make_tensor_value_info("raw", TensorProto.FLOAT, ["b"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b"])], g.inits),
        opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    p = np.concatenate([s, [0.0, 1.0, 1e-9]]).astype(np.float32)
    got = sess.run(["out"], {"raw": p})[0]
    np.testing.assert_allclose(got, smap.task("click", p), atol=2e-6)


def _post_session(smap, tasks):
    from recmtl.export.graph import postprocessing
    g = postprocessing(smap, {t: f"raw_{t}" for t in tasks}, {t: f"out_{t}" for t in tasks})
    model = helper.make_model(helper.make_graph(
        g.nodes, "t", [helper.make_tensor_value_info(f"raw_{t}", TensorProto.FLOAT, [f"b_{t}"]) for t in tasks],
        [helper.make_tensor_value_info(f"out_{t}", TensorProto.FLOAT, [f"b_{t}"]) for t in tasks], g.inits),
        opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("method", ["isotonic", "platt", "temperature"])
def test_graph_on_logits_matches_numpy_in_the_tails(method):
    """The graph's float32 map of a logit equals the float64 reference within 1e-6 everywhere, probabilities of
    1e-7 and 1 - 1e-7 included, for a binary head (its logit) and an esmm head (the logit of its probability)."""
    y, s, _ = _miscalibrated(6000, seed=2)
    z = logit(s)
    smap = ScoreMap({"click": 0.25}, {"click": fit_calibrator(method, y, z + np.log(0.25)),
                                      "conv": fit_calibrator(method, y, z)}, logit_tasks={"click"})
    sess = _post_session(smap, ["click", "conv"])
    extremes = np.array([1e-7, 1 - 1e-7, 1e-6, 0.5, 1e-3, 0.999])
    zs = np.concatenate([z, logit(extremes), [-40.0, -17.0, 0.0, 17.0, 40.0]]).astype(np.float32)
    ps = np.concatenate([s, extremes, [0.0, 1.0, 1e-9]]).astype(np.float32)
    got_z, got_p = sess.run(["out_click", "out_conv"], {"raw_click": zs, "raw_conv": ps})
    np.testing.assert_allclose(got_z, smap.task("click", None, zs), atol=1e-6, rtol=0)
    np.testing.assert_allclose(got_p, smap.task("conv", ps), atol=1e-6, rtol=0)
    if method != "isotonic":  # the tails keep their relative precision: a logit, not a float32 probability
        tail = smap.task("click", None, zs[-5:])
        np.testing.assert_allclose(got_z[-5:], tail, rtol=1e-5, atol=1e-30)


def test_downsampling_alone_on_the_logit_in_the_graph():
    smap = ScoreMap({"click": 0.1}, logit_tasks={"click"})
    zs = np.array([-30, -16.1, -3, 0, 3, 15.9, 30], np.float32)
    got = _post_session(smap, ["click"]).run(["out_click"], {"raw_click": zs})[0]
    want = correct_downsampling(1 / (1 + np.exp(-zs.astype(np.float64))), 0.1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(smap.task("click", None, zs), want, rtol=1e-12)


def test_isotonic_knots_are_on_the_logit_and_not_steep():
    from recmtl.calibration import ISOTONIC_MAX_SLOPE
    y, s, _ = _miscalibrated(20000, seed=4)
    cal = fit_calibrator("isotonic", y, logit(s))
    x, v = np.array(cal.params["x"]), np.array(cal.params["y"])
    assert (np.diff(x) > 0).all() and (np.diff(v) >= 0).all()
    assert (x.astype(np.float32) == x).all()  # exact in float32, as the graph holds them
    assert (np.diff(v) / np.diff(x)).max() <= ISOTONIC_MAX_SLOPE + 1e-12
    assert x.min() < -2 and x.max() > 2  # logits, not probabilities


def test_calibrator_file_format_1_is_refused(tmp_path):
    from recmtl.calibration import read_calibrators
    from recmtl.errors import DataError
    path = tmp_path / "calibrator.json"
    path.write_text(json.dumps({"format": 1, "method": "platt", "tasks": {"click": {"method": "platt", "a": 1, "b": 0}}}))
    with pytest.raises(DataError, match="format-1 calibrator file .* run `recmtl calibrate` again"):
        read_calibrators(path)


# ---- end to end ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib_run(tmp_path_factory, funnel_dir):
    """A 1-epoch funnel run with a regression task on a column that is not a feature."""
    from recmtl.cli import main
    tmp = tmp_path_factory.mktemp("calib")
    cfg = write_config(tmp / "cfg.yaml", funnel_dir, train={"batch_size": 1024, "epochs": 1, "progress": False})
    raw = yaml.safe_load(cfg.read_text())
    raw["features"] = [f for f in raw["features"] if f["name"] != "d04"]
    raw["tasks"].append({"name": "dwell", "label": "d04", "head": "regression"})
    cfg.write_text(yaml.safe_dump(raw))
    try:
        main(["train", str(cfg), "--out", str(tmp / "run")])
    except SystemExit as exc:
        assert not exc.code
    return tmp / "run"


def test_calibrate_evaluate_export_score(cli, calib_run, funnel_dir, tmp_path):
    valid, test = funnel_dir / "valid.parquet", funnel_dir / "test.parquet"
    r = cli("calibrate", calib_run, "--data", valid, "--method", "platt", "--test", test)
    assert r.code == 0, r
    assert "click" in r.out and "conversion" in r.out and "dwell" not in r.out and "->" in r.out
    saved = json.loads((calib_run / "calibrator.json").read_text())
    assert set(saved["tasks"]) == {"click", "conversion"} and saved["tasks"]["click"]["method"] == "platt"
    assert saved["metrics"]["click"]["test"]["after"]["calibration_ratio"] > 0
    r = cli("evaluate", calib_run, test, "--save-predictions", tmp_path / "p.parquet", "--json")
    assert r.code == 0 and "calibrated scores (platt" in r.err, r
    assert json.loads(r.out)["calibrators"] == {"click": "platt", "conversion": "platt"}
    r = cli("evaluate", calib_run, test, "--save-predictions", tmp_path / "raw.parquet", "--no-calibration")
    assert r.code == 0 and "calibrated" not in r.err, r
    r = cli("export", calib_run, "-o", tmp_path / "m.onnx", "--fuse", "click^1.0 * conversion^0.5")
    assert r.code == 0, r
    assert "ranking_score=" in r.out
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    cal = json.loads(meta["recmtl.calibration"])
    assert cal["calibrators"]["click"]["method"] == "platt" and cal["fusion"] == "click^1.0 * conversion^0.5"
    r = cli("score", tmp_path / "m.onnx", test, "-o", tmp_path / "s.parquet", "--no-progress")
    assert r.code == 0, r
    scored, evaluated, raw = (pq.read_table(tmp_path / f) for f in ("s.parquet", "p.parquet", "raw.parquet"))
    for t in ("click", "conversion"):
        np.testing.assert_allclose(scored[t].to_numpy(), evaluated[t].to_numpy(), atol=1e-6)
        assert not np.allclose(evaluated[t].to_numpy(), raw[t].to_numpy(), atol=1e-4)
    np.testing.assert_allclose(scored["dwell"].to_numpy(), raw["dwell"].to_numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scored[FUSED_OUTPUT].to_numpy(),
                               scored["click"].to_numpy() * scored["conversion"].to_numpy() ** 0.5, rtol=1e-5)


def test_report_draws_reliability_diagrams(cli, calib_run, tmp_path):
    pytest.importorskip("matplotlib")
    metrics = json.loads((calib_run / "metrics.json").read_text())
    bins = metrics["reliability"]["validation"]["click"]
    assert sum(bins["count"]) == metrics["validation"]["click"]["rows"] and "dwell" not in metrics["reliability"]["validation"]
    assert {"ne", "calibration_ratio", "ece", "brier"} <= set(metrics["validation"]["conversion"])
    r = cli("report", calib_run, "-o", tmp_path / "rep")
    assert r.code == 0, r
    assert (tmp_path / "rep" / "reliability.png").is_file()
    assert "Reliability diagrams" in (tmp_path / "rep" / "index.html").read_text()


def test_negative_sampling_rate_in_evaluate_and_graph(cli, calib_run, funnel_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(calib_run, run)
    (run / "calibrator.json").unlink(missing_ok=True)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["tasks"][0]["negative_sampling_rate"] = 0.5
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    test = funnel_dir / "test.parquet"
    assert cli("evaluate", calib_run, test, "--no-calibration", "--save-predictions", tmp_path / "a.parquet").code == 0
    assert cli("evaluate", run, test, "--save-predictions", tmp_path / "b.parquet").code == 0
    a, b = (pq.read_table(tmp_path / f)["click"].to_numpy() for f in ("a.parquet", "b.parquet"))
    np.testing.assert_allclose(b, correct_downsampling(a.astype(np.float64), 0.5), rtol=1e-5)
    r = cli("export", run, "-o", tmp_path / "m.onnx")
    assert r.code == 0 and "negatives kept at 0.5" in r.out, r
    assert cli("score", tmp_path / "m.onnx", test, "-o", tmp_path / "s.parquet", "--no-progress").code == 0
    np.testing.assert_allclose(pq.read_table(tmp_path / "s.parquet")["click"].to_numpy(), b, atol=1e-6)


def test_calibration_bad_input(cli, calib_run, funnel_dir, tmp_path):
    valid = pq.read_table(funnel_dir / "valid.parquet")
    before = (calib_run / "calibrator.json").read_bytes() if (calib_run / "calibrator.json").exists() else None
    pq.write_table(valid.drop(["click"]), tmp_path / "nolabel.parquet")
    pq.write_table(valid.filter(pa.compute.equal(valid["click"], 0)), tmp_path / "oneclass.parquet")
    pq.write_table(valid.slice(0, 0), tmp_path / "empty.parquet")
    cases = [(["--data", funnel_dir / "valid.parquet", "--tasks", "dwell"], "regression head, which calibration does not"),
             (["--data", funnel_dir / "valid.parquet", "--tasks", "nope"], "no such task"),
             (["--data", funnel_dir / "valid.parquet", "--method", "magic"], "use one of isotonic, platt, temperature"),
             (["--data", tmp_path / "nolabel.parquet"], "no label column 'click' of task 'click'"),
             (["--data", tmp_path / "oneclass.parquet"], "needs both classes"),
             (["--data", tmp_path / "empty.parquet"], "has no rows")]
    for args, says in cases:
        r = cli("calibrate", calib_run, *args)
        assert r.code == 2 and says in r.err and "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1, (args, r)
    after = (calib_run / "calibrator.json").read_bytes() if (calib_run / "calibrator.json").exists() else None
    assert after == before  # nothing written
    for fuse, says in [("click * nope", "names 'nope'"), ("click ^", "not a valid expression"),
                       ("open('x')", "not allowed")]:
        r = cli("export", calib_run, "-o", tmp_path / "m.onnx", "--fuse", fuse)
        assert r.code == 2 and says in r.err, r
        assert not (tmp_path / "m.onnx").exists()
    cfg = write_config(tmp_path / "bad.yaml", funnel_dir)
    raw = yaml.safe_load(cfg.read_text())
    raw["tasks"][0]["negative_sampling_rate"] = 0
    cfg.write_text(yaml.safe_dump(raw))
    r = cli("train", cfg, "--out", tmp_path / "r")
    assert r.code == 2 and "negative_sampling_rate must be in (0, 1]" in r.err, r
    assert not (tmp_path / "r").exists()


def test_calibrator_is_bound_to_its_checkpoint(cli, calib_run, funnel_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(calib_run, run)
    valid, test = funnel_dir / "valid.parquet", funnel_dir / "test.parquet"
    assert cli("calibrate", run, "--data", valid, "--method", "temperature", "--tasks", "click").code == 0
    bound = json.loads((run / "calibrator.json").read_text())["bound"]["click"]
    assert bound["file"].startswith("best_epochs/") and len(bound["sha256"]) == 64 and bound["epoch"] >= 1
    assert cli("evaluate", run, test).code == 0
    for args in (["evaluate", run, test, "--checkpoint", "last"], ["export", run, "-o", tmp_path / "m.onnx",
                                                                    "--checkpoint", "last"]):
        r = cli(*args)
        assert r.code == 2 and "task 'click' was calibrated on checkpoint best_epochs/" in r.err, r
        assert "--checkpoint last" in r.err and "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1, r
    assert not (tmp_path / "m.onnx").exists()
    assert cli("evaluate", run, test, "--checkpoint", "last", "--no-calibration").code == 0
    assert cli("calibrate", run, "--data", valid, "--method", "temperature", "--tasks", "click",
               "--checkpoint", "last").code == 0
    assert cli("evaluate", run, test, "--checkpoint", "last").code == 0


def test_multilabel_isotonic_per_attribute_score_equals_evaluate(cli, funnel_dir, tmp_path):
    """Calibration of a multilabel head, one isotonic map per attribute, and score/evaluate parity <= 1e-6 on every
    row with the knots on the logit (the isotonic map on float32 probabilities missed it on ~0.1 % of rows)."""
    cfg = write_config(tmp_path / "cfg.yaml", funnel_dir, train={"batch_size": 1024, "epochs": 1, "progress": False},
                       tasks=[{"name": "acts", "label": ["click", "conversion"], "head": "multilabel"}])
    assert cli("train", cfg, "--out", tmp_path / "run").code == 0
    valid, test = funnel_dir / "valid.parquet", funnel_dir / "test.parquet"
    r = cli("calibrate", tmp_path / "run", "--data", valid, "--method", "isotonic", "--test", test)
    assert r.code == 0 and "acts/click" in r.out and "acts/conversion" in r.out, r
    saved = json.loads((tmp_path / "run" / "calibrator.json").read_text())
    assert set(saved["tasks"]["acts"]["attributes"]) == {"click", "conversion"}
    assert cli("evaluate", tmp_path / "run", test, "--save-predictions", tmp_path / "p.parquet").code == 0
    assert cli("export", tmp_path / "run", "-o", tmp_path / "m.onnx").code == 0
    assert cli("score", tmp_path / "m.onnx", test, "-o", tmp_path / "s.parquet", "--no-progress").code == 0
    got = np.array(pq.read_table(tmp_path / "s.parquet")["acts"].to_pylist(), np.float64)
    want = np.array(pq.read_table(tmp_path / "p.parquet")["acts"].to_pylist(), np.float64)
    assert got.shape == want.shape == (pq.read_metadata(test).num_rows, 2)
    assert np.abs(got - want).max() <= 1e-6


def test_calibrate_isotonic_score_equals_evaluate_on_every_row(cli, calib_run, funnel_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(calib_run, run)
    valid, test = funnel_dir / "valid.parquet", funnel_dir / "test.parquet"
    assert cli("calibrate", run, "--data", valid, "--method", "isotonic").code == 0
    assert cli("evaluate", run, test, "--save-predictions", tmp_path / "p.parquet").code == 0
    assert cli("export", run, "-o", tmp_path / "m.onnx").code == 0
    assert cli("score", tmp_path / "m.onnx", test, "-o", tmp_path / "s.parquet", "--no-progress").code == 0
    scored, evaluated = pq.read_table(tmp_path / "s.parquet"), pq.read_table(tmp_path / "p.parquet")
    for t in ("click", "conversion"):
        assert np.abs(scored[t].to_numpy().astype(np.float64) - evaluated[t].to_numpy()).max() <= 1e-6, t


def test_fusion_from_the_config(cli, calib_run, funnel_dir, tmp_path):
    cfg = write_config(tmp_path / "bad.yaml", tmp_path / "no-such-data", export={"fuse": "click * nope"})
    r = cli("train", cfg, "--out", tmp_path / "r")  # refused before any data is read (the data does not exist)
    assert r.code == 2 and "export.fuse 'click * nope' names 'nope'" in r.err and "Traceback" not in r.err, r
    run = tmp_path / "run"
    shutil.copytree(calib_run, run)
    (run / "calibrator.json").unlink(missing_ok=True)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["export"] = {"fuse": "click^1.0 * conversion^0.5"}
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    assert cli("export", run, "-o", tmp_path / "m.onnx").code == 0
    outputs = [o.name for o in onnx.load(str(tmp_path / "m.onnx")).graph.output]
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert FUSED_OUTPUT in outputs and json.loads(meta["recmtl.calibration"])["fusion"] == "click^1.0 * conversion^0.5"
    assert cli("export", run, "-o", tmp_path / "n.onnx", "--fuse", "").code == 0  # '': none
    assert FUSED_OUTPUT not in [o.name for o in onnx.load(str(tmp_path / "n.onnx")).graph.output]
    assert cli("export", run, "-o", tmp_path / "o.onnx", "--fuse", "click").code == 0  # --fuse wins
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "o.onnx")).metadata_props}
    assert json.loads(meta["recmtl.calibration"])["fusion"] == "click"


def test_precise_sigmoids_keep_the_tails():
    from recmtl.export.graph import precise_sigmoids
    g = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"])], "t",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b"])])
    assert precise_sigmoids(g) == 1 and "Sigmoid" not in [n.op_type for n in g.node]
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = np.linspace(-30, 30, 6001).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    want = 1 / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)  # onnxruntime's Sigmoid: 6x off at -17.9


def test_downsampled_task_loss_is_the_corrected_log_loss():
    from recmtl.training.evaluate import Predictions, map_scores
    y, s, _ = _miscalibrated(5000, seed=5)
    z = logit(s).astype(np.float32)
    pred = Predictions({"click": s.astype(np.float32)}, y.reshape(-1, 1).astype(np.float32), np.ones((len(y), 1), bool),
                       None, {"click": 9.9}, {"click": (0, 1, True)}, {"click": z})
    map_scores(pred, ScoreMap({"click": 0.2}, logit_tasks={"click"}))
    q = correct_downsampling(s, 0.2)
    assert pred.losses["click"] == pytest.approx(log_loss(y, q), rel=1e-5)
    np.testing.assert_allclose(pred.scores["click"], q, rtol=1e-5)
