"""ONNX export (self-contained, parity-checked) and Parquet -> Parquet scoring with only the ONNX file."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_config
from sklearn.metrics import roc_auc_score

FEATURES_WITH_HASHING = (
    [{"name": "user_id", "kind": "categorical", "hash_buckets": 97},
     {"name": "c03", "kind": "categorical", "hash_buckets": 13},   # strings hashed (MurmurHash3)
     {"name": "item_id", "kind": "categorical", "min_count": 3},
     {"name": "c04", "kind": "categorical"}, {"name": "c05", "kind": "categorical"}, {"name": "c06", "kind": "categorical"}]
    + [{"name": f"d0{i}", "kind": "dense"} for i in range(1, 5)])


@pytest.fixture(scope="module")
def holey_data(funnel_dir, tmp_path_factory):
    """Funnel data with nulls and empty strings in categorical columns and unseen ids in test."""
    out = tmp_path_factory.mktemp("holey")
    rng = np.random.default_rng(0)
    for split in ("train", "valid", "test"):
        t = pq.read_table(funnel_dir / f"{split}.parquet")
        n = t.num_rows
        uid = t["user_id"].to_numpy().copy()
        if split == "test":
            uid[: n // 10] += 10_000  # unseen ids
        t = t.set_column(t.schema.get_field_index("user_id"), "user_id", pa.array(uid, mask=rng.random(n) < 0.05))
        c03 = np.array(t["c03"].to_pylist(), dtype=object)
        c03[rng.random(n) < 0.05] = ""
        t = t.set_column(t.schema.get_field_index("c03"), "c03", pa.array(c03.tolist(), mask=rng.random(n) < 0.05))
        t = t.append_column("row_id", pa.array(np.arange(n)))
        pq.write_table(t, out / f"{split}.parquet", row_group_size=1000)
    return out


@pytest.fixture(scope="module")
def exported(holey_data, tmp_path_factory):
    from recmtl.cli import main
    tmp = tmp_path_factory.mktemp("exp")
    cfg = write_config(tmp / "c.yaml", holey_data, features=FEATURES_WITH_HASHING)
    for args in (["train", cfg, "--out", tmp / "run"], ["export", tmp / "run", "-o", tmp / "model.onnx"]):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            assert exc.code == 0
    return tmp


def test_export_is_self_contained_with_metadata(exported):
    m = onnx.load(str(exported / "model.onnx"))
    assert not list(exported.glob("*.data"))  # no external data file beside it
    names = [i.name for i in m.graph.input]
    assert names[:3] == ["user_id", "c03", "item_id"] and "d01" in names
    types = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
    assert types["user_id"] == onnx.TensorProto.INT64 and types["c03"] == onnx.TensorProto.STRING
    assert types["d01"] == onnx.TensorProto.FLOAT
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in m.graph.output] == ["click", "conversion"]
    props = {p.key: p.value for p in m.metadata_props}
    schema = json.loads(props["recmtl.schema"])
    assert [t["name"] for t in schema["tasks"]] == ["click", "conversion"]
    assert {"recmtl.version", "torch.version", "onnx.opset", "recmtl.metrics", "recmtl.created"} <= set(props)
    assert "validation" in json.loads(props["recmtl.metrics"])


def test_scores_equal_pytorch_and_evaluate(cli, exported, holey_data, tmp_path):
    out = tmp_path / "scores.parquet"
    r = cli("score", exported / "model.onnx", holey_data / "test.parquet", "-o", out, "--keep", "row_id", "--no-progress",
            "--batch-size", "333")
    assert r.code == 0, r
    scored = pq.read_table(out)
    assert scored.column_names == ["row_id", "click", "conversion"]
    np.testing.assert_array_equal(scored["row_id"].to_numpy(), np.arange(scored.num_rows))  # input order
    r = cli("evaluate", exported / "run", holey_data / "test.parquet", "--json", "--save-predictions", tmp_path / "torch.parquet")
    ev = json.loads(r.out)["metrics"]
    torch_scores = pq.read_table(tmp_path / "torch.parquet")
    labels = pq.read_table(holey_data / "test.parquet")
    for task in ("click", "conversion"):
        diff = np.abs(scored[task].to_numpy() - torch_scores[task].to_numpy()).max()
        assert diff <= 1e-5, (task, diff)
        assert roc_auc_score(labels[task].to_numpy(), scored[task].to_numpy()) == pytest.approx(ev[task]["auc"], abs=1e-6)


def test_workers_give_identical_output(cli, exported, holey_data, tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert cli("score", exported / "model.onnx", holey_data / "train.parquet", "-o", a, "--no-progress", "--keep", "row_id").code == 0
    r = cli("score", exported / "model.onnx", holey_data / "train.parquet", "-o", b, "--no-progress", "--keep", "row_id",
            "--workers", "2", "--threads", "1")
    assert r.code == 0, r
    assert pq.read_table(a).equals(pq.read_table(b))
    c = tmp_path / "c.parquet"
    r = cli("score", exported / "model.onnx", holey_data / "train.parquet", "-o", c, "--no-progress", "--keep", "row_id", "--spin")
    assert r.code == 0, r
    assert pq.read_table(a).equals(pq.read_table(c))


def test_spin_sets_onnxruntime_thread_spinning(exported):
    from recmtl.serving.score import Scorer

    def entry(scorer: Scorer, key: str) -> str:
        return scorer.session.get_session_options().get_session_config_entry(key)

    quiet, spinning = Scorer(exported / "model.onnx"), Scorer(exported / "model.onnx", spin=True)
    assert entry(quiet, "session.intra_op.allow_spinning") == "0"
    assert entry(spinning, "session.intra_op.allow_spinning") == "1"
    assert entry(spinning, "session.force_spinning_stop") == "1"  # never left spinning between batches


def test_dictionary_encoded_strings_feed_like_plain_ones(exported, holey_data):
    """`recmtl score` reads string inputs dictionary-encoded: the feeds equal those of plain strings, with
    nulls in the indices or in the dictionary itself."""
    import pyarrow.compute as pc

    from recmtl.serving.score import Scorer, to_feeds
    scorer = Scorer(exported / "model.onnx")
    assert scorer.string_columns == ["c03", "c04", "c05"]
    table = pq.read_table(holey_data / "test.parquet").slice(0, 3000)
    assert table["c03"].null_count > 0
    plain = to_feeds(table, scorer.inputs)
    for encoding in ("mask", "encode"):  # null as a null index / as a null entry of the dictionary
        encoded = table.set_column(table.schema.get_field_index("c03"), "c03",
                                   pc.dictionary_encode(table["c03"], null_encoding=encoding))
        feeds = to_feeds(pa.Table.from_batches(encoded.to_batches()).combine_chunks().to_batches()[0], scorer.inputs)
        assert feeds["c03"].dtype == object and feeds["c03"].tolist() == plain["c03"].tolist()
    read = next(pq.ParquetFile(holey_data / "test.parquet", read_dictionary=["c03"]).iter_batches(3000))
    assert pa.types.is_dictionary(read.schema.field("c03").type)
    assert to_feeds(read, scorer.inputs)["c03"].tolist() == plain["c03"][:read.num_rows].tolist()


def test_kept_string_input_is_written_as_strings(cli, exported, holey_data, tmp_path):
    out = tmp_path / "kept.parquet"
    r = cli("score", exported / "model.onnx", holey_data / "test.parquet", "-o", out, "--no-progress", "--keep", "c03")
    assert r.code == 0, r
    scored = pq.read_table(out)
    assert scored.schema.field("c03").type == pa.string()
    assert scored["c03"].to_pylist() == pq.read_table(holey_data / "test.parquet")["c03"].to_pylist()


def test_recmtl_score_does_not_import_pandas(exported, holey_data, tmp_path):
    """pyarrow imports pandas (0.1-0.2 s) from `to_numpy`, `pa.array`, `pa.scalar`, ...: scoring avoids them."""
    code = f"""
