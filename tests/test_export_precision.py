"""``recmtl export --precision int8|int8-static|fp16`` (issue 21): the converted graph, its quality check against fp32, its
metadata, and that score, serve, inspect and the Triton repository work on it unchanged."""
from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import write_config
from onnx import TensorProto, helper, numpy_helper

from recmtl.export import precision as lowp
from recmtl.serving.score import Scorer


@pytest.fixture(scope="module")
def trained(funnel_dir, tmp_path_factory):
    """A one-epoch funnel MMoE run (two expert layers: a Gemm and a batched [E, in, out] MatMul) and its fp32
    export."""
    from recmtl.cli import main
    tmp = tmp_path_factory.mktemp("lowp")
    pq.write_table(pq.read_table(funnel_dir / "train.parquet").slice(0, 6000), tmp / "train.parquet")
    pq.write_table(pq.read_table(funnel_dir / "valid.parquet"), tmp / "valid.parquet")
    cfg = write_config(tmp / "c.yaml", tmp, train={"batch_size": 1024, "epochs": 1, "progress": False, "threads": 1},
                       tower={"name": "mmoe", "num_experts": 2, "expert_units": [32, 16], "task_units": [16]})
    for args in (["train", cfg, "--out", tmp / "run"], ["export", tmp / "run", "-o", tmp / "fp32.onnx"]):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            assert exc.code == 0
    return tmp


@pytest.mark.parametrize("precision", ["int8", "int8-static", "fp16"])
def test_low_precision_export_scores_serves_and_inspects(cli, trained, funnel_dir, precision, monkeypatch):
    """The plumbing, on a one-epoch toy model: the bound is widened here (a toy model's int8 AUC may move by more
    than 0.001 on 2,000 rows; benchmarks/RESULTS.md has the measured differences of the benchmark model)."""
    monkeypatch.setattr(lowp, "QUALITY_BOUND", 0.01)
    out = trained / f"{precision}.onnx"
    r = cli("export", trained / "run", "-o", out, "--precision", precision, "--triton-repo", trained / f"triton_{precision}")
    assert r.code == 0, r
    assert f"{precision} vs fp32 on" in r.out and "auc" in r.out and "bound |difference| <= 0.001" in r.out
    model = onnx.load(str(out))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["recmtl.precision"] == precision
    assert [i.name for i in model.graph.input] == [i.name for i in onnx.load(str(trained / "fp32.onnx")).graph.input]
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in model.graph.output)  # outputs stay fp32
    assert out.stat().st_size < (trained / "fp32.onnx").stat().st_size
    if precision.startswith("int8"):
        types = {i.data_type for i in model.graph.initializer}
        assert TensorProto.INT8 in types
        quantizing = ("QuantizeLinear", "DequantizeLinear") if precision == "int8-static" else \
            ("MatMulInteger", "DynamicQuantizeLinear")
        assert any(n.op_type in quantizing for n in model.graph.node)
        # the preprocessing (lookups, standardisation) stays fp32 / int64: no quantisation node feeds it
        assert not {n.op_type for n in model.graph.node if n.name in lowp.preprocessing_nodes(model)} & {
            "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
    if precision == "int8-static":
        assert "int8-static: activation ranges calibrated on 2,000 rows of" in r.out, r.out
        # the narrow layers (gates, the heads' logits: fewer than STATIC_MIN_WIDTH outputs) stay fp32 Gemms
        inits = {i.name: i.data_type for i in model.graph.initializer}
        assert any(n.op_type == "Gemm" and inits.get(n.input[1]) == TensorProto.FLOAT for n in model.graph.node)
        assert any(n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized") for n in model.graph.node)
    r = cli("inspect", out)
    assert r.code == 0 and f"precision {precision}" in r.out.splitlines()[0], r
    assert f"{out.stat().st_size / 1e6:.2f} MB" in r.out.splitlines()[0], r  # and the file's size
    r = cli("score", out, funnel_dir / "valid.parquet", "-o", trained / f"s_{precision}.parquet", "--no-progress")
    assert r.code == 0, r
    got = pq.read_table(trained / f"s_{precision}.parquet")
    want = Scorer(trained / "fp32.onnx").score(pq.read_table(funnel_dir / "valid.parquet"))
    for task in ("click", "conversion"):
        diff = np.abs(got.column(task).to_numpy() - want.column(task).to_numpy())
        assert diff.max() < (0.05 if precision == "int8" else 2e-3)
    assert (trained / f"triton_{precision}" / precision / "config.pbtxt").is_file()
    from recmtl.serving.app import create_app
    row = pq.read_table(funnel_dir / "valid.parquet").slice(0, 3).drop_columns(["click", "conversion"]).to_pylist()

    async def ask() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(out)), base_url="http://t") as client:
            return await client.post(f"/v1/models/{precision}/predict", json={"instances": row})
    answer = asyncio.run(ask())
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["predictions"]) == 3


