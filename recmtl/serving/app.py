"""``recmtl serve``: exported ONNX models over HTTP (Starlette + uvicorn).

* Open Inference Protocol (KServe v2, as spoken by Triton): health, model metadata/readiness, and
  ``POST /v2/models/{name}/infer`` with JSON tensors or Triton's binary-data extension.
* ``POST /v1/models/{name}/predict`` with ``{"instances": [{column: value, ...}]}`` (raw values, nulls allowed).
* ``GET /metrics``: Prometheus text (requests by route and status, latency, batch sizes).
* Dynamic micro-batching: concurrent requests to a model are merged into one onnxruntime call.
* Anything a client sends wrong is a 4xx with ``{"error": ...}``; bodies over the limit are a 413.
"""
from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse as _StarletteJSON
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

import recmtl
from recmtl.errors import DataError, RecmtlError
from recmtl.serving.score import INT_NULL, ModelInput, Scorer, to_feeds
from recmtl.data.sequences import PAD_INT, PAD_STRING

V2_TYPES = {"int64": "INT64", "string": "BYTES", "float32": "FP32"}
NUMPY_OF = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "FP64": np.float64}
HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = b"application/json"


class JSONResponse(_StarletteJSON):
    """Starlette's JSON response, encoded by orjson (several times faster on the request path)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class ClientError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ServeOptions:
    max_batch_size: int = 256  # rows per onnxruntime call; 0 disables micro-batching
    max_wait_ms: float = 2.0
    max_body_bytes: int = 16 << 20
    threads: int | None = None


class JsonRows:
    """``/v1`` instances of a model whose inputs are all scalars, validated, as one list of values per row
    (in the model's input order). Kept as Python lists until a batch is run, so the per-feature array
    conversion happens once per onnxruntime call rather than once per request."""

    __slots__ = ("rows",)

    def __init__(self, rows: list[list]) -> None:
        self.rows = rows

    def arrays(self, inputs: list[ModelInput]) -> dict[str, np.ndarray]:
        columns = zip(*self.rows)
        return {inp.name: np.array(col, dtype=_NUMPY_DTYPE[inp.dtype]) for inp, col in zip(inputs, columns)}


Feeds = dict[str, np.ndarray] | JsonRows


@dataclass
class _Pending:
    feeds: Feeds
    rows: int
    future: asyncio.Future


@dataclass
class ServedModel:
    name: str
    path: Path
    scorer: Scorer
    options: ServeOptions
    queue: asyncio.Queue | None = None
    worker: asyncio.Task | None = None
    batch_rows: Histogram | None = None
    inputs_by_name: dict[str, ModelInput] = field(default_factory=dict)
    active: int = 0  # requests waiting for a batched result

    def __post_init__(self) -> None:
        inputs = self.scorer.inputs
        self.inputs_by_name = {i.name: i for i in inputs}
        self.scalar_inputs = not any(i.is_image or i.is_sequence for i in inputs)  # /v1 can use JsonRows
        self.json_direct = not any(i.is_image for i in inputs)  # /v1 values go straight to numpy
        self.names = tuple(i.name for i in inputs)
        self.json_types = tuple(_JSON_KINDS[i.dtype][0] for i in inputs)
        self.int_positions = [k for k, i in enumerate(inputs) if i.dtype == "int64"]
        self.float_positions = [k for k, i in enumerate(inputs) if i.dtype == "float32"]

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.scorer.session.run(self.scorer.tasks, feeds)

    def merge(self, parts: list[Feeds]) -> dict[str, np.ndarray]:
        """The feeds of one or more requests as one set of arrays."""
        inputs = self.scorer.inputs
        if all(isinstance(p, JsonRows) for p in parts):
            return JsonRows([row for p in parts for row in p.rows]).arrays(inputs)
        arrays = [p.arrays(inputs) if isinstance(p, JsonRows) else p for p in parts]
        return arrays[0] if len(arrays) == 1 else {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0]}

    async def infer(self, feeds: Feeds, rows: int) -> list[np.ndarray]:
        """Scores per task for ``rows`` rows; merged with concurrent requests when batching is on."""
        loop = asyncio.get_running_loop()
        if self.options.max_batch_size <= 0 or rows >= self.options.max_batch_size:
            self.batch_rows.observe(rows)
            return await loop.run_in_executor(None, self._run, self.merge([feeds]))
        if self.worker is None:
            self.queue = asyncio.Queue()
            self.worker = loop.create_task(self._batch_loop())
        fut = loop.create_future()
        self.active += 1
        try:
            await self.queue.put(_Pending(feeds, rows, fut))
            return await fut
        finally:
            self.active -= 1

    async def _batch_loop(self) -> None:
        """Collect requests until ``max_batch_size`` rows or ``max_wait_ms`` after the first, then run
        them as one call; up to two calls run at once so decoding the next requests overlaps inference."""
        loop = asyncio.get_running_loop()
        running = asyncio.Semaphore(2)
        carry: _Pending | None = None
        while True:
            first = carry or await self.queue.get()
            carry = None
            batch, rows = [first], first.rows
            deadline = loop.time() + self.options.max_wait_ms / 1000
            while rows < self.options.max_batch_size:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or self.active <= len(batch):
                        break  # waited enough, or nobody else is waiting: do not add latency
                    try:
                        item = await asyncio.wait_for(self.queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                if rows + item.rows > self.options.max_batch_size:
                    carry = item  # starts the next batch
                    break
                batch.append(item)
                rows += item.rows
            await running.acquire()
            loop.create_task(self._run_batch(batch, rows, running))

    async def _run_batch(self, batch: list[_Pending], rows: int, running: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        try:
            feeds = self.merge([p.feeds for p in batch])
            self.batch_rows.observe(rows)
            outputs = await loop.run_in_executor(None, self._run, feeds)
        except Exception as exc:  # pragma: no cover - onnxruntime failure on valid input
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            running.release()
        start = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result([o[start:start + p.rows] for o in outputs])
            start += p.rows

    # ---- request decoding -----------------------------------------------------------------------
    def feeds_from_instances(self, body: Any) -> tuple[Feeds, int]:
        if not isinstance(body, dict) or "instances" not in body:
            raise ClientError(400, 'body must be a JSON object {"instances": [{column: value, ...}, ...]}')
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise ClientError(400, '"instances" must be a non-empty list of objects')
        expected = self.inputs_by_name.keys()
        for i, row in enumerate(instances):
            if not isinstance(row, dict):
                raise ClientError(400, f"instance {i} must be an object of column: value")
            if row.keys() == expected:
                continue
            unknown = set(row) - expected
            missing = expected - set(row)
            if unknown:
                raise ClientError(400, f"instance {i}: unknown feature(s) {sorted(unknown)}; the model takes {sorted(expected)}")
            if missing:
                raise ClientError(400, f"instance {i}: missing feature(s) {sorted(missing)} (send null for a missing value)")
        if self.scalar_inputs:
            return self.json_rows(instances), len(instances)
        if self.json_direct:
            # straight from the JSON values to numpy: 5x cheaper than going through Arrow for small requests
            return {inp.name: _json_column(inp, [row[inp.name] for row in instances]) for inp in self.scorer.inputs}, len(instances)
        try:
            table = pa.Table.from_pylist(instances)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise ClientError(400, f"instances have values of inconsistent or unsupported types: {exc}") from None
        for inp in self.scorer.inputs:  # an all-null column arrives typed null: give it the model's type
            if pa.types.is_null(table.schema.field(inp.name).type):
                typ = pa.binary() if inp.is_image else {"int64": pa.int64(), "string": pa.string(), "float32": pa.float32()}[inp.dtype]
                typ = pa.list_(typ) if inp.is_sequence else typ
                table = table.set_column(table.schema.get_field_index(inp.name), inp.name, pa.nulls(table.num_rows, typ))
        try:
            return to_feeds(table, self.scorer.inputs), table.num_rows
        except DataError as exc:
            raise ClientError(400, str(exc)) from None

    def json_rows(self, instances: list[dict]) -> JsonRows:
        """Scalar instances -> ``JsonRows``, with ``_json_value``'s checks; rows without nulls, of the
        right types and in range are checked with a few C-level passes instead of a loop over values."""
        inputs, names, types = self.scorer.inputs, self.names, self.json_types
        rows = []
        for instance in instances:
            row = [instance[n] for n in names]
            if not (all(map(isinstance, row, types)) and all(_INT64_MIN <= row[k] <= _INT64_MAX for k in self.int_positions)
                    and all(type(row[k]) is float for k in self.float_positions)):
                row = [_json_value(inp, v) for inp, v in zip(inputs, row)]
            rows.append(row)
        return JsonRows(rows)

    def feeds_from_v2(self, header: dict[str, Any], binary: bytes) -> tuple[dict[str, np.ndarray], int, dict[str, bool]]:
        """KServe v2 inputs (JSON data or Triton binary data) -> feeds; also which outputs want binary."""
        inputs = header.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise ClientError(400, '"inputs" must be a non-empty list of tensors')
        feeds: dict[str, np.ndarray] = {}
        offset = 0
        rows = None
        for t in inputs:
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise ClientError(400, "each input needs a name, shape, datatype and data")
            name = t["name"]
            if name not in self.inputs_by_name:
                raise ClientError(400, f"unknown input '{name}'; the model takes {sorted(self.inputs_by_name)}")
            shape, dtype = t.get("shape"), t.get("datatype")
            row_shape = list(self.inputs_by_name[name].shape)
            if row_shape:  # an image: float pixels [batch, C, H, W] in [0, 1]; a sequence: [batch, max_length]
                if not (isinstance(shape, list) and len(shape) == 1 + len(row_shape) and shape[1:] == row_shape
                        and isinstance(shape[0], int) and shape[0] >= 0):
                    raise ClientError(400, f"input '{name}': shape must be [batch, {', '.join(map(str, row_shape))}], got {shape}")
            elif not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape) and 1 <= len(shape) <= 2
                      and (len(shape) == 1 or shape[1] == 1)):
                raise ClientError(400, f"input '{name}': shape must be [batch] or [batch, 1], got {shape}")
            n = shape[0]
            per_row = int(np.prod(row_shape)) if row_shape else 1
            want = V2_TYPES[self.inputs_by_name[name].dtype]
            size = (t.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                    raise ClientError(400, f"input '{name}': binary_data_size {size} exceeds the body")
                chunk = binary[offset:offset + size]
                offset += size
                values = _decode_binary(name, dtype, chunk, n * per_row)
            else:
                data = t.get("data")
                if not isinstance(data, list):
                    raise ClientError(400, f"input '{name}': data must be a flat list")
                while data and isinstance(data[0], list):
                    data = [v for row in data for v in (row if isinstance(row, list) else [row])]
                if len(data) != n * per_row:
                    raise ClientError(400, f"input '{name}': shape {shape} needs {n * per_row} values, got {len(data)}")
                values = _decode_json(name, dtype, data)
            if row_shape:
                values = values.reshape(n, *row_shape)
            if want == "BYTES" and dtype != "BYTES" or want != "BYTES" and dtype == "BYTES":
                raise ClientError(400, f"input '{name}': datatype {dtype}, the model expects {want}")
            if want == "INT64":
                if values.dtype.kind not in "iu":
                    raise ClientError(400, f"input '{name}': datatype {dtype}, the model expects INT64")
                values = values.astype(np.int64)
            elif want == "FP32":
                values = values.astype(np.float32)
            if rows is not None and n != rows:
                raise ClientError(400, f"input '{name}' has {n} rows, other inputs have {rows}")
            rows = n
            feeds[name] = values
        missing = set(self.inputs_by_name) - set(feeds)
        if missing:
            raise ClientError(400, f"missing input(s) {sorted(missing)}")
        if not rows:
            raise ClientError(400, "inputs hold no rows")
        binary_default = bool((header.get("parameters") or {}).get("binary_data_output", False))
        wants: dict[str, bool] = {}
        requested = header.get("outputs")
        if requested:
            for o in requested:
                name = o.get("name") if isinstance(o, dict) else None
                if name not in self.scorer.tasks:
                    raise ClientError(400, f"unknown output '{name}'; the model has {self.scorer.tasks}")
                wants[name] = bool((o.get("parameters") or {}).get("binary_data", binary_default))
        else:
            wants = {t: binary_default for t in self.scorer.tasks}
        return feeds, rows, wants


_JSON_KINDS = {"int64": ((int,), "integers"), "string": ((str,), "strings"), "float32": ((int, float), "numbers")}
_NUMPY_DTYPE = {"int64": np.int64, "string": object, "float32": np.float32}
_NULL = {"int64": INT_NULL, "string": "", "float32": np.nan}  # to_feeds' null handling
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _json_value(inp: ModelInput, v: Any) -> Any:
    """One scalar JSON value, checked, with ``to_feeds``' null handling (ints: a value outside every
    vocabulary, strings: "", numbers: NaN); a value of the wrong type or out of range is a 400."""
    if v is None:
        return _NULL[inp.dtype]
    types, expected = _JSON_KINDS[inp.dtype]
    if not isinstance(v, types):
        raise ClientError(400, f"feature '{inp.name}': value {v!r} is a {type(v).__name__}; the model expects {expected}")
    if inp.dtype == "int64" and not _INT64_MIN <= v <= _INT64_MAX:
        raise ClientError(400, f"feature '{inp.name}': {v} does not fit in a 64-bit integer")
    if inp.dtype == "float32" and type(v) is not float:
        return float(v)  # an int (at most 64 bits: orjson parses larger ones as floats)
    return v


def _json_column(inp: ModelInput, values: list) -> np.ndarray:
    """One feature's JSON values -> the model input (``_json_value`` per value; sequences padded)."""
    if inp.is_sequence:
        return _json_sequence(inp, values)
    return np.array([_json_value(inp, v) for v in values], dtype=_NUMPY_DTYPE[inp.dtype])


