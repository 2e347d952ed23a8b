"""Probe `recmtl serve` as a hostile or careless client would (issue 15): fuzzed requests, load beside slow
clients, oversized request heads, memory after large requests. Loopback only; every loop bounded in count
and time. Prints one JSON object.

    python benchmarks/speed/probe_serve.py MODEL.onnx DATA.parquet [--fuzz 3000] [--seconds 8] [--slow 50]
        [--clients 64] [--large-mb 14] [--serve-flag=--max-body-mb=16 ...]

* fuzz: valid /v1 and v2 requests with 1-3 values replaced by random JSON (any depth), random bodies, random
  Inference-Header-Content-Length splits; the status codes counted, and the server's log lines.
* load: ``--clients`` keep-alive connections sending 1-row /v1 requests for ``--seconds`` while ``--slow``
  slowloris sockets (half send a head a byte at a time, half a body) are open; then how many of those are
  still open 15 s after they started, and how long SIGTERM takes.
* heads: 8 connections each sending an unfinished 32 MiB header; the server's RSS growth.
* memory: RSS before, after one /v1 request of about ``--large-mb`` MiB, after 4 such at once (3 bursts).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures as cf
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq

RECMTL = str(Path(sys.executable).with_name("recmtl"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


class Server:
    def __init__(self, model: str, flags: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(f"/tmp/probe_serve_{self.port}.log")
        self.proc = subprocess.Popen([RECMTL, "serve", model, "--port", str(self.port), *flags],
                                     stdout=subprocess.DEVNULL, stderr=self.log.open("wb"))
        for _ in range(300):
            try:
                if httpx.get(self.url + "/v2/health/live", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def stop(self) -> float:
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return round(time.monotonic() - start, 2)


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 6:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        keys = ["name", "shape", "datatype", "data", "parameters", "binary_data_size", "a"]
        return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [None, True, rng.randint(-2**70, 2**70), rng.uniform(-1e40, 1e40), rng.choice(["", "x", "INT64", "false", "1"]),
            rng.random(), None, None, rng.choice([[1], [True], [2.0], [[1, 2]]])][kind]


def mutate(rng: random.Random, base):
    body = json.loads(json.dumps(base))
    for _ in range(rng.randint(1, 3)):
        node, parent, key = body, None, None
        for _ in range(rng.randrange(1, 5)):
            if isinstance(node, dict) and node:
                parent, key = node, rng.choice(list(node))
            elif isinstance(node, list) and node:
                parent, key = node, rng.randrange(len(node))
            else:
                break
            node = parent[key]
        if parent is not None:
            parent[key] = random_json(rng)
    if rng.random() < 0.3:
        body[rng.choice(["inputs", "outputs", "parameters", "id", "instances"])] = random_json(rng)
    return body


def fuzz(srv: Server, v1: dict, v2: dict, n: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    codes: collections.Counter = collections.Counter()
    non_json = 0
    log_before = srv.log.stat().st_size
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        for i in range(n):
            route, base = (("/v2/models/model/infer", v2), ("/v1/models/model/predict", v1))[i % 2]
            body = mutate(rng, base) if rng.random() < 0.85 else random_json(rng)
            raw = json.dumps(body).encode()
            headers = {}
            if route.startswith("/v2") and rng.random() < 0.2:
                headers["Inference-Header-Content-Length"] = str(rng.randint(0, len(raw) + 4))
                raw += rng.randbytes(rng.randrange(24))
            try:
                r = client.post(route, content=raw, headers=headers)
            except httpx.HTTPError:
                codes["no answer"] += 1
                continue
            codes[r.status_code] += 1
            non_json += not r.headers.get("content-type", "").startswith("application/json")
    return {"requests": n, "status": dict(sorted(codes.items(), key=str)), "non_json_answers": non_json,
            "log_bytes": srv.log.stat().st_size - log_before}


def slowloris(port: int, n: int, stop: threading.Event, opened: list) -> None:
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if i % 2:
            s.sendall(b"POST /v1/models/model/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        else:
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    opened.extend(socks)
    while not stop.is_set():
        for s in socks:
            try:
                s.sendall(b"X")
            except OSError:
                pass
        stop.wait(1.0)


def still_open(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the server has not closed (whatever it answered before)."""
    alive = 0
    for s in socks:
        s.setblocking(False)
        try:
            while s.recv(65536):
                pass
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive


async def load(url: str, clients: int, seconds: float, request: bytes) -> dict:
    host, port = url.split("//")[1].split(":")
    latencies: list[float] = []
    codes: collections.Counter = collections.Counter()
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                codes[int(head.split(b" ")[1])] += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            codes["closed"] += 1
        finally:
            writer.close()
    await asyncio.gather(*[client() for _ in range(clients)])
    latencies.sort()
    return {"requests_per_s": round(len(latencies) / seconds), "p50_ms": round(1000 * statistics.median(latencies), 2),
            "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2), "status": dict(codes)}


def oversized_heads(srv: Server, n: int = 8, mb: int = 32) -> dict:
    before = rss_mb(srv.proc.pid)
    answers: collections.Counter = collections.Counter()
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.settimeout(5)
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(mb * 16):
                s.sendall(b"a" * 65536)
        except OSError:
            pass
        socks.append(s)
    time.sleep(1)
    peak = rss_mb(srv.proc.pid)
    for s in socks:
        try:
            answers[s.recv(12).decode(errors="replace") or "closed"] += 1
        except OSError:
            answers["no answer"] += 1
        s.close()
    return {"rss_before_mb": before, "rss_with_heads_mb": peak, "growth_mb": round(peak - before, 1), "answers": dict(answers)}


def memory(srv: Server, rows: list[dict], mb: float) -> dict:
    one = len(json.dumps(rows[0])) + 2
    body = json.dumps({"instances": (rows * (int(mb * (1 << 20) / one) // len(rows) + 1))[:int(mb * (1 << 20) / one)]}).encode()
    out = {"body_mib": round(len(body) / (1 << 20), 2), "rss_baseline_mb": rss_mb(srv.proc.pid)}
    post = lambda _: httpx.post(srv.url + "/v1/models/model/predict", content=body, timeout=300).status_code  # noqa: E731
    out["one_request_status"] = post(0)
    out["rss_after_one_mb"] = rss_mb(srv.proc.pid)
    for burst in range(3):
        with cf.ThreadPoolExecutor(4) as pool:
            out[f"burst{burst + 1}_status"] = list(pool.map(post, range(4)))
        out[f"rss_after_burst{burst + 1}_mb"] = rss_mb(srv.proc.pid)
    time.sleep(2)
    out["rss_2s_later_mb"] = rss_mb(srv.proc.pid)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--fuzz", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--slow", type=int, default=50)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--large-mb", type=float, default=14)
    ap.add_argument("--serve-flag", action="append", default=[], help="passed to recmtl serve (e.g. --serve-flag=--max-body-mb=16)")
    args = ap.parse_args()
    flags = [part for f in args.serve_flag for part in f.split("=", 1)]
    table = pq.read_table(args.data)
    cols = [c for c in table.column_names if c not in ("click", "conversion", "row_id")]
    rows = table.select(cols).slice(0, 2000).to_pylist()
    result: dict = {}

    srv = Server(args.model, flags)
    meta = httpx.get(srv.url + "/v2/models/model").json()
    zero = {"INT64": 0, "FP32": 0.5, "BYTES": "a"}
    v2 = {"inputs": [{"name": i["name"], "shape": [2], "datatype": i["datatype"], "data": [zero[i["datatype"]]] * 2}
                     for i in meta["inputs"]]}
    v1 = {"instances": rows[:2]}
    result["fuzz"] = fuzz(srv, v1, v2, args.fuzz)
    result["heads"] = oversized_heads(srv)
    result["shutdown_s_after_heads"] = srv.stop()

    srv = Server(args.model, flags)
    stop, opened = threading.Event(), []
    started = time.monotonic()
    slow = threading.Thread(target=slowloris, args=(srv.port, args.slow, stop, opened), daemon=True)
    slow.start()
    one = json.dumps({"instances": rows[:1]}).encode()
    request = (b"POST /v1/models/model/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               + f"Content-Length: {len(one)}\r\n\r\n".encode() + one)
    result["load_with_slow_clients"] = asyncio.run(load(srv.url, args.clients, args.seconds, request))
    time.sleep(max(0.0, 15 - (time.monotonic() - started)))
    result["slow_sockets_open_after_15s"] = f"{still_open(opened)} of {len(opened)}"
    result["shutdown_s_with_slow_clients"] = srv.stop()
    stop.set()
    for s in opened:
        s.close()

    srv = Server(args.model, flags)
    result["memory"] = memory(srv, rows, args.large_mb)
    result["shutdown_s"] = srv.stop()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