import sys
from recmtl.cli import main
try:
    main(["score", {str(exported / "model.onnx")!r}, {str(holey_data / "test.parquet")!r}, "-o", {str(tmp_path / "s.parquet")!r},
          "--no-progress", "--keep", "row_id", "--keep", "c03"])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
assert "pandas" not in sys.modules, "pandas was imported"
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def test_numpy_and_arrow_views():
    from recmtl.data.arrow import arrow_scalar, arrow_view, numpy_view
    arr = pa.array(np.arange(10, dtype=np.int64)).slice(3, 4)
    np.testing.assert_array_equal(numpy_view(arr), [3, 4, 5, 6])
    assert numpy_view(pa.array(np.zeros(0, np.float32))).shape == (0,)
    back = arrow_view(np.array([[1, 2], [3, 4]], np.float32)[:, 1])  # non-contiguous input is copied
    assert back.type == pa.float32() and back.to_pylist() == [2.0, 4.0]
    filled = pa.array([1.0, None], pa.float32()).fill_null(arrow_scalar(np.nan, np.float32))
    assert np.isnan(numpy_view(filled)[1])


def test_score_batches_api(exported, holey_data):
    from recmtl.serving.score import score_batches
    batches = pq.ParquetFile(holey_data / "valid.parquet").iter_batches(500)
    out = list(score_batches(exported / "model.onnx", batches, keep=["row_id"]))
    assert sum(b.num_rows for b in out) == pq.read_metadata(holey_data / "valid.parquet").num_rows
    assert out[0].schema.names == ["row_id", "click", "conversion"]


