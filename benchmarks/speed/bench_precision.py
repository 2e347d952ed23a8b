"""Issue 21: training precision and low-precision exports, on the funnel MMoE benchmark model (26 categorical
dim 16, 13 dense, 4 experts [256, 128], towers [64], batch 2048).

1. ``train``: epoch rows/s of the real loop (``recmtl.training.loop.train``, one epoch, progress bar off) with
   ``train.precision`` auto, fp32 and bf16, interleaved over ``--rounds`` rounds; medians, and the ratios auto /
   fp32 and bf16 / fp32. Prints what ``auto`` resolved to and which bf16 units torch reports.
2. ``score``: ``recmtl score`` rows/s (wall time of the subprocess, onnxruntime ``--threads`` threads) of the fp32,
   int8 and fp16 exports of one run, interleaved over ``--rounds`` rounds; medians, ratios to fp32, file sizes.
   The exports (and their quality check: |ΔAUC| against fp32 on held-out rows) are made by ``recmtl export
   --precision``.

    python benchmarks/speed/bench_precision.py train --rows 20000 --rounds 3 [--work-dir DIR]
    python benchmarks/speed/bench_precision.py score --run RUN --data FILE.parquet --sample FILE.parquet --rounds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RECMTL = str(Path(sys.executable).with_name("recmtl"))


def features() -> list[dict]:
    cats = ["user_id", "item_id"] + [f"c{i:02d}" for i in range(3, 27)]
    return [{"name": n, "kind": "categorical"} for n in cats] + [{"name": f"d{i:02d}", "kind": "dense"} for i in range(1, 14)]


def bench_train(rows: int, rounds: int, work: Path) -> dict:
    from recmtl.config import parse_config
    from recmtl.data.synthetic import funnel
    from recmtl.registry import load_registry
    from recmtl.training.device import cpu_bf16_units, resolve_precision
    from recmtl.training.loop import train

    data = work / "data"
    if not (data / "train.parquet").is_file():
        funnel(data, rows=rows, seed=0)
    registry = load_registry()
    results: dict[str, list[float]] = {"auto": [], "fp32": [], "bf16": []}
    for r in range(rounds):
        for precision in results:
            raw = {"seed": r, "data": {"train": str(data / "train.parquet")}, "features": features(),
                   "tasks": [{"name": "click", "head": "binary"},
                             {"name": "conversion", "head": "esmm", "params": {"ctr_task": "click"}}],
                   "encoders": {"categorical": {"name": "embedding", "dim": 16}},
                   "tower": {"name": "mmoe", "num_experts": 4, "expert_units": [256, 128], "task_units": [64]},
                   "train": {"batch_size": 2048, "epochs": 1, "progress": False, "precision": precision}}
            out = work / f"run_{precision}_{r}"
            summary = train(parse_config(raw, work, "bench"), out, registry)
            results[precision].append(summary["history"][0]["rows_per_s"])
            print(f"round {r + 1} {precision}: {results[precision][-1]:,.0f} rows/s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    return {"auto_resolves_to": resolve_precision("auto", torch.device("cpu")), "bf16_units": cpu_bf16_units(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows, "rounds": rounds,
            "rows_per_s": results, "median_rows_per_s": med,
            "auto_over_fp32": med["auto"] / med["fp32"], "bf16_over_fp32": med["bf16"] / med["fp32"]}


def bench_score(run: Path, data: str, sample: str, rounds: int, threads: int, work: Path,
                reuse: bool = False) -> dict:
    import pyarrow.parquet as pq
    n = pq.ParquetFile(data).metadata.num_rows
    models, quality = {}, {}
    for precision in ("fp32", "int8", "fp16"):
        path = work / f"{precision}.onnx"
        if reuse and path.is_file():  # exported by an earlier run into the same --work-dir
            models[precision] = path
            continue
        r = subprocess.run([RECMTL, "export", str(run), "-o", str(path), "--precision", precision, "--sample", sample,
                            "--sample-rows", "1000000"], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"export {precision} failed: {r.stderr}")
        models[precision] = path
        quality[precision] = [line for line in r.stdout.splitlines() if " vs " in line]
    times: dict[str, list[float]] = {k: [] for k in models}
    ratios: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for precision, path in models.items():
            t0 = time.perf_counter()
            subprocess.run([RECMTL, "score", str(path), data, "-o", str(work / "scores.parquet"), "--no-progress",
                            "--threads", str(threads)], check=True, capture_output=True)
            times[precision].append(n / (time.perf_counter() - t0))
        for precision in models:  # this round's ratio: a neighbour's load hits the models of one round alike
            ratios[precision].append(times[precision][-1] / times["fp32"][-1])
    med = {k: statistics.median(v) for k, v in times.items()}
    sizes = {k: p.stat().st_size for k, p in models.items()}
    return {"rows": n, "rounds": rounds, "threads": threads, "rows_per_s": times, "median_rows_per_s": med,
            "speed_over_fp32": {k: v / med["fp32"] for k, v in med.items()},
            "median_round_ratio": {k: statistics.median(v) for k, v in ratios.items()}, "bytes": sizes,
            "size_ratio_fp32_over": {k: sizes["fp32"] / v for k, v in sizes.items()}, "export_lines": quality}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["train", "score"])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--run", type=Path)
    ap.add_argument("--data")
    ap.add_argument("--sample")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", type=Path)
    ap.add_argument("--reuse", action="store_true", help="score: keep the models already in --work-dir")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.what == "train":
            result = bench_train(args.rows, args.rounds, work)
        else:
            result = bench_score(args.run, args.data, args.sample, args.rounds, args.threads, work, args.reuse)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
