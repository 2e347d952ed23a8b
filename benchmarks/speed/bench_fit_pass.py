"""The fit pass alone: one process against ``torchrun --nproc-per-node 2`` (gloo, loopback, CPU).

Data: a ``recmtl datagen funnel`` folder (``--data``; e.g. ``recmtl datagen funnel /tmp/f --rows 12500000``:
10M training rows, 26 categorical and 13 dense features, click + ESMM conversion). Each round fits the schema
of ``train.parquet`` once with 1 process and once with 2 (the order alternates between rounds), in fresh
processes; the time is rank 0's ``fit_schema`` call (its share of the counting, the merge of the ranks'
counts, the leak check and the broadcast of the schema; not the imports or the process group's start).
Reported per setting: the median over rounds, every round (with each rank's CPU seconds in ``fit_schema``),
and the sha256 of schema.json and of the vocabulary files (the same in every run: the sharded fit pass is exact).

Usage: python benchmarks/speed/bench_fit_pass.py --data DIR [--rounds 2] [--work-dir DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _config(data: Path, out: Path) -> Path:
    import pyarrow.parquet as pq
    import yaml
    names = pq.ParquetFile(data / "train.parquet").schema_arrow.names
    cat = [n for n in names if n in ("user_id", "item_id") or (n[0] == "c" and n[1:].isdigit())]
    dense = [n for n in names if n[0] == "d" and n[1:].isdigit()]
    cfg = {"data": {"train": str(data / "train.parquet")},
           "features": [{"name": n, "kind": "categorical"} for n in cat] + [{"name": n, "kind": "dense"} for n in dense],
           "tasks": [{"name": "click", "head": "binary"},
                     {"name": "conversion", "head": "esmm", "params": {"ctr_task": "click"}}],
           "train": {"progress": False}}
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def worker(config: str, out: str) -> None:
    """Fit under torchrun or alone; rank 0 writes the schema and ``timing.json``."""
    from recmtl.config import load_config
    from recmtl.data.parquet import ParquetSource
    from recmtl.registry import load_registry
    from recmtl.schema import fit_schema
    from recmtl.training.distributed import setup
    from recmtl.training.model import validate_plugins
    cfg = load_config(config)
    ctx = setup("cpu")
    heads = validate_plugins(cfg, load_registry())
    src = ParquetSource(cfg.resolve(cfg.data.train), cfg.columns())
    ctx.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    schema = fit_schema(cfg, src, heads, None, ctx)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    cpus = ctx.gather_object(cpu)  # CPU seconds of each rank's fit pass (all its threads)
    if ctx.is_main:
        schema.save(Path(out))
        (Path(out) / "timing.json").write_text(json.dumps({"fit_s": seconds, "rows": schema.num_rows, "world": ctx.world,
                                                           "cpu_s": [round(c, 2) for c in cpus]}))
    ctx.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(run: Path) -> dict[str, str]:
    schema = hashlib.sha256((run / "schema.json").read_bytes()).hexdigest()
    vocab = hashlib.sha256()
    for p in sorted((run / "vocab").glob("*.parquet")):
        vocab.update(p.name.encode() + p.read_bytes())
    return {"schema.json": schema, "vocab": vocab.hexdigest()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"))
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_fit_"))
    work.mkdir(parents=True, exist_ok=True)
    config = _config(args.data, work)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    me = str(Path(__file__).resolve())
    results: dict[int, list[float]] = {1: [], 2: []}
    digests = set()
    for r in range(args.rounds):
        for world in ((1, 2) if r % 2 == 0 else (2, 1)):
            out = work / f"round{r}_world{world}"
            out.mkdir(parents=True, exist_ok=True)
            cmd = ([sys.executable, me, "--worker", str(config), str(out)] if world == 1 else
                   [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc-per-node={world}",
                    "--master-addr", "127.0.0.1", f"--master-port={_free_port()}", me, "--worker", str(config), str(out)])
            wall = time.perf_counter()
            subprocess.run(cmd, check=True, env=env)
            wall = time.perf_counter() - wall
            timing = json.loads((out / "timing.json").read_text())
            d = _digest(out)
            digests.add(tuple(sorted(d.items())))
            results[world].append(timing["fit_s"])
            print(json.dumps({"round": r, "world": world, "fit_s": round(timing["fit_s"], 2), "cpu_s": timing["cpu_s"],
                              "process_wall_s": round(wall, 2), "rows": timing["rows"], **d}), flush=True)
    print(json.dumps({"median_fit_s": {w: round(statistics.median(v), 2) for w, v in results.items()},
                      "speedup": round(statistics.median(results[1]) / statistics.median(results[2]), 2),
                      "identical_schema": len(digests) == 1}))


if __name__ == "__main__":
    main()
