"""``recmtl serve``: exported ONNX models over HTTP (Starlette + uvicorn).

* Open Inference Protocol (KServe v2, as spoken by Triton): health, model metadata/readiness, and
  ``POST /v2/models/{name}/infer`` with JSON tensors or Triton's binary-data extension.
* ``POST /v1/models/{name}/predict`` with ``{"instances": [{column: value, ...}]}`` (raw values, nulls allowed).
* ``GET /metrics``: Prometheus text (requests by route and status, latency, batch sizes).
* Dynamic micro-batching: concurrent requests to a model are merged into one onnxruntime call; a large
  request runs in calls of ``max_batch_size`` rows.
* Anything a client sends wrong is a 4xx with ``{"error": ...}`` (413 over the body or row limit, 408 for a body
  slower than ``read_timeout_s``); a request that comes while ``max_concurrency`` requests are being answered,
  or whose body would make more than ``max_inflight_bytes`` of bodies in flight, gets a 503 with ``Retry-After``
  (a request alone is always admitted); an unexpected server error is a JSON 500, its traceback logged once per
  kind.
* A model that fails to load is left out (its routes answer 503 with the reason); the others are served.
* Request heads (size, time) and the number of connections are bounded by ``recmtl.serving.protocol``.

Request decoding lives in ``recmtl.serving.decoders``, micro-batching in ``recmtl.serving.batcher``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
from recmtl.errors import DataError, RecmtlError
from recmtl.serving.batcher import MicroBatcher
from recmtl.serving.decoders import ClientError, RequestDecoder, merge_feeds
from recmtl.serving.score import Scorer
from recmtl.serving.triton import discover_models

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = b"application/json"
CLOSE = (b"connection", b"close")
OFF_LOOP_BYTES = 256 << 10  # bodies from this size are decoded and answered in a thread
log = logging.getLogger("uvicorn.error")


class JSONResponse(_StarletteJSON):
    """Starlette's JSON response, encoded by orjson (several times faster on the request path)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


@dataclass
class ServeOptions:
    """What ``recmtl serve`` takes; the limits bound what one client can make the server hold."""

    max_batch_size: int = 256  # rows per onnxruntime call; 0 disables micro-batching
    max_wait_ms: float = 2.0
    max_body_bytes: int = 16 << 20
    threads: int | None = None
    max_request_rows: int = 65_536  # rows in one request; more is a 413
    max_concurrency: int = 64  # inference requests in flight per worker; more get a 503 with Retry-After
    max_inflight_bytes: int = 64 << 20  # their bodies' size (Content-Length) in all; more get a 503 too
    read_timeout_s: float = 10.0  # for a request's head, and then for its body
    max_header_bytes: int = 64 << 10  # a larger request head is a 431
    max_connections: int = 1024  # open connections per worker; requests on more get a 503
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this

    #: the environment variables ``app_from_env`` (in every worker process) reads the options from
    ENV = {"max_batch_size": "RECMTL_SERVE_MAX_BATCH", "max_wait_ms": "RECMTL_SERVE_MAX_WAIT_MS",
           "max_body_bytes": "RECMTL_SERVE_MAX_BODY", "threads": "RECMTL_SERVE_THREADS",
           "max_request_rows": "RECMTL_SERVE_MAX_ROWS", "max_concurrency": "RECMTL_SERVE_MAX_CONCURRENCY",
           "max_inflight_bytes": "RECMTL_SERVE_MAX_INFLIGHT",
           "read_timeout_s": "RECMTL_SERVE_READ_TIMEOUT", "max_header_bytes": "RECMTL_SERVE_MAX_HEADER",
           "max_connections": "RECMTL_SERVE_MAX_CONNECTIONS", "keep_alive_s": "RECMTL_SERVE_KEEP_ALIVE"}

    def to_env(self) -> dict[str, str]:
        return {var: "" if getattr(self, key) is None else str(getattr(self, key)) for key, var in self.ENV.items()}

    @classmethod
    def from_env(cls) -> ServeOptions:
        defaults, values = cls(), {}
        for key, var in cls.ENV.items():
            raw, default = os.environ.get(var, ""), getattr(defaults, key)
            if raw:
                values[key] = float(raw) if isinstance(default, float) else int(raw)
        return cls(**values)


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
        self.decoder = RequestDecoder(self.scorer.inputs, self.scorer.tasks, self.options.max_request_rows)
        inputs, session, tasks = self.scorer.inputs, self.scorer.session, self.scorer.tasks
        shrink = self.scorer.shrink_arena_options()

        def run(feeds: dict[str, np.ndarray], last_of_large: bool = False) -> list[np.ndarray]:
            return session.run(tasks, feeds, shrink if last_of_large else None)
        self.batcher = MicroBatcher(run, lambda parts: merge_feeds(parts, inputs),
                                    self.options.max_batch_size, self.options.max_wait_ms, self._observe)

    def _observe(self, rows: int) -> None:
        if self.batch_rows is not None:
            self.batch_rows.observe(rows)


