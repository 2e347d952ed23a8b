"""Image features: decoding, the digits-attributes and shapes generators, and the vision model from
datagen to train, evaluate, export (parity) and score."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from recmtl.data.images import decode_images
from recmtl.data.synthetic import COLOURS, DIGIT_ATTRIBUTES, SHAPES, digits_attributes, shapes
from recmtl.errors import DataError


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_png_bytes_and_arrays_decode_to_the_same_tensor():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)  # [n, H, W, C]
    chw = rgb.transpose(0, 3, 1, 2)  # what the model sees: [n, C, H, W]
    from_png = decode_images(pa.array([png(rgb[0]), None, png(rgb[1])]), "img", 3, 4, 5)
    expected = chw.astype(np.float32) / 255
    np.testing.assert_array_equal(from_png[[0, 2]], expected)
    assert (from_png[1] == 0).all()  # a null image is all zeros
    flat_u8 = pa.array([chw[0].reshape(-1), chw[1].reshape(-1)], pa.list_(pa.uint8()))
    np.testing.assert_array_equal(decode_images(flat_u8, "img", 3, 4, 5), expected)
    nested = pa.array([x.astype(np.float32).tolist() for x in expected])  # list<list<list<float>>>, as they are
    np.testing.assert_allclose(decode_images(nested, "img", 3, 4, 5), expected)
    grey = decode_images(pa.array([png(rgb[0])]), "img", 1, 4, 5)  # converted to L by Pillow
    want = np.asarray(Image.fromarray(rgb[0]).convert("L"), dtype=np.float32) / 255
    np.testing.assert_array_equal(grey[0, 0], want)


def test_image_errors_name_the_column_and_row():
    with pytest.raises(DataError, match=r"image column 'img', row 0: 5x4 pixels, the model expects width 8 x height 8"):
        decode_images(pa.array([png(np.zeros((4, 5), np.uint8))]), "img", 1, 8, 8)
    with pytest.raises(DataError, match="row 1: not a readable image"):
        decode_images(pa.array([png(np.zeros((8, 8), np.uint8)), b"garbage"]), "img", 1, 8, 8)
    with pytest.raises(DataError, match=r"row 1: 3 values; an image array must hold .* = 4 values"):
        decode_images(pa.array([[1, 2, 3, 4], [1, 2, 3]]), "img", 1, 2, 2)
    with pytest.raises(DataError, match="has type int64; expected encoded image bytes"):
        decode_images(pa.array([1, 2]), "img", 1, 2, 2)


def test_digits_attributes_generator(tmp_path):
    digits_attributes(tmp_path)
    parts = {s: pq.read_table(tmp_path / f"{s}.parquet") for s in ("train", "valid", "test")}
    ids = np.concatenate([t["image_id"].to_numpy() for t in parts.values()])
    assert sorted(ids.tolist()) == list(range(1797))  # every bundled image exactly once
    assert parts["test"].num_rows == 270
    from sklearn.datasets import load_digits
    d = load_digits()
    t = parts["test"]
    row = 5
    i = t["image_id"][row].as_py()
    img = np.asarray(Image.open(io.BytesIO(t["image"][row].as_py())))
    np.testing.assert_array_equal(img, np.rint(d.images[i] * 255 / 16))
    digit = t["digit"].to_numpy()
    assert (digit == d.target[t["image_id"].to_numpy()]).all()
    for name, members in DIGIT_ATTRIBUTES.items():
        np.testing.assert_array_equal(t[name].to_numpy(), np.isin(digit, members))
    assert np.bincount(digit).min() >= 26  # stratified: every digit in the test split
    digits_attributes(tmp_path / "again")
    assert pq.read_table(tmp_path / "again" / "test.parquet").equals(parts["test"])  # deterministic
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert cfg["tasks"][1]["label"] == list(DIGIT_ATTRIBUTES)


def test_shapes_labels_match_the_drawn_pixels(tmp_path):
    shapes(tmp_path, rows=400, seed=2, size=32)
    t = pq.read_table(tmp_path / "train.parquet")
    truth = pq.read_table(tmp_path / "train.truth.parquet")
    assert t.num_rows == 320 and truth.num_rows == 320
    assert set(t["shape"].to_pylist()) == set(SHAPES) and set(t["colour"].to_pylist()) == set(COLOURS)
    rows, truth_rows = t.to_pylist(), truth.to_pylist()
    for r, g in zip(rows, truth_rows):
        img = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")).astype(int)
        painted = (img == COLOURS[r["colour"]]).all(2)
        assert painted.any() and img[~painted].max() <= 40  # only the labelled colour stands out of the noise
        cx, cy, radius = round(g["cx"]), round(g["cy"]), g["radius"]
        centre = painted[cy - 1:cy + 2, cx - 1:cx + 2]
        if r["fill"] == "solid":
            assert centre.all()
        elif r["fill"] == "outline":
            assert not painted[cy, cx]
        else:  # striped: the centre rows alternate between painted and background
            assert 0 < painted[cy - 2:cy + 2, cx].sum() < 4
        if r["fill"] == "solid":  # area / r^2: circle pi, square (circumradius r) 2, diamond 2, triangle 1.3
            ratio = painted.sum() / (radius + 0.5) ** 2  # Pillow paints the boundary pixels too
            expected = {"circle": np.pi, "square": 2.0, "diamond": 2.0, "triangle": 3 * np.sqrt(3) / 4}[r["shape"]]
            assert abs(ratio - expected) < 0.45, (r["shape"], ratio)
        ys, xs = np.nonzero(painted)
        assert xs.min() >= cx - radius - 1.5 and xs.max() <= cx + radius + 1.5 and ys.min() >= cy - radius - 1.5
        extent = max(np.ptp(xs), np.ptp(ys)) + 1  # the drawn size agrees with the true circumradius
        factor = {"circle": 2.0, "square": np.sqrt(2), "diamond": 2.0, "triangle": np.sqrt(3)}[r["shape"]]
        assert abs(extent - factor * radius) <= 2.5, (r["shape"], extent, radius)
        assert r["large"] == (r["size"] == "large") == (radius > 0.3 * 32)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """datagen digits-attributes -> train the shared CNN with a multiclass and a multilabel head -> export."""
    from recmtl.cli import main
    tmp = tmp_path_factory.mktemp("digits")
    steps = [["datagen", "digits-attributes", tmp / "data"],
             ["train", tmp / "data" / "config.yaml", "--out", tmp / "run", "--set", "train.epochs=4",
              "--set", "train.threads=1", "--set", "train.progress=false"],
             ["export", tmp / "run", "-o", tmp / "model.onnx"]]
    for args in steps:
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            assert exc.code == 0, args
    return tmp


@pytest.mark.slow
def test_digits_cnn_learns_and_onnx_scores_equal_pytorch(cli, digits_run, tmp_path):
    data, run = digits_run / "data", digits_run / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["digit"]["accuracy"] > 0.9  # 4 epochs; the benchmark trains to >= 0.95
    assert metrics["test"]["attributes"]["auc"] > 0.97
    r = cli("evaluate", run, data / "test.parquet", "--json", "--save-predictions", tmp_path / "torch.parquet")
    assert r.code == 0, r
    ev = json.loads(r.out)["metrics"]
    torch_scores = pq.read_table(tmp_path / "torch.parquet")
    assert torch_scores.schema.field("digit").type == pa.list_(pa.float32(), 10)
    assert torch_scores.schema.field("attributes__label").type == pa.list_(pa.float32(), len(DIGIT_ATTRIBUTES))
    r = cli("score", digits_run / "model.onnx", data / "test.parquet", "-o", tmp_path / "scores.parquet",
            "--keep", "image_id", "--no-progress", "--batch-size", "100")
    assert r.code == 0, r
    scored = pq.read_table(tmp_path / "scores.parquet")
    assert scored.column_names == ["image_id", "digit", "attributes"]
    assert scored.schema.field("attributes").type == pa.list_(pa.float32(), len(DIGIT_ATTRIBUTES))
    onnx_digit = np.stack(scored["digit"].to_pylist())
    np.testing.assert_allclose(onnx_digit, np.stack(torch_scores["digit"].to_pylist()), atol=1e-5)
    np.testing.assert_allclose(np.stack(scored["attributes"].to_pylist()),
                               np.stack(torch_scores["attributes"].to_pylist()), atol=1e-5)
    labels = pq.read_table(data / "test.parquet")
    assert (onnx_digit.argmax(1) == labels["digit"].to_numpy()).mean() == pytest.approx(ev["digit"]["accuracy"])
    r = cli("inspect", digits_run / "model.onnx")
    assert "image" in r.out and "float[batch, 1, 8, 8]" in r.out and "float[batch, 10]" in r.out
    from recmtl.serving.triton import write_triton_repo
    config = (write_triton_repo(digits_run / "model.onnx", tmp_path / "triton", "digits") / "config.pbtxt").read_text()
    assert '{ name: "image" data_type: TYPE_FP32 dims: [ 1, 8, 8 ] }' in config
    assert '{ name: "digit" data_type: TYPE_FP32 dims: [ 10 ] }' in config


@pytest.mark.slow
def test_scoring_takes_image_arrays_as_well_as_png(digits_run, tmp_path):
    """The same images as uint8 lists score exactly like the PNG bytes; the ONNX input is [batch, 1, 8, 8]."""
    import onnxruntime as ort

    from recmtl.serving.score import score_batches
    t = pq.read_table(digits_run / "data" / "test.parquet").slice(0, 40)
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in t["image"].to_pylist()])
    as_arrays = t.set_column(t.schema.get_field_index("image"), "image",
                             pa.array(list(pixels.reshape(40, -1)), pa.list_(pa.uint8())))
    model = digits_run / "model.onnx"
    a = pa.Table.from_batches(list(score_batches(model, [t])))
    b = pa.Table.from_batches(list(score_batches(model, [as_arrays])))
    assert a.equals(b)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    raw = sess.run(["digit"], {"image": (pixels[:, None] / np.float32(255)).astype(np.float32)})[0]
    np.testing.assert_allclose(raw, np.stack(a["digit"].to_pylist()), atol=1e-6)


@pytest.mark.slow
def test_shapes_with_string_classes_train_export_and_score(cli, tmp_path):
    data = tmp_path / "data"
    assert cli("datagen", "shapes", data, "--rows", "600", "--size", "16").code == 0
    r = cli("train", data / "config.yaml", "--out", tmp_path / "run", "--set", "train.epochs=1",
            "--set", "train.threads=1", "--set", "train.progress=false")
    assert r.code == 0, r
    r = cli("export", tmp_path / "run", "-o", tmp_path / "m.onnx")
    assert r.code == 0, r
    meta = json.loads(__import__("onnx").load(str(tmp_path / "m.onnx")).metadata_props[0].value)
    tasks = {t["name"]: t for t in meta["tasks"]}
    assert tasks["shape"]["classes"] == sorted(SHAPES) and tasks["shape"]["width"] == 4
    assert tasks["colour"]["classes"] == sorted(COLOURS) and "width" not in tasks["large"]
    assert meta["inputs"] == [{"name": "image", "dtype": "float32", "kind": "image", "shape": [3, 16, 16],
                               "scale": "pixels / 255 (uint8, PNG/JPEG); float arrays as they are"}]
    r = cli("score", tmp_path / "m.onnx", data / "test.parquet", "-o", tmp_path / "s.parquet", "--no-progress")
    assert r.code == 0, r
    scored = pq.read_table(tmp_path / "s.parquet")
    assert scored.schema.field("shape").type == pa.list_(pa.float32(), 4)
    assert scored.schema.field("large").type == pa.float32()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_serve_takes_base64_images_and_v2_tensors_and_returns_k_scores(digits_run):
    """/v1/predict with base64 PNGs and /v2 infer with FP32 [batch, 1, 8, 8] give recmtl score's numbers."""
    import base64

    from starlette.testclient import TestClient

    from recmtl.serving.app import create_app
    from recmtl.serving.score import Scorer
    t = pq.read_table(digits_run / "data" / "test.parquet").slice(0, 6)
    ref = Scorer(digits_run / "model.onnx").score(t)
    with TestClient(create_app(digits_run / "model.onnx")) as client:
        meta = client.get("/v2/models/model").json()
        assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"digit": [-1, 10], "attributes": [-1, 5]}
        instances = [{"image": base64.b64encode(b).decode()} for b in t["image"].to_pylist()]
        r = client.post("/v1/models/model/predict", json={"instances": instances})
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        np.testing.assert_allclose([p["digit"] for p in preds], np.stack(ref["digit"].to_pylist()), atol=1e-6)
        np.testing.assert_allclose([p["attributes"] for p in preds], np.stack(ref["attributes"].to_pylist()), atol=1e-6)
        pixels = decode_images(t["image"], "image", 1, 8, 8)
        body = {"inputs": [{"name": "image", "shape": [6, 1, 8, 8], "datatype": "FP32", "data": pixels.reshape(-1).tolist()}]}
        out = client.post("/v2/models/model/infer", json=body).json()["outputs"]
        digit = next(o for o in out if o["name"] == "digit")
        assert digit["shape"] == [6, 10]
        np.testing.assert_allclose(np.reshape(digit["data"], (6, 10)), np.stack(ref["digit"].to_pylist()), atol=1e-6)
        bad = {"inputs": [{"name": "image", "shape": [6, 64], "datatype": "FP32", "data": pixels.reshape(-1).tolist()}]}
        r = client.post("/v2/models/model/infer", json=bad)
        assert r.status_code == 400 and "shape must be [batch, 1, 8, 8]" in r.json()["error"]