def _json_sequence(inp: ModelInput, values: list) -> np.ndarray:
    """JSON lists (or null) -> ``[n, max_length]``: each row's last max_length items, padded, as ``to_feeds``."""
    types, expected = _JSON_KINDS[inp.dtype]
    length = inp.shape[0]
    is_int = inp.dtype == "int64"
    out = np.full((len(values), length), PAD_INT if is_int else PAD_STRING, dtype=np.int64 if is_int else object)
    null = INT_NULL if is_int else ""
    for i, row in enumerate(values):
        if row is None:
            continue
        if not isinstance(row, list):
            raise ClientError(400, f"feature '{inp.name}': value {row!r} is a {type(row).__name__}; the model expects a list of {expected}")
        items = row[-length:]
        for v in items:
            if v is not None and not isinstance(v, types):
                raise ClientError(400, f"feature '{inp.name}': item {v!r} is a {type(v).__name__}; the model expects a list of {expected}")
        try:
            out[i, :len(items)] = [null if v is None else v for v in items]
        except (OverflowError, ValueError) as exc:
            raise ClientError(400, f"feature '{inp.name}': {exc}") from None
    return out


def _decode_json(name: str, dtype: Any, data: list) -> np.ndarray:
    if dtype == "BYTES":
        if not all(isinstance(v, str) for v in data):
            raise ClientError(400, f"input '{name}': BYTES data must be strings")
        return np.array(data, dtype=object)
    if dtype not in NUMPY_OF:
        raise ClientError(400, f"input '{name}': unsupported datatype {dtype!r} (INT64, INT32, FP32, FP64, BYTES)")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data):
        raise ClientError(400, f"input '{name}': {dtype} data must be numbers")
    try:
        return np.array(data, dtype=NUMPY_OF[dtype])
    except (OverflowError, ValueError) as exc:
        raise ClientError(400, f"input '{name}': {exc}") from None