def test_score_errors_leave_no_output(cli, exported, holey_data, tmp_path):
    model = exported / "model.onnx"
    t = pq.read_table(holey_data / "test.parquet")
    pq.write_table(t.drop_columns(["item_id"]), tmp_path / "missing.parquet")
    r = cli("score", model, tmp_path / "missing.parquet", "-o", tmp_path / "o.parquet")
    assert r.code == 2 and "input column 'item_id' is missing" in r.err
    bad = t.set_column(t.schema.get_field_index("user_id"), "user_id", pa.array([str(v) for v in t["user_id"].to_pylist()]))
    pq.write_table(bad, tmp_path / "wrongtype.parquet")
    r = cli("score", model, tmp_path / "wrongtype.parquet", "-o", tmp_path / "o.parquet")
    assert r.code == 2 and "column 'user_id' has type string; the model expects integers" in r.err
    r = cli("score", model, holey_data / "test.parquet", "-o", tmp_path / "o.parquet", "--keep", "nope")
    assert r.code == 2 and "column 'nope' not found" in r.err
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really")
    r = cli("score", model, tmp_path / "corrupt.parquet", "-o", tmp_path / "o.parquet")
    assert r.code == 2 and "not a readable Parquet file" in r.err
    (tmp_path / "fake.onnx").write_bytes(b"\x00\x01garbage")
    r = cli("score", tmp_path / "fake.onnx", holey_data / "test.parquet", "-o", tmp_path / "o.parquet")
    assert r.code == 2 and "is not an ONNX model" in r.err
    plain = onnx.load(str(model))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    r = cli("inspect", tmp_path / "plain.onnx")
    assert r.code == 2 and "not a recmtl export" in r.err
    assert not (tmp_path / "o.parquet").exists()


def test_inspect(cli, exported):
    r = cli("inspect", exported / "model.onnx")
    assert r.code == 0, r
    assert "user_id" in r.out and "string[batch]" in r.out and "click" in r.out and "recmtl.version" in r.out