def load_models(target: str | Path, options: ServeOptions) -> tuple[dict[str, ServedModel], dict[str, str]]:
    """The models of ``target`` (``discover_models``) with their sessions, and the reason of each that could
    not be loaded (name -> message, logged once); a DataError when there is none to serve."""
    models: dict[str, ServedModel] = {}
    paths, failed = discover_models(target)
    for name, reason in failed.items():
        log.warning("model '%s' not served: %s", name, reason)
    for name, path in paths.items():
        try:
            models[name] = ServedModel(name, path, Scorer(path, options.threads), options)
        except Exception as exc:  # a damaged, foreign or unreadable file: the other models are still served
            failed[name] = str(exc) if isinstance(exc, RecmtlError) else f"{path}: {type(exc).__name__}: {exc}"
            log.warning("model '%s' not served: %s", name, failed[name])
    if not models:
        raise DataError(f"no model in {target} could be loaded: " + "; ".join(f"'{k}': {v}" for k, v in failed.items()))
    return models, failed


class ErrorLog:
    """Logs an unexpected exception's traceback once per kind (type and the place it was raised), so that a
    request which keeps failing cannot flood the log; at most ``limit`` kinds are told."""

    def __init__(self, limit: int = 100) -> None:
        self.seen: set[tuple[str, str, int]] = set()
        self.limit = limit

    def __call__(self, route: str, exc: BaseException) -> None:
        frames = traceback.extract_tb(exc.__traceback__)
        where = (frames[-1].filename, frames[-1].lineno or 0) if frames else ("", 0)
        kind = (type(exc).__name__, *where)
        if kind in self.seen or len(self.seen) > self.limit:
            return
        self.seen.add(kind)
        if len(self.seen) > self.limit:
            log.error("more than %d kinds of internal errors: no more are logged", self.limit)
            return
        log.error("internal error on route %s (%s; logged once, later ones are counted in /metrics as status 500)",
                  route, type(exc).__name__, exc_info=exc)