def _decode_binary(name: str, dtype: Any, chunk: bytes, n: int) -> np.ndarray:
    if dtype == "BYTES":
        out, pos = [], 0
        while pos < len(chunk):
            if pos + 4 > len(chunk):
                raise ClientError(400, f"input '{name}': truncated BYTES element")
            (length,) = struct.unpack_from("<I", chunk, pos)
            pos += 4
            out.append(chunk[pos:pos + length].decode("utf-8", errors="replace"))
            pos += length
        if len(out) != n:
            raise ClientError(400, f"input '{name}': {n} rows declared, {len(out)} BYTES elements sent")
        return np.array(out, dtype=object)
    if dtype not in NUMPY_OF:
        raise ClientError(400, f"input '{name}': unsupported datatype {dtype!r}")
    width = np.dtype(NUMPY_OF[dtype]).itemsize
    if len(chunk) != n * width:
        raise ClientError(400, f"input '{name}': {n} rows of {dtype} need {n * width} bytes, got {len(chunk)}")
    return np.frombuffer(chunk, dtype=NUMPY_OF[dtype])


def discover_models(target: str | Path) -> dict[str, Path]:
    path = Path(target)
    if path.is_file():
        return {path.stem: path}
    if path.is_dir():
        found = {p.stem: p for p in sorted(path.glob("*.onnx"))}
        found.update({p.parent.parent.name: p for p in sorted(path.glob("*/1/model.onnx"))})  # Triton layout
        if not found:
            raise DataError(f"{path} holds no .onnx models")
        return found
    raise DataError(f"no such model file or folder: {path}")


