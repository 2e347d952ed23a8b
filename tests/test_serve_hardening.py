"""`recmtl serve` against clients that try to exhaust it or send it garbage (issue 15, items 2-5), each point
checked with a real server on 127.0.0.1 started and stopped by the test; and the model file checks of
scoring and serving."""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import re
import shutil
import signal
import socket
import time

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO, run_subprocess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_export_score import exported, holey_data  # noqa: F401  (module-scoped fixtures)
from test_serve import Server, free_port, instances


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def read_response(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout``)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


@pytest.fixture(scope="module")
def server(exported):  # noqa: F811
    srv = Server(exported / "model.onnx", "--read-timeout", "1", "--max-request-rows", "5000", "--max-batch-size", "64")
    yield srv
    assert srv.stop()


@pytest.fixture(scope="module")
def good_v2(server):
    meta = httpx.get(server.url + "/v2/models/model").json()
    zero = {"INT64": 0, "FP32": 0.5, "BYTES": "a"}
    return {"inputs": [{"name": i["name"], "shape": [2], "datatype": i["datatype"], "data": [zero[i["datatype"]]] * 2}
                       for i in meta["inputs"]]}


@pytest.fixture(scope="module")
def good_v1(holey_data):  # noqa: F811
    return {"instances": instances(pq.read_table(holey_data / "test.parquet").slice(0, 2))}


# ---- 2. a client cannot exhaust the server ------------------------------------------------------------------
def test_an_oversized_request_head_is_431_and_holds_no_memory(server):
    before = rss_mb(server.proc.pid)
    socks = []
    for _ in range(8):  # unfinished 4 MiB headers: each would be buffered whole without a limit
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(64):
                s.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        socks.append(s)
    answers = [read_response(s, 5) for s in socks]
    for s in socks:
        s.close()
    assert all(a.startswith(b"HTTP/1.1 431") for a in answers), answers[0][:200]
    assert b'"error"' in answers[0] and b"request head larger than" in answers[0]
    assert rss_mb(server.proc.pid) - before < 40  # (without the limit: +32 MiB of headers, held)
    assert httpx.get(server.url + "/v2/health/live").status_code == 200


def test_slow_heads_and_bodies_are_cut_after_the_read_timeout(server):
    start = time.monotonic()
    silent = socket.create_connection(("127.0.0.1", server.port))
    slow_head = socket.create_connection(("127.0.0.1", server.port))
    slow_body = socket.create_connection(("127.0.0.1", server.port))
    slow_head.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
    slow_body.sendall(b"POST /v1/models/model/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"instances\"")
    for _ in range(3):  # slowloris: a byte now and then, never the end of the head
        time.sleep(0.3)
        try:
            slow_head.sendall(b"X")
        except OSError:
            break
    answers = {name: read_response(s, 5) for name, s in (("silent", silent), ("head", slow_head), ("body", slow_body))}
    elapsed = time.monotonic() - start
    for s in (silent, slow_head, slow_body):
        s.close()
    assert answers["head"].startswith(b"HTTP/1.1 408") and b"request head not received within 1 s" in answers["head"]
    assert answers["silent"].startswith(b"HTTP/1.1 408")
    assert answers["body"].startswith(b"HTTP/1.1 408") and b"request body did not arrive within 1 s" in answers["body"]
    assert elapsed < 4  # all three closed by the server after about a second


def test_slow_clients_do_not_hold_shutdown(exported, good_v1):  # noqa: F811
    srv = Server(exported / "model.onnx", "--read-timeout", "2")
    socks = []
    try:
        for i in range(20):
            s = socket.create_connection(("127.0.0.1", srv.port))
            if i % 2:
                s.sendall(b"POST /v1/models/model/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
            else:
                s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        assert httpx.post(srv.url + "/v1/models/model/predict", json=good_v1).status_code == 200
        time.sleep(0.3)
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=20) in (0, -signal.SIGTERM)
        assert time.monotonic() - start < 6  # (without the read timeout: the full 30 s graceful timeout)
    finally:
        for s in socks:
            s.close()
        if srv.proc.poll() is None:
            srv.proc.kill()