@pytest.mark.slow
def test_two_image_features_with_categorical_and_dense_export_with_parity(cli, digits_run, tmp_path):
    """Images next to categorical and dense features, one image as PNG bytes and one as a uint8 array
    column (two CNN backbones): training, export (parity checked) and scoring agree."""
    rng = np.random.default_rng(0)
    for split in ("train", "valid"):
        t = pq.read_table(digits_run / "data" / f"{split}.parquet")
        pixels = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in t["image"].to_pylist()])
        flipped = pa.array(list(pixels[:, :, ::-1].reshape(len(t), -1)), pa.list_(pa.uint8()))
        t = t.append_column("mirror", flipped).append_column("shade", pa.array(rng.normal(size=len(t))))
        t = t.append_column("batch_id", pa.array(rng.integers(0, 5, len(t))))
        pq.write_table(t, tmp_path / f"{split}.parquet")
    cfg = yaml.safe_load((digits_run / "data" / "config.yaml").read_text())
    cfg["data"] = {"train": str(tmp_path / "train.parquet"), "validation": str(tmp_path / "valid.parquet"),
                   "shuffle_buffer": 2048}
    cfg["features"] += [{"name": "mirror", "kind": "image", "height": 8, "width": 8},
                        {"name": "shade", "kind": "dense"}, {"name": "batch_id", "kind": "categorical"}]
    cfg["encoders"]["image"] = {"name": "cnn", "channels": [8], "output_dim": 16}
    cfg["train"].update({"epochs": 1, "progress": False, "threads": 1})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli("train", tmp_path / "c.yaml", "--out", tmp_path / "run").code == 0
    r = cli("export", tmp_path / "run", "-o", tmp_path / "m.onnx")
    assert r.code == 0, r
    import onnx
    names = [i.name for i in onnx.load(str(tmp_path / "m.onnx")).graph.input]
    assert names == ["batch_id", "shade", "image", "mirror"]
    assert cli("evaluate", tmp_path / "run", tmp_path / "valid.parquet", "--save-predictions", tmp_path / "p.parquet").code == 0
    assert cli("score", tmp_path / "m.onnx", tmp_path / "valid.parquet", "-o", tmp_path / "s.parquet", "--no-progress").code == 0
    for task in ("digit", "attributes"):
        np.testing.assert_allclose(np.stack(pq.read_table(tmp_path / "s.parquet")[task].to_pylist()),
                                   np.stack(pq.read_table(tmp_path / "p.parquet")[task].to_pylist()), atol=1e-5)