def create_app(target: str | Path, options: ServeOptions | None = None) -> ASGIApp:
    """The server's ASGI app: the inference routes answered directly, the others by a Starlette app."""
    options = options or ServeOptions()
    registry = CollectorRegistry()
    requests = Counter("recmtl_requests", "HTTP requests", ["route", "status"], registry=registry)
    latency = Histogram("recmtl_request_seconds", "Request latency", ["route"], registry=registry,
                        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
    batch_rows = Histogram("recmtl_batch_rows", "Rows per onnxruntime call", ["model"], registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))
    models: dict[str, ServedModel] = {}
    for name, path in discover_models(target).items():
        m = ServedModel(name, path, Scorer(path, options.threads), options)
        m.batch_rows = batch_rows.labels(name)
        models[name] = m

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def model_of(request: Request) -> ServedModel:
        return model_named(request.path_params["name"])

    def model_named(name: str) -> ServedModel:
        if name not in models:
            raise ClientError(404, f"unknown model '{name}'; served: {sorted(models)}")
        return models[name]

    async def read_body(headers: dict[bytes, bytes], receive: Receive) -> bytes | None:
        """The request body from ASGI messages; None when the client went away."""
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > options.max_body_bytes:
            raise ClientError(413, f"body of {declared.decode()} bytes exceeds the limit of {options.max_body_bytes}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > options.max_body_bytes:
                raise ClientError(413, f"body exceeds the limit of {options.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def recorder(route: str) -> Callable[[int, float], None]:
        """``record(status, start)`` for one route: its request count by status and its latency."""
        seconds = latency.labels(route)
        counts: dict[int, Any] = {}  # status -> counter child, looked up once

        def record(status: int, start: float) -> None:
            if status not in counts:
                counts[status] = requests.labels(route, str(status))
            counts[status].inc()
            seconds.observe(time.perf_counter() - start)
        return record

    def endpoint(route: str):
        record = recorder(route)

        def wrap(fn):
            async def handler(request: Request) -> Response:
                start = time.perf_counter()
                try:
                    response = await fn(request)
                except ClientError as exc:
                    response = error(exc.status, str(exc))
                except RecmtlError as exc:
                    response = error(400, str(exc))
                record(response.status_code, start)
                return response
            return handler
        return wrap

    @endpoint("live")
    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    @endpoint("ready")
    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": True})

    @endpoint("server")
    async def server_meta(request: Request) -> Response:
        return JSONResponse({"name": "recmtl", "version": recmtl.__version__, "extensions": ["binary_tensor_data"]})

    @endpoint("model")
    async def model_meta(request: Request) -> Response:
        m = model_of(request)
        return JSONResponse({
            "name": m.name, "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [{"name": i.name, "datatype": V2_TYPES[i.dtype], "shape": [-1, *i.shape]} for i in m.scorer.inputs],
            "outputs": [{"name": t, "datatype": "FP32", "shape": [-1, m.scorer.widths[t]] if m.scorer.widths[t] else [-1]}
                        for t in m.scorer.tasks],
        })

    @endpoint("model_ready")
    async def model_ready(request: Request) -> Response:
        m = model_of(request)
        return JSONResponse({"name": m.name, "ready": True})

    # ---- the inference routes: (model, body, headers) -> (content, content type, extra headers) -----------------
    async def infer(m: ServedModel, body: bytes, headers: dict[bytes, bytes]) -> tuple[bytes, bytes, list]:
        header_len = headers.get(HEADER_LENGTH.lower().encode())
        try:
            if header_len is not None:
                if not header_len.isdigit() or int(header_len) > len(body):
                    raise ClientError(400, f"{HEADER_LENGTH} {header_len.decode('latin-1')!r} does not fit the body")
                header, binary = orjson.loads(body[:int(header_len)]), body[int(header_len):]
            else:
                header, binary = orjson.loads(body), b""
        except orjson.JSONDecodeError as exc:
            raise ClientError(400, f"malformed JSON: {exc}") from None
        if not isinstance(header, dict):
            raise ClientError(400, "the request must be a JSON object with 'inputs'")
        feeds, rows, wants = m.feeds_from_v2(header, binary)
        outputs = dict(zip(m.scorer.tasks, await m.infer(feeds, rows)))
        out_json, blobs = [], []
        for name, binary_out in wants.items():
            values = outputs[name].reshape(-1).astype(np.float32)
            width = m.scorer.widths[name]
            entry: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": [rows, width] if width else [rows]}
            if binary_out:
                raw = values.tobytes()
                entry["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            else:
                entry["data"] = values.tolist()
            out_json.append(entry)
        result: dict[str, Any] = {"model_name": m.name, "model_version": "1", "outputs": out_json}
        if "id" in header:
            result["id"] = header["id"]
        if not blobs:
            return orjson.dumps(result), JSON_TYPE, []
        head = orjson.dumps(result)
        return head + b"".join(blobs), b"application/octet-stream", [(HEADER_LENGTH.encode(), str(len(head)).encode())]

    async def predict(m: ServedModel, body: bytes, headers: dict[bytes, bytes]) -> tuple[bytes, bytes, list]:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ClientError(400, f"malformed JSON: {exc}") from None
        feeds, rows = m.feeds_from_instances(payload)
        outputs = await m.infer(feeds, rows)
        # one number per task and row, or a list of K class/attribute probabilities
        columns = [(o.reshape(rows, -1) if m.scorer.widths[t] else o.reshape(-1)).tolist()  # float32 -> float exactly
                   for t, o in zip(m.scorer.tasks, outputs)]
        return orjson.dumps({"model_name": m.name, "predictions": [dict(zip(m.scorer.tasks, row)) for row in zip(*columns)]}), JSON_TYPE, []

    inference = {"predict": (predict, recorder("predict")), "infer": (infer, recorder("infer"))}

    async def answer(route: str, name: str, scope: Scope, receive: Receive, send: Send) -> None:
        """An inference route straight from and to ASGI messages (no Request/Response objects, no routing or
        middleware: about a quarter of the event loop's time per 1-row request went there)."""
        start = time.perf_counter()
        handle, record = inference[route]
        try:
            if scope["method"] != "POST":
                raise ClientError(405, f"method {scope['method']} not allowed on {scope['path']}")
            m = model_named(name)
            headers = dict(scope["headers"])
            body = await read_body(headers, receive)
            if body is None:
                return
            content, content_type, extra = await handle(m, body, headers)
            status = 200
        except ClientError as exc:
            status, content, content_type = exc.status, orjson.dumps({"error": str(exc)}), JSON_TYPE
            extra = [(b"allow", b"POST")] if status == 405 else []
        except RecmtlError as exc:
            status, content, content_type, extra = 400, orjson.dumps({"error": str(exc)}), JSON_TYPE, []
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(content)).encode()), (b"content-type", content_type), *extra]})
        await send({"type": "http.response.body", "body": content})
        record(status, start)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request: Request, exc: Exception) -> Response:
        return error(404, f"no route {request.method} {request.url.path}")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return error(405, f"method {request.method} not allowed on {request.url.path}")

    routes = [  # the inference routes are answered before Starlette: see `app` below
        Route("/v2/health/live", live), Route("/v2/health/ready", ready), Route("/v2", server_meta),
        Route("/v2/models/{name}", model_meta), Route("/v2/models/{name}/versions/1", model_meta),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/metrics", metrics),
    ]
    rest = Starlette(routes=routes, exception_handlers={404: not_found, 405: method_not_allowed})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = inference_route(scope["path"])
            if route is not None:
                await answer(*route, scope, receive, send)
                return
        await rest(scope, receive, send)
    return app