def _hold_slots(port: int, n: int, length: int = 100) -> list[socket.socket]:
    """``n`` inference requests in flight: heads sent, bodies still to come."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/models/model/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {length}\r\n\r\n".encode())
        socks.append(s)
    time.sleep(0.3)
    return socks


def test_saturation_is_a_503_with_retry_after(exported, holey_data, good_v1):  # noqa: F811
    srv = Server(exported / "model.onnx", "--max-concurrency", "1", "--max-inflight-mb", "5", "--read-timeout", "5",
                 "--max-connections", "6")
    try:
        held = _hold_slots(srv.port, 2)  # slow bodies do not hold the one slot: they are not being answered yet
        assert httpx.post(srv.url + "/v1/models/model/predict", json=good_v1).status_code == 200
        for s in held:
            s.close()
        # while a large request is being answered, another one is told to come back
        big = {"instances": instances(pq.read_table(holey_data / "test.parquet")) * 5}  # 20,000 rows
        def post_large() -> httpx.Response:  # a client that honours Retry-After: one of the probes below may hold the slot
            deadline = time.monotonic() + 60
            while True:
                r = httpx.post(srv.url + "/v1/models/model/predict", json=big, timeout=60)
                if r.status_code != 503 or time.monotonic() > deadline:
                    return r
                time.sleep(0.05)

        with cf.ThreadPoolExecutor(1) as pool:
            large = pool.submit(post_large)
            busy = None
            deadline = time.monotonic() + 20
            while busy is None and not large.done() and time.monotonic() < deadline:
                r = httpx.post(srv.url + "/v1/models/model/predict", json=good_v1)
                busy = r if r.status_code == 503 else None
            assert large.result().status_code == 200
        assert busy is not None, "no request met the busy server"
        assert busy.headers["retry-after"] == "1" and "max-concurrency" in busy.json()["error"]
        # a body of 3 MB being read: another one of 3 MB would pass the 5 MiB of bodies in flight
        held = _hold_slots(srv.port, 1, length=3_000_000)
        padded = json.dumps(good_v1).encode().ljust(3_000_000)
        r = httpx.post(srv.url + "/v1/models/model/predict", content=padded)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "max-inflight-mb" in r.json()["error"]
        assert httpx.post(srv.url + "/v1/models/model/predict", json=good_v1).status_code == 200  # small: fits
        for s in held:
            s.close()
        # more open connections than --max-connections: requests on them get a 503 too
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(8)]
        time.sleep(0.3)
        r = httpx.get(srv.url + "/v2/health/live")
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "open connections" in r.json()["error"]
        for s in idle:
            s.close()
        time.sleep(0.3)
        assert httpx.get(srv.url + "/v2/health/live").status_code == 200
    finally:
        assert srv.stop()


def test_large_requests_run_in_chunks_and_have_a_row_limit(server, exported, holey_data):  # noqa: F811
    table = pq.read_table(holey_data / "test.parquet").slice(0, 1000)
    rows = instances(table)
    before = httpx.get(server.url + "/metrics").text
    r = httpx.post(server.url + "/v1/models/model/predict", json={"instances": rows * 3})  # 3000 rows
    assert r.status_code == 200 and len(r.json()["predictions"]) == 3000
    from recmtl.serving.score import Scorer
    ref = Scorer(exported / "model.onnx").score(table).column("click").to_numpy()
    np.testing.assert_allclose([p["click"] for p in r.json()["predictions"][:1000]], ref, atol=1e-6)
    after = httpx.get(server.url + "/metrics").text

    def calls(text: str, bucket: str) -> float:
        pattern = rf'recmtl_batch_rows_bucket{{le="{bucket}",model="model"}} (\S+)' if bucket else \
            r'recmtl_batch_rows_count{model="model"} (\S+)'
        m = re.search(pattern, text)
        return float(m.group(1)) if m else 0.0
    new_calls = calls(after, "") - calls(before, "")
    assert new_calls >= 3000 / 64  # in onnxruntime calls of --max-batch-size rows
    assert calls(after, "64.0") - calls(before, "64.0") == new_calls  # none larger
    r = httpx.post(server.url + "/v1/models/model/predict", json={"instances": rows * 6})  # 6000 > 5000
    assert r.status_code == 413 and "--max-request-rows" in r.json()["error"]


def test_memory_after_a_burst_of_large_requests_returns_near_baseline(exported, holey_data):  # noqa: F811
    srv = Server(exported / "model.onnx")
    try:
        rows = instances(pq.read_table(holey_data / "test.parquet"))  # 4000 rows
        body = json.dumps({"instances": rows * 8}).encode()  # 32,000 rows, about 6 MB of JSON
        assert httpx.post(srv.url + "/v1/models/model/predict", content=body, timeout=120).status_code == 200
        baseline = rss_mb(srv.proc.pid)
        with cf.ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda _: httpx.post(srv.url + "/v1/models/model/predict", content=body,
                                                       timeout=120).status_code, range(4)))
        assert codes == [200] * 4
        # (one onnxruntime call of all rows per request kept ~60 MB per request in its arena)
        assert rss_mb(srv.proc.pid) - baseline < 120
    finally:
        assert srv.stop()


# ---- 3. no 500 on malformed v2 requests; the internal errors that remain are JSON and logged once --------------
MALFORMED_V2 = [
    (lambda b: b.update(parameters=[1]), "parameters must be a JSON object"),
    (lambda b: b.update(parameters="x"), "parameters must be a JSON object"),
    (lambda b: b.update(outputs=[{"name": "click", "parameters": 7}]), "parameters must be a JSON object"),
    (lambda b: b["inputs"][0].update(parameters=[]), "parameters must be a JSON object"),
    (lambda b: b["inputs"][0].update(datatype=["INT64"]), "datatype must be a string"),
    (lambda b: b["inputs"][0].update(datatype={"a": 1}), "datatype must be a string"),
    (lambda b: b.update(outputs="click"), '"outputs" must be a list'),
    (lambda b: b.update(outputs={"name": "click"}), '"outputs" must be a list'),
    (lambda b: b.update(outputs=7), '"outputs" must be a list'),
    (lambda b: b.update(parameters={"binary_data_output": "false"}), "binary_data_output must be true or false"),
    (lambda b: b.update(outputs=[{"name": "click", "parameters": {"binary_data": 1}}]), "must be true or false"),
    (lambda b: b["inputs"][0].update(data=[1.9, 2]), "INT64 data must be integers"),
    (lambda b: b["inputs"][0].update(shape=[True]), "shape must be a list of non-negative integers"),
    (lambda b: b["inputs"][0].update(shape=[2.0]), "shape must be a list of non-negative integers"),
    (lambda b: b["inputs"][0].update(parameters={"binary_data_size": True}), "binary_data_size"),
    (lambda b: b["inputs"].append(dict(b["inputs"][0])), "given twice"),
]


@pytest.mark.parametrize("mutate,needle", MALFORMED_V2)
def test_malformed_v2_requests_are_400_json(server, good_v2, mutate, needle):
    body = json.loads(json.dumps(good_v2))
    mutate(body)
    r = httpx.post(server.url + "/v2/models/model/infer", json=body)
    assert r.status_code == 400 and needle in r.json()["error"], r.text


def test_lax_v2_values_are_refused(server, good_v2):
    dense = next(i for i in good_v2["inputs"] if i["datatype"] == "FP32")["name"]
    body = json.loads(json.dumps(good_v2))
    next(i for i in body["inputs"] if i["name"] == dense)["data"] = [1e39, 0.0]
    r = httpx.post(server.url + "/v2/models/model/infer", json=body)
    assert r.status_code == 400 and "beyond the FP32 range" in r.json()["error"]
    # FP64 values beyond float32 sent for a dense input
    next(i for i in body["inputs"] if i["name"] == dense).update(datatype="FP64", data=[1e39, 0.0])
    r = httpx.post(server.url + "/v2/models/model/infer", json=body)
    assert r.status_code == 400 and "FP32 range" in r.json()["error"]
    # /v1 too: a dense value beyond float32 is not silently infinity
    r = httpx.post(server.url + "/v1/models/model/predict", json={"instances": [{i["name"]: (1e39 if i["name"] == dense else None)
                                                                                  for i in good_v2["inputs"]}]})
    assert r.status_code == 400 and "float32 range" in r.json()["error"]
    # trailing bytes after the declared binary tensors
    header = json.dumps(good_v2).encode()
    r = httpx.post(server.url + "/v2/models/model/infer", content=header + b"\x00" * 8,
                   headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and "8 bytes of binary data after the declared tensors" in r.json()["error"]
    # binary_data_output true (a real boolean) still gives binary outputs
    body = dict(good_v2, parameters={"binary_data_output": True})
    r = httpx.post(server.url + "/v2/models/model/infer", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
                     | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_KEYS_V2 = ["inputs", "outputs", "parameters", "id", "name", "shape", "datatype", "data", "binary_data_size",
            "binary_data_output", "binary_data"]


def _mutations(base: dict) -> st.SearchStrategy:
    """A valid request with one to three of its values (at any depth) replaced by random JSON."""
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node[:3]):
                walk(v, (*path, i))
    walk(base, ())

    @st.composite
    def mutated(draw):
        body = json.loads(json.dumps(base))
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(paths[1:]))
            node = body
            try:
                for p in path[:-1]:
                    node = node[p]
                node[path[-1]] = draw(_json)
            except (KeyError, IndexError, TypeError):
                pass
        if draw(st.booleans()):  # sometimes a key the protocol knows, with a random value
            body[draw(st.sampled_from(_KEYS_V2))] = draw(_json)
        return body
    return mutated()


@pytest.fixture(scope="module")
def fuzz_client(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_requests_never_get_a_5xx(fuzz_client, good_v1, good_v2, data):
    """Property: whatever JSON a client sends to either inference route, the answer is a JSON 2xx or 4xx."""
    route, base = data.draw(st.sampled_from([("/v2/models/model/infer", good_v2), ("/v1/models/model/predict", good_v1)]))
    body = data.draw(st.one_of(_mutations(base), _json))
    raw = json.dumps(body).encode()
    if data.draw(st.booleans()):  # Triton's binary extension: some header length, some bytes after it
        cut = data.draw(st.integers(0, len(raw) + 4))
        headers = {"Inference-Header-Content-Length": str(cut)}
        raw += data.draw(st.binary(max_size=24))
    else:
        headers = {}
    r = fuzz_client.post(route, content=raw, headers=headers)
    assert r.status_code < 500, (r.status_code, raw[:300], r.text[:300])
    assert r.headers["content-type"] == "application/json" and isinstance(r.json(), dict)


def test_an_internal_error_is_a_json_500_logged_once(exported, good_v1, caplog):  # noqa: F811
    import asyncio

    from recmtl.serving import decoders
    from recmtl.serving.app import create_app
    app = create_app(exported / "model.onnx")

    def broken(self, body):
        raise RuntimeError("a bug")
    original = decoders.RequestDecoder.from_instances

    async def drive() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return [await client.post("/v1/models/model/predict", json=good_v1) for _ in range(5)]
    decoders.RequestDecoder.from_instances = broken
    try:
        with caplog.at_level(logging.ERROR):
            answers = asyncio.run(drive())
    finally:
        decoders.RequestDecoder.from_instances = original
    assert [r.status_code for r in answers] == [500] * 5
    assert answers[0].json() == {"error": "internal server error (RuntimeError)"}
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == 1 and "logged once" in tracebacks[0].getMessage()


def test_a_damaged_image_is_a_data_error():
    import io
    import struct
    import zlib

    import pyarrow as pa
    from PIL import Image

    from recmtl.data.images import decode_images
    from recmtl.errors import DataError

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")
    with pytest.raises(DataError, match="row 0: not a readable image .DecompressionBombError"):
        decode_images(pa.array([bomb], pa.binary()), "img", 1, 8, 8)
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    original = Image.open

    def syntax_error(*args, **kwargs):
        raise SyntaxError("broken PNG file")
    Image.open = syntax_error
    try:
        with pytest.raises(DataError, match="SyntaxError: broken PNG file"):
            decode_images(pa.array([buf.getvalue()], pa.binary()), "img", 1, 8, 8)
    finally:
        Image.open = original


# ---- 4. models with external data are refused; the Dockerfile's onnxruntime ---------------------------------------
@pytest.fixture(scope="module")
def external_model(exported, tmp_path_factory):  # noqa: F811
    import onnx
    folder = tmp_path_factory.mktemp("external")
    model = onnx.load(str(exported / "model.onnx"))
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.data", size_threshold=0)
    assert (folder / "weights.data").is_file()
    return folder / "model.onnx"


def test_a_model_with_external_data_is_refused_by_scoring_and_serving(cli, external_model, holey_data, tmp_path):  # noqa: F811
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    from recmtl.errors import DataError
    from recmtl.serving.modelfile import external_data_tensors
    from recmtl.serving.score import Scorer
    model = onnx.load(str(external_model), load_external_data=False)
    assert external_data_tensors(external_model) == [t.name for t in _get_all_tensors(model) if uses_external_data(t)]
    with pytest.raises(DataError, match="keeps tensor data in other files"):
        Scorer(external_model)
    r = cli("score", external_model, holey_data / "test.parquet", "-o", tmp_path / "s.parquet", "--no-progress")
    assert r.code == 2 and "keeps tensor data in other files" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "s.parquet").exists()
    r = run_subprocess("serve", external_model, "--port", str(free_port()), timeout=60)
    assert r.returncode == 2 and "keeps tensor data in other files" in r.stderr and "Traceback" not in r.stderr


def test_external_data_anywhere_in_the_graph_is_found(exported, tmp_path):  # noqa: F811
    """A Constant node's tensor, a subgraph's initializer and a sparse initializer count as much as the graph's."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from recmtl.serving.modelfile import external_data_tensors

    def external(name: str) -> TensorProto:
        t = numpy_helper.from_array(np.ones(4, np.float32), name)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", "/etc/passwd"
        return t
    base = onnx.load(str(exported / "model.onnx"))
    assert external_data_tensors(exported / "model.onnx") == []
    m = onnx.ModelProto()
    m.CopyFrom(base)
    m.graph.node.append(helper.make_node("Constant", [], ["k"], value=external("constant")))
    sub = helper.make_graph([], "then", [], [helper.make_tensor_value_info("s", TensorProto.FLOAT, [4])],
                            initializer=[external("in_subgraph")])
    m.graph.node.append(helper.make_node("If", ["cond"], ["o"], then_branch=sub, else_branch=sub))
    sparse = helper.make_sparse_tensor(external("sparse_values"), numpy_helper.from_array(np.array([0], np.int64), "i"), [4])
    m.graph.sparse_initializer.append(sparse)
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    assert sorted(external_data_tensors(path)) == ["constant", "in_subgraph", "in_subgraph", "sparse_values"]


