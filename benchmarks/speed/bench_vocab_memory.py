"""Peak RSS and wall time of the fit pass with and without ``features[].max_distinct`` (issue #22, item 3).

Generates one Parquet file: a long-tailed id column (``--heavy`` values whose counts are rows / (heavy * (heavy + 1)) apart, then
``--rows`` minus their rows drawn from ``--tail`` ids, nearly all distinct) and a binary label; then runs
``fit_schema`` in a fresh process per setting and reports its peak RSS (VmHWM), the RSS after imports,
wall time, and whether the capped vocabulary equals the exact one.

    .venv/bin/python benchmarks/speed/bench_vocab_memory.py --rows 3000000 --caps none,100000,10000,1000
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def generate(path: Path, rows: int, heavy: int, tail: int, seed: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    gap = max(rows // (heavy * (heavy + 1)), 1)  # the heavy values fill about half the rows, counts gap apart
    counts = (np.arange(heavy, 0, -1) * gap).astype(np.int64)
    head = np.repeat(np.arange(heavy), counts)
    ids = np.concatenate([head, rng.integers(10**6, 10**6 + tail, rows - len(head))])
    ids = rng.permutation(ids)
    pq.write_table(pa.table({"item": ids, "click": rng.integers(0, 2, rows)}), path, row_group_size=1 << 20)


def _hwm_kib() -> int:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it does not carry the parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(data: str, cap: str, max_size: int) -> None:
    from recmtl.config import parse_config
    from recmtl.data.parquet import ParquetSource
    from recmtl.registry import load_registry
    from recmtl.schema import fit_schema
    feature = {"name": "item", "kind": "categorical", "max_size": max_size}
    if cap != "none":
        feature["max_distinct"] = int(cap)
    cfg = parse_config({"data": {"train": data, "read_rows": 65536}, "features": [feature],
                        "tasks": [{"name": "click", "label": "click", "head": "binary"}],
                        "tower": {"name": "shared_bottom", "bottom_units": [8], "task_units": [4]}}, Path(data).parent)
    heads = {"click": load_registry().get("head", "binary")}
    base = _hwm_kib()
    t0 = time.perf_counter()
    schema = fit_schema(cfg, ParquetSource(cfg.resolve(cfg.data.train), cfg.columns()), heads)
    wall = time.perf_counter() - t0
    peak = _hwm_kib()
    print(json.dumps({"cap": cap, "rss_before_fit_mib": base / 1024, "peak_rss_mib": peak / 1024,
                      "fit_s": wall, "vocab": schema.categorical[0].vocab.tolist()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3_000_000)
    ap.add_argument("--heavy", type=int, default=50)
    ap.add_argument("--tail", type=int, default=10**9)
    ap.add_argument("--max-size", type=int, default=50)
    ap.add_argument("--caps", default="none,100000,10000")
    ap.add_argument("--work-dir", default="/tmp/bench_vocab_memory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.max_size)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"ids_{args.rows}_{args.seed}.parquet"
    if not data.exists():
        generate(data, args.rows, args.heavy, args.tail, args.seed)
    results = []
    for cap in args.caps.split(","):
        out = subprocess.run([sys.executable, __file__, "--max-size", str(args.max_size), "--child", str(data), cap],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    distinct = len(pc.unique(pq.read_table(data, columns=["item"]).column("item").combine_chunks()))
    print(f"{args.rows} rows, {distinct} distinct ids, max_size {args.max_size}, heavy-value count gap "
          f"{max(args.rows // (args.heavy * (args.heavy + 1)), 1)}, error bound N/(cap+1) per cap: "
          + ", ".join(f"{c}: {args.rows // (int(c) + 1)}" for c in args.caps.split(",") if c != "none"))
    exact = next((r["vocab"] for r in results if r["cap"] == "none"), None)
    print("| max_distinct | peak RSS (MiB) | peak RSS before the fit (MiB) | fit pass (s) | vocabulary = exact |")
    print("|---|---|---|---|---|")
    for r in results:
        same = "-" if exact is None else ("yes" if r["vocab"] == exact else "no")
        print(f"| {r['cap']} | {r['peak_rss_mib']:.0f} | {r['rss_before_fit_mib']:.0f} | {r['fit_s']:.1f} | {same} |")


if __name__ == "__main__":
    main()
