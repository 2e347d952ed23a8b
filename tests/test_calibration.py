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
from recmtl.calibration import FUSED_OUTPUT, ScoreMap, correct_downsampling, fit_calibrator, fuse_expression
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
    cal = fit_calibrator(method, y[:10000], s[:10000])
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
    smap = ScoreMap({"click": rate}, {"click": fit_calibrator(method, y, correct_downsampling(s, rate))})
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