def test_init_finds_image_columns_and_takes_heads_for_text_labels(cli, tmp_path):
    """`recmtl init` proposes image features (PNG bytes or number lists) with their shape, and --head
    multiclass works on a text label (no --positive needed); the written config trains."""
    data = tmp_path / "data"
    assert cli("datagen", "shapes", data, "--rows", "300", "--size", "16").code == 0
    cfg = tmp_path / "c.yaml"
    r = cli("init", data / "train.parquet", "--task", "shape", "--head", "shape=multiclass", "--task", "large",
            "--exclude", "colour", "--exclude", "fill", "--exclude", "size", "--validation", data / "valid.parquet",
            "-o", cfg)
    assert r.code == 0, r
    assert "1 image" in r.out
    written = yaml.safe_load(cfg.read_text())
    assert written["features"] == [{"name": "image", "kind": "image", "height": 16, "width": 16, "channels": 3}]
    assert [(t["name"], t["head"]) for t in written["tasks"]] == [("shape", "multiclass"), ("large", "binary")]
    assert written["encoders"]["image"] == {"name": "cnn"}
    r = cli("train", cfg, "--out", tmp_path / "run", "--set", "train.epochs=1", "--set", "train.threads=1",
            "--set", "train.progress=false", "--set", "train.batch_size=64")
    assert r.code == 0, r
    # a number-list image column: 3 x 4 x 4 values per row -> RGB 4x4
    arrays = tmp_path / "arrays.parquet"
    pq.write_table(pa.table({"pixels": pa.array([[0.5] * 48] * 8, pa.list_(pa.float32(), 48)),
                             "y": pa.array([0, 1] * 4, pa.int8())}), arrays)
    r = cli("init", arrays, "--task", "y", "-o", tmp_path / "a.yaml")
    assert r.code == 0, r
    assert yaml.safe_load((tmp_path / "a.yaml").read_text())["features"] == [
        {"name": "pixels", "kind": "image", "height": 4, "width": 4, "channels": 3}]
    r = cli("init", data / "train.parquet", "--task", "shape", "--head", "shape=multiclas", "-o", tmp_path / "b.yaml")
    assert r.code == 2 and "multiclass" in r.err
