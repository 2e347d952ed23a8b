"""Load test of `recmtl serve` on loopback: 1-row requests at concurrency 1, 16, 64 (p50/p99 latency,
requests/s), 256-row requests (rows/s), with micro-batching on and off, in alternating rounds (medians). Bounded
in time and requests.

    python benchmarks/speed/bench_serve.py MODEL.onnx DATA.parquet [--seconds 8] [--max-requests 200000] [--rounds 3]

The load generator (one process, bare asyncio HTTP/1.1 keep-alive connections) shares the machine's cores
with the server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq

RECMTL = str(Path(sys.executable).with_name("recmtl"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([RECMTL, "serve", model, "--port", str(port), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/v2/health/live", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """One keep-alive HTTP/1.1 request on an open connection; returns the status code."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def load(url: str, name: str, bodies: list[bytes], concurrency: int, seconds: float, max_requests: int) -> dict:
    """``concurrency`` keep-alive connections, each sending its next request as soon as the last answer came.
    A bare asyncio HTTP/1.1 client: it costs the shared cores far less per request than a full client library,
    so the numbers describe the server more than the load generator."""
    host, port = url.removeprefix("http://").split(":")
    path = f"/v1/models/{name}/predict"
    requests = [(f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(b)}\r\n\r\n").encode() + b for b in bodies]
    latencies: list[float] = []
    errors = 0
    sent = 0
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal errors, sent
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            await _post(reader, writer, requests[k % len(requests)])  # warm-up, not counted
            await start_gate.wait()
            i = k
            while time.perf_counter() < stop and sent < max_requests:
                sent += 1
                t = time.perf_counter()
                status = await _post(reader, writer, requests[i % len(requests)])
                latencies.append(time.perf_counter() - t)
                i += concurrency
                if status != 200:
                    errors += 1
        finally:
            writer.close()

    start_gate = asyncio.Event()
    tasks = [asyncio.create_task(worker(k)) for k in range(concurrency)]
    await asyncio.sleep(0.2)
    stop = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start_gate.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"requests": len(lat), "errors": errors, "req_per_s": round(len(lat) / wall, 1),
            "p50_ms": round(1000 * lat[len(lat) // 2], 2), "p99_ms": round(1000 * lat[int(len(lat) * 0.99) - 1], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    name = Path(args.model).stem
    table = pq.read_table(args.data).slice(0, 4096)
    cols = [c for c in table.column_names if c not in ("click", "conversion")]
    rows = table.select(cols).to_pylist()
    one_row = [json.dumps({"instances": [r]}).encode() for r in rows[:1024]]
    many = [json.dumps({"instances": rows[i:i + 256]}).encode() for i in range(0, 4096, 256)]
    modes = {"batching": ["--max-batch-size", "256", "--max-wait-ms", "2"], "no_batching": ["--max-batch-size", "0"]}
    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):  # the two modes alternate, a fresh server each time
        for mode in (modes if r % 2 == 0 else reversed(modes)):
            proc, url = start(args.model, *modes[mode])
            try:
                for c in (1, 16, 64):
                    out = asyncio.run(load(url, name, one_row, c, args.seconds, args.max_requests))
                    runs.setdefault(f"{mode}/1row/c{c}", []).append(out)
                    print(f"round {r + 1} {mode} 1-row c={c}: {out}", flush=True)
                out = asyncio.run(load(url, name, many, 4, args.seconds, args.max_requests))
                out["rows_per_s"] = round(out["req_per_s"] * 256)
                runs.setdefault(f"{mode}/256rows/c4", []).append(out)
                print(f"round {r + 1} {mode} 256-row c=4: {out}", flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    # medians over rounds; the c=64 speed-up as the median of each round's ratio
    report = {key: {k: round(statistics.median(o[k] for o in outs), 2) for k in outs[0]} for key, outs in runs.items()}
    speedups = [b["req_per_s"] / n["req_per_s"] for b, n in zip(runs["batching/1row/c64"], runs["no_batching/1row/c64"])]
    report["summary"] = {"p99_ms_c1": report["batching/1row/c1"]["p99_ms"],
                         "c64_batching_speedup_per_round": [round(x, 2) for x in speedups],
                         "c64_batching_speedup": round(statistics.median(speedups), 2),
                         "errors": sum(o["errors"] for outs in runs.values() for o in outs)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