def test_export_precision_bad_input(cli, trained, funnel_dir, tmp_path, monkeypatch):
    r = cli("export", trained / "run", "-o", tmp_path / "m.onnx", "--precision", "int4")
    assert r.code == 2 and "--precision 'int4': use one of fp32, fp16, int8, int8-static" in r.err, r
    # labelless sample rows: nothing to check quality on
    pq.write_table(pq.read_table(funnel_dir / "valid.parquet").drop_columns(["click", "conversion"]),
                   tmp_path / "nolabels.parquet")
    r = cli("export", trained / "run", "-o", tmp_path / "m.onnx", "--precision", "int8",
            "--sample", tmp_path / "nolabels.parquet")
    assert r.code == 2 and "no label column(s) click, conversion" in r.err and "--sample" in r.err, r
    # a quality outside the bound: no file, the task and the difference named
    monkeypatch.setattr(lowp, "QUALITY_BOUND", -1.0)
    r = cli("export", trained / "run", "-o", tmp_path / "m.onnx", "--precision", "int8")
    assert r.code != 0 and "task 'click': auc" in r.err and "difference" in r.err and "no file written" in r.err, r
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.glob(".m.onnx*"))


def test_int8_export_of_a_run_without_validation_data_says_what_to_pass(cli, trained, funnel_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    config = run / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    del raw["data"]["validation"]
    config.write_text(yaml.safe_dump(raw))
    r = cli("export", run, "-o", tmp_path / "m.onnx", "--precision", "int8")
    assert r.code == 2 and "has no data.validation: pass --sample PARQUET" in r.err and "click, conversion" in r.err, r
    r = cli("export", run, "-o", tmp_path / "m.onnx", "--precision", "fp16", "--sample", funnel_dir / "valid.parquet")
    assert r.code == 0, r
    # int8-static also needs rows to calibrate on: one error naming what to pass
    r = cli("export", run, "-o", tmp_path / "s.onnx", "--precision", "int8-static")
    assert r.code == 2 and "has no data.validation to take them from: pass --calibration-data PARQUET" in r.err, r
    assert "and --sample PARQUET" in r.err and len(r.err.strip().splitlines()) == 1, r
    r = cli("export", run, "-o", tmp_path / "s.onnx", "--precision", "int8-static", "--sample", funnel_dir / "valid.parquet")
    assert r.code == 2 and "pass --calibration-data PARQUET" in r.err and "and --sample" not in r.err, r
    assert not (tmp_path / "s.onnx").exists()
    pq.write_table(pq.read_table(funnel_dir / "valid.parquet").slice(0, 0), tmp_path / "empty.parquet")
    r = cli("export", run, "-o", tmp_path / "s.onnx", "--precision", "int8-static", "--sample", funnel_dir / "valid.parquet",
            "--calibration-data", tmp_path / "empty.parquet")
    assert r.code == 2 and "empty.parquet has no rows; pass --calibration-data PARQUET" in r.err, r
    monkeypatch.setattr(lowp, "QUALITY_BOUND", 0.01)  # a one-epoch toy model (see above)
    r = cli("export", run, "-o", tmp_path / "s.onnx", "--precision", "int8-static", "--sample", funnel_dir / "valid.parquet",
            "--calibration-data", funnel_dir / "train.parquet")
    assert r.code == 0 and f"calibrated on 2,048 rows of {funnel_dir / 'train.parquet'}" in r.out, r
    r = cli("export", run, "-o", tmp_path / "s.onnx", "--precision", "int8", "--calibration-data", funnel_dir / "valid.parquet",
            "--sample", funnel_dir / "valid.parquet")
    assert r.code == 2 and "--calibration-data is for --precision int8-static" in r.err, r


def test_int8_embedding_tables_have_one_scale_per_row():
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(40, 8)) * rng.uniform(0.01, 3, size=(40, 1))).astype(np.float32)
    w[3] = 0  # an all-zero row keeps a usable scale
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])
    out = helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["n", 8])
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["emb"], name="g", axis=0)], "t", [ids],
                              [out], [numpy_helper.from_array(w, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert lowp.quantize_embeddings(model) == 1
    onnx.checker.check_model(model)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits["table_int8"].dtype == np.int8 and inits["table_row_scale"].shape == (40, 1)
    import onnxruntime as ort
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": np.arange(40, dtype=np.int64)})[0]
    row_max = np.abs(w).max(1, keepdims=True)
    assert np.all(np.abs(got - w) <= row_max / 254 * 1.01 + 1e-7)  # half a step of each row's own scale
    assert np.all(got[3] == 0)
    # a small table is dequantised whole before the lookup (folded at load), a large one row by row after it
    assert [n.op_type for n in model.graph.node] == ["Cast", "Cast", "Mul", "Gather"]
    rowwise = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    del rowwise.graph.node[:]
    rowwise.graph.node.extend([helper.make_node("Gather", ["table", "ids"], ["emb"], name="g", axis=0)])
    del rowwise.graph.initializer[:]
    rowwise.graph.initializer.extend([numpy_helper.from_array(w, "table")])
    assert lowp.quantize_embeddings(rowwise, at_load_bytes=0) == 1
    assert [n.op_type for n in rowwise.graph.node] == ["Gather", "Cast", "Gather", "Cast", "Mul"]
    ids40 = {"ids": np.arange(40, dtype=np.int64)}
    assert np.array_equal(ort.InferenceSession(rowwise.SerializeToString()).run(None, ids40)[0], got)
    assert json.dumps(lowp.PRECISIONS) == '["fp32", "fp16", "int8", "int8-static"]'


@pytest.mark.parametrize("trans_b, beta", [(1, 1.0), (0, 0.5)])
def test_gemm_becomes_matmul_plus_bias_with_the_same_output(trans_b, beta):
    import onnxruntime as ort
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 5) if trans_b else (5, 3)).astype(np.float32)
    b = rng.normal(size=3).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="g", transB=trans_b, beta=beta)],
                              "t", [x], [y], [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feed = {"x": rng.normal(size=(4, 5)).astype(np.float32)}
    want = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    assert lowp.gemm_to_matmul(model) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add"]
    got = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_dynamic_quantisation_moves_before_a_transpose_with_the_same_output():
    """The MMoE experts' ``[n, E, d]`` -> ``[E, n, d]`` Transpose before a dynamically quantised batched MatMul: the
    quantisation (one scale per tensor) is moved before it, the scores stay bit-identical."""
    import onnxruntime as ort
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 8, 4)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, "n", 4])
    graph = helper.make_graph([helper.make_node("Transpose", ["x"], ["xt"], name="t", perm=[1, 0, 2]),
                               helper.make_node("MatMul", ["xt", "w"], ["y"], name="m")],
                              "t", [x], [y], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import quantize_dynamic
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, f"{tmp}/f.onnx")
        quantize_dynamic(f"{tmp}/f.onnx", f"{tmp}/q.onnx", op_types_to_quantize=["MatMul"])
        quantized = onnx.load(str(Path(tmp) / "q.onnx"))
    feed = {"x": rng.normal(size=(5, 3, 8)).astype(np.float32)}
    want = ort.InferenceSession(quantized.SerializeToString()).run(None, feed)[0]
    assert lowp.quantize_before_transpose(quantized) == 1
    order = [n.op_type for n in quantized.graph.node]
    assert order.index("DynamicQuantizeLinear") < order.index("Transpose")
    onnx.checker.check_model(quantized)
    assert np.array_equal(ort.InferenceSession(quantized.SerializeToString()).run(None, feed)[0], want)
    assert lowp.quantize_before_transpose(quantized) == 0