def test_the_dockerfiles_onnxruntime_refuses_escaping_external_data():
    pins = dict(re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[a-z]+\])?==([^"]+)"', (REPO / "Dockerfile").read_text()))
    version = tuple(int(x) for x in pins["onnxruntime"].split(".")[:2])
    assert version >= (1, 32), pins["onnxruntime"]  # 1.22 followed external-data paths out of the model folder


# ---- 5. recmtl serve DIR: names, symlinks, and a bad model among good ones ----------------------------------------
def test_serving_a_folder_with_bad_models_serves_the_good_ones(exported, good_v1, tmp_path):  # noqa: F811
    models = tmp_path / "models"
    (models / "twice" / "1").mkdir(parents=True)
    shutil.copy(exported / "model.onnx", models / "good.onnx")
    shutil.copy(exported / "model.onnx", models / "twice.onnx")
    shutil.copy(exported / "model.onnx", models / "twice" / "1" / "model.onnx")  # the same name twice
    (models / "damaged.onnx").write_bytes((exported / "model.onnx").read_bytes()[:2000])
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(exported / "model.onnx", outside)
    os.symlink(outside, models / "linked_out.onnx")
    os.symlink(models / "good.onnx", models / "linked_in.onnx")
    os.symlink(tmp_path / "nothing.onnx", models / "dangling.onnx")

    from recmtl.serving.triton import discover_models
    found, refused = discover_models(models)
    assert sorted(found) == ["damaged", "good", "linked_in"]
    assert sorted(refused) == ["dangling", "linked_out", "twice"]
    assert "2 files claim the name 'twice'" in refused["twice"] and "outside" in refused["linked_out"]

    srv = Server(models)
    try:
        for name in ("good", "linked_in"):
            assert httpx.post(f"{srv.url}/v1/models/{name}/predict", json=good_v1).status_code == 200
            assert httpx.get(f"{srv.url}/v2/models/{name}/ready").status_code == 200
        for name, needle in (("twice", "2 files claim"), ("damaged", "not an ONNX model"), ("linked_out", "outside"),
                             ("dangling", "symlink to nothing")):
            r = httpx.post(f"{srv.url}/v1/models/{name}/predict", json=good_v1)
            assert r.status_code == 503 and needle in r.json()["error"], (name, r.text)
            assert httpx.get(f"{srv.url}/v2/models/{name}/ready").status_code == 503
        assert httpx.get(srv.url + "/v2/health/ready").status_code == 200
    finally:
        assert srv.stop()
    stderr = srv.proc.stderr.read().decode()
    assert stderr.count("not served") == 4 and "Traceback" not in stderr


def test_a_folder_of_only_bad_models_is_a_clear_error(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    r = run_subprocess("serve", tmp_path, "--port", str(free_port()), timeout=60)
    assert r.returncode == 2 and "no model in" in r.stderr and "'bad'" in r.stderr and "Traceback" not in r.stderr


# ---- 9. scoring: one-line errors for damaged or inconsistent input, null-typed columns accepted -------------------
def _lying_footer(src, dst, rows: int) -> None:
    """``src`` (one row group of ``rows`` rows) with footers that declare 2000 rows: pyarrow reads it short."""
    import struct

    def varint(n: int) -> bytes:
        out, n = b"", n * 2  # zigzag of a non-negative i64
        while n >= 0x80:
            out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
        return out + bytes([n])
    raw = src.read_bytes()
    length = struct.unpack("<I", raw[-8:-4])[0]
    footer = raw[-8 - length:-8]
    assert len(varint(rows)) == len(varint(2000))
    patched = footer.replace(b"\x16" + varint(rows), b"\x16" + varint(2000))  # num_rows / num_values (i64 fields)
    dst.write_bytes(raw[:-8 - length] + patched + raw[-8:])


def test_scoring_errors_are_one_line(cli, exported, holey_data, tmp_path):  # noqa: F811
    import pyarrow as pa
    table = pq.read_table(holey_data / "test.parquet").slice(0, 1500)
    model, out = exported / "model.onnx", tmp_path / "s.parquet"
    # a file whose rows read fewer than its footer says
    pq.write_table(table, tmp_path / "full.parquet", row_group_size=1500)
    _lying_footer(tmp_path / "full.parquet", tmp_path / "short.parquet", 1500)
    assert pq.ParquetFile(tmp_path / "short.parquet").metadata.num_rows == 2000
    for workers in ("1", "2"):
        r = cli("score", model, tmp_path / "short.parquet", "-o", out, "--no-progress", "--workers", workers)
        assert r.code == 2 and "read 1,500 rows" in r.err and "declare 2,000" in r.err, r
        assert not out.exists()
    # a --keep column whose type changes across files
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(table.slice(0, 700), parts / "a.parquet")
    other = table.slice(700).set_column(table.schema.get_field_index("row_id"), "row_id",
                                        pa.array([str(v) for v in table["row_id"].to_pylist()[700:]]))
    pq.write_table(other, parts / "b.parquet")
    r = cli("score", model, parts, "-o", out, "--keep", "row_id", "--no-progress")
    assert r.code == 2 and "'row_id'" in r.err and "string" in r.err and "b.parquet" in r.err, r
    assert not out.exists() and "Traceback" not in r.err
    # an input column of the wrong kind in the second file only: named with its file
    wrong = table.slice(700).set_column(table.schema.get_field_index("d01"), "d01", pa.array(["x"] * 800))
    pq.write_table(wrong, parts / "b.parquet")
    r = cli("score", model, parts, "-o", out, "--no-progress")
    assert r.code == 2 and "'d01'" in r.err and "string" in r.err and "b.parquet" in r.err, r


def test_an_arrow_error_while_opening_a_file_is_a_data_error(holey_data, monkeypatch):  # noqa: F811
    import pyarrow as pa
    import pyarrow.parquet as pqm

    from recmtl.data.parquet import ParquetSource
    from recmtl.errors import DataError

    def unsupported(*args, **kwargs):
        raise pa.ArrowNotImplementedError("Not implemented: reading a type of the footer")
    monkeypatch.setattr(pqm, "ParquetFile", unsupported)
    with pytest.raises(DataError, match="not a readable Parquet file.*Not implemented"):
        ParquetSource(str(holey_data / "test.parquet"))


def test_damaged_dictionary_indices_and_null_typed_columns(cli, exported, holey_data, tmp_path):  # noqa: F811
    import pyarrow as pa

    from recmtl.errors import DataError
    from recmtl.serving.score import Scorer, to_feeds
    scorer = Scorer(exported / "model.onnx")
    table = pq.read_table(holey_data / "test.parquet").slice(0, 50)
    damaged = pa.DictionaryArray.from_arrays(pa.array([0, 1, 9], pa.int32()), pa.array(["a", "b"]), safe=False)
    batch = table.slice(0, 3).set_column(table.schema.get_field_index("c03"), "c03", damaged)
    with pytest.raises(DataError, match="column 'c03' is damaged"):
        to_feeds(batch, scorer.inputs)
    # an all-null column of Arrow type null is every value missing, as with nulls of the column's own type
    i = table.schema.get_field_index("user_id")
    typed = table.set_column(i, "user_id", pa.nulls(50, pa.int64()))
    untyped = table.set_column(i, "user_id", pa.nulls(50))
    pq.write_table(untyped, tmp_path / "nulls.parquet")
    r = cli("score", exported / "model.onnx", tmp_path / "nulls.parquet", "-o", tmp_path / "s.parquet", "--no-progress")
    assert r.code == 0, r
    np.testing.assert_array_equal(pq.read_table(tmp_path / "s.parquet")["click"].to_numpy(),
                                  scorer.score(typed).column("click").to_numpy())
