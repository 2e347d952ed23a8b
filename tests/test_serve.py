"""`recmtl serve` started for real on 127.0.0.1 (a free port) in a subprocess, driven over HTTP."""
from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
import signal
import socket
import subprocess
import time

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import RECMTL, REPO
from test_export_score import exported, holey_data  # noqa: F401  (module-scoped fixtures)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, target, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([RECMTL, "serve", str(target), "--port", str(self.port), *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode())
            try:
                if httpx.get(self.url + "/v2/health/live", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def stop(self) -> bool:
        """SIGTERM; True when the server shut down by itself (uvicorn re-raises the signal after a
        graceful shutdown, so the exit status is 0 or -SIGTERM)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30) in (0, -signal.SIGTERM)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(exported):  # noqa: F811
    srv = Server(exported / "model.onnx")
    yield srv
    assert srv.stop()


@pytest.fixture(scope="module")
def rows(holey_data):  # noqa: F811
    t = pq.read_table(holey_data / "test.parquet").slice(0, 64)
    return t


def instances(table: pa.Table) -> list[dict]:
    cols = [c for c in table.column_names if c not in ("click", "conversion", "row_id")]
    return table.select(cols).to_pylist()


def reference_scores(exported, table):  # noqa: F811
    from recmtl.serving.score import Scorer
    return Scorer(exported / "model.onnx").score(table)


def test_health_and_metadata(server):
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    meta = httpx.get(server.url + "/v2/models/model").json()
    assert meta["name"] == "model" and meta["platform"] == "onnxruntime_onnx"
    types = {i["name"]: i["datatype"] for i in meta["inputs"]}
    assert types["user_id"] == "INT64" and types["c03"] == "BYTES" and types["d01"] == "FP32"
    assert [o["name"] for o in meta["outputs"]] == ["click", "conversion"]
    assert httpx.get(server.url + "/v2/models/model/ready").json()["ready"] is True


def test_v1_predict_equals_recmtl_score(server, exported, rows):  # noqa: F811
    r = httpx.post(server.url + "/v1/models/model/predict", json={"instances": instances(rows)})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    ref = reference_scores(exported, rows)
    assert len(preds) == rows.num_rows
    for task in ("click", "conversion"):
        np.testing.assert_allclose([p[task] for p in preds], ref.column(task).to_numpy(), atol=1e-7)
    assert any(v is None for v in rows["user_id"].to_pylist())  # nulls were part of the request


def test_v2_json_and_tritonclient_binary(server, exported, rows):  # noqa: F811
    import tritonclient.http as triton
    meta = httpx.get(server.url + "/v2/models/model").json()
    clean = rows.filter(pa.compute.is_valid(rows["user_id"]))
    n = clean.num_rows
    arrays = {}
    for i in meta["inputs"]:
        col = clean[i["name"]]
        if i["datatype"] == "BYTES":
            arrays[i["name"]] = np.array([v or "" for v in col.to_pylist()], dtype=object)
        elif i["datatype"] == "INT64":
            arrays[i["name"]] = col.to_numpy().astype(np.int64)
        else:
            arrays[i["name"]] = col.to_numpy(zero_copy_only=False).astype(np.float32)
    ref = reference_scores(exported, clean)
    # JSON has no NaN: the JSON request uses rows whose dense values are all present
    dense_ok = np.all([~np.isnan(arrays[i["name"]]) for i in meta["inputs"] if i["datatype"] == "FP32"], axis=0)
    datatype = {i["name"]: i["datatype"] for i in meta["inputs"]}
    body = {"inputs": [{"name": k, "shape": [int(dense_ok.sum())], "datatype": datatype[k],
                        "data": v[dense_ok].tolist()} for k, v in arrays.items()], "id": "req-1"}
    r = httpx.post(server.url + "/v2/models/model/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "req-1" and [o["name"] for o in out["outputs"]] == ["click", "conversion"]
    np.testing.assert_allclose(out["outputs"][0]["data"], ref.column("click").to_numpy()[dense_ok], atol=1e-6)
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_model_ready("model")
    inputs = []
    for name, arr in arrays.items():
        dt = next(i["datatype"] for i in meta["inputs"] if i["name"] == name)
        x = triton.InferInput(name, [n], dt)
        x.set_data_from_numpy(arr)  # binary data extension (tritonclient's default)
        inputs.append(x)
    result = client.infer("model", inputs)
    for task in ("click", "conversion"):
        np.testing.assert_allclose(result.as_numpy(task), ref.column(task).to_numpy(), atol=1e-6)
    json_out = client.infer("model", inputs, outputs=[triton.InferRequestedOutput("click", binary_data=False)])
    np.testing.assert_allclose(json_out.as_numpy("click"), ref.column("click").to_numpy(), atol=1e-6)


BAD_V1 = [
    (b"{not json", 400, "malformed JSON"),
    (b'{"rows": []}', 400, '"instances"'),
    (b'{"instances": []}', 400, "non-empty"),
    (b'{"instances": [1, 2]}', 400, "must be an object"),
]


@pytest.mark.parametrize("body,status,needle", BAD_V1)
def test_v1_malformed_bodies(server, body, status, needle):
    r = httpx.post(server.url + "/v1/models/model/predict", content=body)
    assert r.status_code == status and needle in r.json()["error"]


def test_v1_bad_features(server, rows):
    good = instances(rows.slice(0, 2))
    missing = [dict(good[0]), dict(good[1])]
    missing[0].pop("item_id")
    r = httpx.post(server.url + "/v1/models/model/predict", json={"instances": missing})
    assert r.status_code == 400 and "missing feature(s) ['item_id']" in r.json()["error"]
    unknown = [dict(good[0], color="red")]
    r = httpx.post(server.url + "/v1/models/model/predict", json={"instances": unknown})
    assert r.status_code == 400 and "unknown feature(s) ['color']" in r.json()["error"]
    wrong = [dict(good[0], user_id="abc")]
    r = httpx.post(server.url + "/v1/models/model/predict", json={"instances": wrong})
    assert r.status_code == 400 and "user_id" in r.json()["error"]
    huge = [dict(good[0], user_id=2**70)]
    r = httpx.post(server.url + "/v1/models/model/predict", json={"instances": huge})
    assert r.status_code == 400 and "user_id" in r.json()["error"]
    mixed = [dict(good[0], d01="x"), dict(good[1])]
    assert httpx.post(server.url + "/v1/models/model/predict", json={"instances": mixed}).status_code == 400
    r = httpx.post(server.url + "/v1/models/nope/predict", json={"instances": good})
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    all_null = [{k: None for k in good[0]}]
    r = httpx.post(server.url + "/v1/models/model/predict", json={"instances": all_null})
    assert r.status_code == 200, r.text  # every value missing is still a valid row


@pytest.mark.parametrize("mutate,needle", [
    (lambda b: b["inputs"][0].update(shape=[5]), "needs 5 values"),
    (lambda b: b["inputs"][0].update(shape=[2, 3]), "shape must be"),
    (lambda b: b["inputs"][0].update(datatype="BYTES", data=["a", "b"]), "expects INT64"),
    (lambda b: b["inputs"][0].update(datatype="INT64", data=["a", "b"]), "must be integers"),
    (lambda b: b["inputs"][0].update(name="nope"), "unknown input 'nope'"),
    (lambda b: b["inputs"].pop(), "missing input(s)"),
    (lambda b: b.update(inputs=[]), "non-empty"),
    (lambda b: b.update(outputs=[{"name": "ctr"}]), "unknown output 'ctr'"),
    (lambda b: b["inputs"][0].update(datatype="FP16"), "unsupported datatype"),
])
def test_v2_bad_tensors(server, mutate, needle):
    meta = httpx.get(server.url + "/v2/models/model").json()
    zero = {"INT64": 0, "FP32": 0.0, "BYTES": ""}
    body = {"inputs": [{"name": i["name"], "shape": [2], "datatype": i["datatype"], "data": [zero[i["datatype"]]] * 2}
                       for i in meta["inputs"]]}
    assert httpx.post(server.url + "/v2/models/model/infer", json=body).status_code == 200
    mutate(body)
    r = httpx.post(server.url + "/v2/models/model/infer", json=body)
    assert r.status_code == 400 and needle in r.json()["error"], r.text


def test_unknown_routes_and_methods(server):
    assert httpx.get(server.url + "/v3/anything").status_code == 404
    r = httpx.get(server.url + "/v2/models/model/infer")
    assert r.status_code == 405 and "method GET not allowed" in r.json()["error"] and r.headers["allow"] == "POST"
    assert httpx.get(server.url + "/v1/models/model/predict").status_code == 405
    assert httpx.get(server.url + "/v2/models/nope").status_code == 404
    r = httpx.post(server.url + "/v2/models/nope/versions/1/infer", json={"inputs": []})
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    assert httpx.post(server.url + "/v2/models/model/versions/2/infer", json={}).status_code == 404  # only version 1


def test_inference_route_matches_exactly_the_inference_paths():
    from recmtl.serving.app import inference_route
    assert inference_route("/v1/models/ctr/predict") == ("predict", "ctr")
    assert inference_route("/v2/models/ctr/infer") == ("infer", "ctr")
    assert inference_route("/v2/models/ctr/versions/1/infer") == ("infer", "ctr")
    for other in ("/v2/models/ctr/versions/2/infer", "/v2/models//infer", "/v1/models//predict", "/v1/models/ctr/predict/x",
                  "/v2/models/ctr", "/v1/models/ctr/infer", "/v2/models/ctr/ready", "/", "/metrics", "/v2/health/live"):
        assert inference_route(other) is None, other


def test_v2_versions_route_answers_like_the_plain_one(server):
    meta = httpx.get(server.url + "/v2/models/model").json()
    zero = {"INT64": 0, "FP32": 0.0, "BYTES": ""}
    body = {"id": "r1", "inputs": [{"name": i["name"], "shape": [1], "datatype": i["datatype"], "data": [zero[i["datatype"]]]}
                                   for i in meta["inputs"]]}
    plain = httpx.post(server.url + "/v2/models/model/infer", json=body)
    versioned = httpx.post(server.url + "/v2/models/model/versions/1/infer", json=body)
    assert plain.status_code == versioned.status_code == 200
    assert plain.headers["content-type"] == "application/json"
    assert plain.json() == versioned.json() and plain.json()["id"] == "r1"


def test_micro_batching_merges_concurrent_requests_and_metrics(server, rows):
    one = {"instances": instances(rows.slice(0, 1))}
    with httpx.Client() as client, cf.ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(lambda _: client.post(server.url + "/v1/models/model/predict", json=one).status_code, range(256)))
    assert set(codes) == {200}
    text = httpx.get(server.url + "/metrics").text
    assert 'recmtl_requests_total{route="predict",status="200"}' in text
    assert "recmtl_request_seconds_bucket" in text
    counts = {}
    for line in text.splitlines():
        if line.startswith('recmtl_batch_rows_bucket{le="1.0",model="model"}') or line.startswith('recmtl_batch_rows_count{model="model"}'):
            counts[line.split("{")[0]] = float(line.split()[-1])
    # fewer onnxruntime calls with more than one row than requests: some calls merged requests
    assert counts["recmtl_batch_rows_count"] > counts["recmtl_batch_rows_bucket"]
    assert 'status="5' not in text  # nothing any client sent produced a 500


def test_body_limit(exported, rows):  # noqa: F811
    srv = Server(exported / "model.onnx", "--max-body-mb", "0.05")
    try:
        big = {"instances": instances(rows) * 20}
        r = httpx.post(srv.url + "/v1/models/model/predict", json=big)
        assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


def test_graceful_shutdown_finishes_in_flight_request(exported, rows):  # noqa: F811
    srv = Server(exported / "model.onnx", "--max-body-mb", "256", "--max-request-rows", "200000")
    try:
        big = {"instances": instances(rows) * 3000}  # 192k rows: seconds of work for the server
        body = json.dumps(big).encode()
        # the whole request is on the wire before SIGTERM (a client thread could still be encoding it on a
        # loaded machine, and then meet a closed port): a raw socket, the response read after the signal
        conn = socket.create_connection(("127.0.0.1", srv.port), timeout=120)
        conn.sendall(b"POST /v1/models/model/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGTERM)
        response = b""
        while chunk := conn.recv(1 << 20):
            response += chunk
        conn.close()
        head, _, payload = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        assert len(json.loads(payload)["predictions"]) == len(big["instances"])  # in flight at SIGTERM, and finished
        assert srv.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


def test_folder_of_models_and_triton_repo(cli, exported, tmp_path):  # noqa: F811
    repo = tmp_path / "triton"
    r = cli("export", exported / "run", "-o", tmp_path / "ctr.onnx", "--triton-repo", repo, "--name", "ctr_model")
    assert r.code == 0, r
    config = (repo / "ctr_model" / "config.pbtxt").read_text()
    assert (repo / "ctr_model" / "1" / "model.onnx").is_file()
    assert 'platform: "onnxruntime_onnx"' in config and "dynamic_batching" in config
    assert 'name: "c03" data_type: TYPE_STRING dims: [ 1 ] reshape: { shape: [ ] }' in config
    assert 'name: "click" data_type: TYPE_FP32' in config
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(exported / "model.onnx", models / "first.onnx")
    shutil.copy(exported / "model.onnx", models / "second.onnx")
    for target, names in ((models, ["first", "second"]), (repo, ["ctr_model"])):
        srv = Server(target)
        try:
            for name in names:
                assert httpx.get(f"{srv.url}/v2/models/{name}/ready").status_code == 200
        finally:
            assert srv.stop()


def test_serve_refuses_missing_model(cli, tmp_path):
    r = cli("serve", tmp_path / "none.onnx")
    assert r.code == 2 and "no such model file or folder" in r.err


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(REPO / ".venv" / "bin" / "hadolint")
    r = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (REPO / "Dockerfile").read_text()
    assert "USER 10001" in text and "HEALTHCHECK" in text and "/v2/health/live" in text


def test_scoring_and_serving_import_neither_torch_nor_training_libraries(exported, holey_data, tmp_path):  # noqa: F811
    """The Docker image installs recmtl without torch, onnx, scikit-learn, pandas, Pillow, scipy, PyYAML or
    pydantic: `recmtl score` and the server's app must work with those imports blocked."""
    import sys
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx", "sklearn", "pandas", "PIL", "scipy", "yaml", "matplotlib"):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
from recmtl.serving.app import create_app
create_app({str(exported / "model.onnx")!r})
from recmtl.cli import main
try:
    main(["score", {str(exported / "model.onnx")!r}, {str(holey_data / "test.parquet")!r}, "-o",
          {str(tmp_path / "s.parquet")!r}, "--no-progress"])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
assert "torch" not in sys.modules
assert "recmtl.config" not in sys.modules  # pydantic: only recent typer versions need it themselves
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert pq.read_table(tmp_path / "s.parquet").num_rows == pq.read_metadata(holey_data / "test.parquet").num_rows


@pytest.mark.slow
def test_the_docker_images_packages_score_and_serve(exported, holey_data, rows, tmp_path):  # noqa: F811
    """Without a container engine, the next best thing: a venv with exactly the packages the Dockerfile pins,
    recmtl installed with --no-deps as the image does, then `recmtl score` and `recmtl serve` answer."""
    import re
    import sys
    pins = re.findall(r'"([A-Za-z0-9_.\-\[\]]+==[^"]+)"', (REPO / "Dockerfile").read_text())
    assert any(p.startswith("onnxruntime==") for p in pins) and not any(p.startswith("torch") for p in pins)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        pytest.skip(f"cannot install the Dockerfile's packages from the registry: {pip.stderr[-500:]}")
    pip = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(REPO)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert pip.returncode == 0, pip.stderr[-2000:]
    recmtl = str(venv / "bin" / "recmtl")
    r = subprocess.run([recmtl, "score", str(exported / "model.onnx"), str(holey_data / "test.parquet"), "-o",
                        str(tmp_path / "s.parquet"), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert pq.read_table(tmp_path / "s.parquet").num_rows == pq.read_metadata(holey_data / "test.parquet").num_rows
    port = free_port()
    proc = subprocess.Popen([recmtl, "serve", str(exported / "model.onnx"), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(url + "/v2/health/live", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(url + "/v1/models/model/predict", json={"instances": instances(rows.slice(0, 4))})
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_v1_value_checks_and_int_dense_values(server, exported, rows):  # noqa: F811
    good = instances(rows.slice(0, 1))[0]
    good = {k: (0.5 if k.startswith("d") and v is None else v) for k, v in good.items()}
    url = server.url + "/v1/models/model/predict"
    as_float = httpx.post(url, json={"instances": [dict(good, d01=3.0)]}).json()["predictions"]
    as_int = httpx.post(url, json={"instances": [dict(good, d01=3)]}).json()["predictions"]
    assert as_int == as_float  # a whole number for a dense feature is that number
    r = httpx.post(url, json={"instances": [dict(good, item_id=2**63)]})  # fits uint64, not int64
    assert r.status_code == 400 and "item_id" in r.json()["error"] and "64-bit" in r.json()["error"]
    r = httpx.post(url, json={"instances": [dict(good, c03=7)]})
    assert r.status_code == 400 and "feature 'c03'" in r.json()["error"] and "strings" in r.json()["error"]
    body = b'{"instances": [{"d01": NaN}]}'  # not JSON (RFC 8259): send null for a missing value
    r = httpx.post(url, content=body)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]


def test_a_bad_request_in_a_merged_batch_fails_alone(server, exported, rows):  # noqa: F811
    """Values are checked per request before batching, so one bad request cannot fail the others' batch."""
    good = instances(rows.slice(0, 8))
    ref = reference_scores(exported, rows.slice(0, 8)).column("click").to_numpy()
    bodies = [{"instances": [good[i % 8]]} if i % 5 else {"instances": [dict(good[0], user_id="x")]} for i in range(200)]
    with httpx.Client() as client, cf.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda b: client.post(server.url + "/v1/models/model/predict", json=b), bodies))
    for i, r in enumerate(answers):
        if i % 5:
            assert r.status_code == 200 and abs(r.json()["predictions"][0]["click"] - ref[i % 8]) < 1e-6
        else:
            assert r.status_code == 400


def test_merged_feeds_equal_to_feeds(exported, rows):  # noqa: F811
    """v1 rows (kept as lists until a batch runs) and v2 arrays merge into exactly the arrays to_feeds makes."""
    from recmtl.serving.decoders import JsonRows, RequestDecoder, merge_feeds
    from recmtl.serving.score import Scorer, to_feeds
    scorer = Scorer(exported / "model.onnx")
    decoder = RequestDecoder(scorer.inputs, scorer.tasks)
    table = rows.slice(0, 6)
    reference = to_feeds(table, scorer.inputs)
    first, _ = decoder.from_instances({"instances": instances(table.slice(0, 2))})
    second, _ = decoder.from_instances({"instances": instances(table.slice(2, 3))})
    assert isinstance(first, JsonRows)
    v2 = to_feeds(table.slice(5, 1), scorer.inputs)
    for parts in ([first, second], [first, second, v2]):
        merged = merge_feeds(parts, scorer.inputs)
        n = 5 if len(parts) == 2 else 6
        for name, want in reference.items():
            assert merged[name].dtype == want.dtype, name
            np.testing.assert_array_equal(merged[name], want[:n], err_msg=name)