def create_app(target: str | Path, options: ServeOptions | None = None) -> ASGIApp:
    """The server's ASGI app: the inference routes answered directly, the others by a Starlette app."""
    options = options or ServeOptions()
    registry = CollectorRegistry()
    requests = Counter("recmtl_requests", "HTTP requests", ["route", "status"], registry=registry)
    latency = Histogram("recmtl_request_seconds", "Request latency", ["route"], registry=registry,
                        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
    batch_rows = Histogram("recmtl_batch_rows", "Rows per onnxruntime call", ["model"], registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))
    models, failed = load_models(target, options)
    for name, m in models.items():
        m.batch_rows = batch_rows.labels(name)
    log_internal = ErrorLog()
    inflight, inflight_bytes = 0, 0  # inference requests decoded, queued or run; the bodies of those and those being read

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def model_of(request: Request) -> ServedModel:
        return model_named(request.path_params["name"])

    def model_named(name: str) -> ServedModel:
        if name not in models:
            if name in failed:
                raise ClientError(503, f"model '{name}' is not served: it failed to load ({failed[name]})")
            raise ClientError(404, f"unknown model '{name}'; served: {sorted(models)}")
        return models[name]

    async def read_body(headers: dict[bytes, bytes], receive: Receive) -> bytes | None:
        """The request body from ASGI messages, within ``read_timeout_s``; None when the client went away."""
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > options.max_body_bytes:
            raise ClientError(413, f"body of {declared.decode()} bytes exceeds the limit of {options.max_body_bytes} "
                                   "(recmtl serve --max-body-mb)")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(options.read_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > options.max_body_bytes:
                        raise ClientError(413, f"body exceeds the limit of {options.max_body_bytes} bytes (recmtl serve --max-body-mb)")
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except TimeoutError:
            raise ClientError(408, f"the request body did not arrive within {options.read_timeout_s:g} s "
                                   f"({size} bytes received; recmtl serve --read-timeout)") from None

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
                except Exception as exc:
                    log_internal(route, exc)
                    response = error(500, f"internal server error ({type(exc).__name__})")
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
    # decoding and encoding are CPU work in proportion to the body: for a large one they run in a thread, so
    # the event loop goes on reading other requests meanwhile
    # in one thread of their own: each thread that allocates gets a malloc arena that keeps its peak
    decoding = ThreadPoolExecutor(1, thread_name_prefix="recmtl-decode")

    async def off_loop(size: int, fn: Callable[..., Any], *args: Any) -> Any:
        if size < OFF_LOOP_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(decoding, fn, *args)

    def decode_v2(m: ServedModel, body: bytes, headers: dict[bytes, bytes]) -> tuple[dict, dict, int, dict]:
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
        return header, feeds, rows, wants

    def encode_v2(m: ServedModel, header: dict, scores: list[np.ndarray], rows: int, wants: dict[str, bool]) -> tuple[bytes, bytes, list]:
        outputs = dict(zip(m.scorer.tasks, scores))
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

    async def infer(m: ServedModel, body: bytes, headers: dict[bytes, bytes]) -> tuple[bytes, bytes, list]:
        header, feeds, rows, wants = await off_loop(len(body), decode_v2, m, body, headers)
        scores = await m.batcher.infer(feeds, rows)
        return await off_loop(len(body), encode_v2, m, header, scores, rows, wants)

    def decode_v1(m: ServedModel, body: bytes) -> tuple[Any, int]:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ClientError(400, f"malformed JSON: {exc}") from None
        return m.decoder.from_instances(payload)

    def encode_v1(m: ServedModel, outputs: list[np.ndarray], rows: int) -> tuple[bytes, bytes, list]:
        # one number per task and row, or a list of K class/attribute probabilities
        columns = [(o.reshape(rows, -1) if m.scorer.widths[t] else o.reshape(-1)).tolist()  # float32 -> float exactly
                   for t, o in zip(m.scorer.tasks, outputs)]
        return orjson.dumps({"model_name": m.name, "predictions": [dict(zip(m.scorer.tasks, row)) for row in zip(*columns)]}), JSON_TYPE, []

    async def predict(m: ServedModel, body: bytes, headers: dict[bytes, bytes]) -> tuple[bytes, bytes, list]:
        feeds, rows = await off_loop(len(body), decode_v1, m, body)
        outputs = await m.batcher.infer(feeds, rows)
        return await off_loop(len(body), encode_v1, m, outputs, rows)

    inference = {"predict": (predict, recorder("predict")), "infer": (infer, recorder("infer"))}

    async def answer(route: str, name: str, scope: Scope, receive: Receive, send: Send) -> None:
        """An inference route straight from and to ASGI messages (no Request/Response objects, no routing or
        middleware: about a quarter of the event loop's time per 1-row request went there)."""
        nonlocal inflight, inflight_bytes
        start = time.perf_counter()
        handle, record = inference[route]
        counted = reserved = False
        size = 0
        try:
            if scope["method"] != "POST":
                raise ClientError(405, f"method {scope['method']} not allowed on {scope['path']}")
            m = model_named(name)
            headers = dict(scope["headers"])
            declared = headers.get(b"content-length", b"")
            size = min(int(declared), options.max_body_bytes) if declared.isdigit() else options.max_body_bytes
            # answered before the body is read, so cheap under overload; a request alone is always admitted. A
            # request counts in max_concurrency once its body is in (a slow client cannot hold a slot by sending
            # slowly), and its declared body size in max_inflight_bytes from now on (memory stays bounded)
            if inflight >= options.max_concurrency or (inflight_bytes and inflight_bytes + size > options.max_inflight_bytes):
                raise ClientError(503, f"server busy: {inflight} requests being answered, {inflight_bytes / (1 << 20):.1f} MiB "
                                       f"of bodies in flight (recmtl serve --max-concurrency {options.max_concurrency}, "
                                       f"--max-inflight-mb {options.max_inflight_bytes / (1 << 20):g}); retry shortly")
            inflight_bytes += size
            reserved = True
            body = await read_body(headers, receive)
            if body is None:
                return
            inflight += 1
            counted = True
            content, content_type, extra = await handle(m, body, headers)
            status = 200
        except ClientError as exc:
            status, content, content_type = exc.status, orjson.dumps({"error": str(exc)}), JSON_TYPE
            extra = {405: [(b"allow", b"POST")], 503: [(b"retry-after", b"1")], 408: [CLOSE], 413: [CLOSE]}.get(status, [])
        except RecmtlError as exc:
            status, content, content_type, extra = 400, orjson.dumps({"error": str(exc)}), JSON_TYPE, []
        except Exception as exc:
            log_internal(route, exc)
            status, content, content_type, extra = 500, orjson.dumps({"error": f"internal server error ({type(exc).__name__})"}), \
                JSON_TYPE, []
        finally:
            inflight -= counted
            if reserved:
                inflight_bytes -= size
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
    return create_app(os.environ["RECMTL_SERVE_TARGET"], ServeOptions.from_env())


def serve(target: str | Path, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          options: ServeOptions | None = None, log_level: str = "warning") -> None:
    import uvicorn
    options = options or ServeOptions()
    discover_models(target)  # fail early with a clear message
    os.environ.update({"RECMTL_SERVE_TARGET": str(Path(target).resolve()), **options.to_env()})
    access_log = log_level in ("trace", "debug", "info")
    uvicorn.run("recmtl.serving.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, timeout_graceful_shutdown=30,
                http="recmtl.serving.protocol:GuardedProtocol",  # bounded request heads (recmtl/serving/protocol.py)
                ws="none", timeout_keep_alive=options.keep_alive_s,
                # formatting access lines costs per request; the client address (proxy headers) is only for them
                access_log=access_log, proxy_headers=access_log)
