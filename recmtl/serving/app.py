"""``recmtl serve``: exported ONNX models over HTTP (Starlette + uvicorn).

* Open Inference Protocol (KServe v2, as spoken by Triton): health, model metadata/readiness, and
  ``POST /v2/models/{name}/infer`` with JSON tensors or Triton's binary-data extension.
* ``POST /v1/models/{name}/predict`` with ``{"instances": [{column: value, ...}]}`` (raw values, nulls allowed).
* ``GET /metrics``: Prometheus text (requests by route and status, latency, batch sizes).
* Dynamic micro-batching: concurrent requests to a model are merged into one onnxruntime call.
* Anything a client sends wrong is a 4xx with ``{"error": ...}``; bodies over the limit are a 413.

Request decoding lives in ``recmtl.serving.decoders``, micro-batching in ``recmtl.serving.batcher``.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
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
from recmtl.errors import RecmtlError
from recmtl.serving.batcher import MicroBatcher
from recmtl.serving.decoders import ClientError, RequestDecoder, merge_feeds
from recmtl.serving.score import Scorer
from recmtl.serving.triton import discover_models

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = b"application/json"


class JSONResponse(_StarletteJSON):
    """Starlette's JSON response, encoded by orjson (several times faster on the request path)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


@dataclass
class ServeOptions:
    max_batch_size: int = 256  # rows per onnxruntime call; 0 disables micro-batching
    max_wait_ms: float = 2.0
    max_body_bytes: int = 16 << 20
    threads: int | None = None


@dataclass
class ServedModel:
    """One model behind the server: its onnxruntime session, request decoder and micro-batcher."""

    name: str
    path: Path
    scorer: Scorer
    options: ServeOptions
    batch_rows: Histogram | None = None
    decoder: RequestDecoder = field(init=False)
    batcher: MicroBatcher = field(init=False)

    def __post_init__(self) -> None:
        self.decoder = RequestDecoder(self.scorer.inputs, self.scorer.tasks)
        inputs, session, tasks = self.scorer.inputs, self.scorer.session, self.scorer.tasks
        self.batcher = MicroBatcher(lambda feeds: session.run(tasks, feeds), lambda parts: merge_feeds(parts, inputs),
                                    self.options.max_batch_size, self.options.max_wait_ms, self._observe)

    def _observe(self, rows: int) -> None:
        if self.batch_rows is not None:
            self.batch_rows.observe(rows)


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
            "inputs": [{"name": i.name, "datatype": i.wire.v2, "shape": [-1, *i.shape]} for i in m.scorer.inputs],
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
        feeds, rows, wants = m.decoder.from_v2(header, binary)
        outputs = dict(zip(m.scorer.tasks, await m.batcher.infer(feeds, rows)))
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
        feeds, rows = m.decoder.from_instances(payload)
        outputs = await m.batcher.infer(feeds, rows)
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