@pytest.mark.slow
def test_model_scores_in_a_fresh_venv_without_recmtl_or_torch(exported, holey_data, tmp_path):
    """The ONNX file alone, in a venv with only onnxruntime, pyarrow and numpy."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = subprocess.run([py, "-m", "pip", "install", "-q", "onnxruntime", "pyarrow", "numpy"], capture_output=True, text=True)
    if pip.returncode != 0:
        pytest.skip(f"cannot install onnxruntime/pyarrow/numpy from the registry: {pip.stderr[-500:]}")
    script = tmp_path / "score.py"
    script.write_text(textwrap.dedent(f'''
        import json, sys
        import numpy as np, onnxruntime as ort, pyarrow.parquet as pq
        for banned in ("torch", "recmtl"):
            try:
                __import__(banned)
                sys.exit(banned + " is importable")
            except ImportError:
                pass
        sess = ort.InferenceSession({str(exported / "model.onnx")!r}, providers=["CPUExecutionProvider"])
        table = pq.read_table({str(holey_data / "test.parquet")!r})
        feeds = {{}}
        for inp in sess.get_inputs():
            col = table[inp.name]
            if inp.type == "tensor(string)":
                feeds[inp.name] = np.array([v or "" for v in col.to_pylist()], dtype=object)
            elif inp.type == "tensor(int64)":
                feeds[inp.name] = np.array([np.iinfo(np.int64).min if v is None else v for v in col.to_pylist()], dtype=np.int64)
            else:
                feeds[inp.name] = col.to_numpy(zero_copy_only=False).astype(np.float32)
        out = sess.run(None, feeds)
        json.dump({{o.name: v.tolist() for o, v in zip(sess.get_outputs(), out)}}, open(sys.argv[1], "w"))
    '''))
    res = subprocess.run([py, str(script), str(tmp_path / "out.json")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    fresh = json.loads((tmp_path / "out.json").read_text())
    from recmtl.serving.score import score_batches
    ours = pa.Table.from_batches(list(score_batches(exported / "model.onnx", [pq.read_table(holey_data / "test.parquet")])))
    for task in ("click", "conversion"):
        np.testing.assert_allclose(np.array(fresh[task]), ours[task].to_numpy(), atol=1e-6)


def test_scoring_path_does_not_import_torch():
    code = "import sys, recmtl.serving.score, recmtl.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_prefetched_scoring_keeps_order_and_errors_leave_nothing(exported, holey_data, tmp_path, monkeypatch):
    """``recmtl score`` reads and converts the next batch on another thread while onnxruntime runs: rows come out in
    input order, and an error mid-file, on that thread or while building the output, leaves neither output nor temp
    file."""
    import recmtl.serving.score as sc
    from recmtl.errors import DataError
    model, data = exported / "model.onnx", holey_data / "test.parquet"
    out = tmp_path / "o.parquet"
    rows = sc.score_parquet(model, str(data), out, keep=["row_id"], batch_size=128, read_rows=300, progress=False)
    got = pq.read_table(out)
    assert rows == got.num_rows == pq.read_metadata(data).num_rows
    assert got["row_id"].to_pylist() == pq.read_table(data)["row_id"].to_pylist()
    out.unlink()
    calls = {"n": 0}
    real_assemble, real_to_feeds = sc.Scorer.assemble, sc.to_feeds

    def failing(after: int, real):
        def f(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > after:
                raise DataError("boom in the middle")
            return real(*args, **kwargs)
        return f
    for name, real in (("to_feeds", real_to_feeds), ("assemble", real_assemble)):  # the reader's thread, the main one
        calls["n"] = 0
        if name == "assemble":
            monkeypatch.setattr(sc.Scorer, "assemble", failing(3, real))
        else:
            monkeypatch.setattr(sc, "to_feeds", failing(3, real))
        with pytest.raises(DataError, match="boom in the middle"):
            sc.score_parquet(model, str(data), out, batch_size=128, read_rows=300, progress=False)
        monkeypatch.undo()
        assert not out.exists() and not list(tmp_path.glob(".*.tmp")), name