def inference_route(path: str) -> tuple[str, str] | None:
    """``("predict" | "infer", model name)`` for ``/v1/models/{name}/predict``, ``/v2/models/{name}/infer`` and
    ``/v2/models/{name}/versions/1/infer``; None for any other path."""
    parts = path.split("/")
    if len(parts) == 5 and parts[1] == "v1" and parts[2] == "models" and parts[4] == "predict" and parts[3]:
        return "predict", parts[3]
    if len(parts) in (5, 7) and parts[1] == "v2" and parts[2] == "models" and parts[3] and parts[-1] == "infer" \
            and (len(parts) == 5 or parts[4:6] == ["versions", "1"]):
        return "infer", parts[3]
    return None


def app_from_env() -> ASGIApp:
    """Factory for ``uvicorn --factory`` with several workers: settings come from RECMTL_SERVE_* variables."""
    options = ServeOptions(
        max_batch_size=int(os.environ.get("RECMTL_SERVE_MAX_BATCH", "256")),
        max_wait_ms=float(os.environ.get("RECMTL_SERVE_MAX_WAIT_MS", "2")),
        max_body_bytes=int(os.environ.get("RECMTL_SERVE_MAX_BODY", str(16 << 20))),
        threads=int(os.environ["RECMTL_SERVE_THREADS"]) if os.environ.get("RECMTL_SERVE_THREADS") else None,
    )
    return create_app(os.environ["RECMTL_SERVE_TARGET"], options)


def serve(target: str | Path, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          options: ServeOptions | None = None, log_level: str = "warning") -> None:
    import uvicorn
    options = options or ServeOptions()
    discover_models(target)  # fail early with a clear message
    os.environ.update({
        "RECMTL_SERVE_TARGET": str(Path(target).resolve()), "RECMTL_SERVE_MAX_BATCH": str(options.max_batch_size),
        "RECMTL_SERVE_MAX_WAIT_MS": str(options.max_wait_ms), "RECMTL_SERVE_MAX_BODY": str(options.max_body_bytes),
        "RECMTL_SERVE_THREADS": str(options.threads or ""),
    })
    access_log = log_level in ("trace", "debug", "info")
    uvicorn.run("recmtl.serving.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, timeout_graceful_shutdown=30,
                # formatting access lines costs per request; the client address (proxy headers) is only for them
                access_log=access_log, proxy_headers=access_log)
