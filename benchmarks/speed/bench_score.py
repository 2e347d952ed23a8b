"""Scoring throughput: PyTorch eager vs onnxruntime (model only) vs `recmtl score` (Parquet -> Parquet).

One run, interleaved rounds, medians. Also: the model's FLOPs per row (from the ONNX graph's MatMul/Gemm
initialisers), the achieved GFLOP/s, the machine's GEMM ceiling (one large MatMul in onnxruntime, same
threads), and the peak RSS of `recmtl score` on a large file. (b) and (c) run with onnxruntime's default thread
waiting in recmtl (threads sleep when idle) and with `--spin`, interleaved in every round. (a), (b) and the
ceiling are measured back to back on each chunk of rows (`--chunk-rows`) and their ratios are the medians of
those per-chunk ratios; each (c) run is compared with (b) on a chunk just before and just after it. A
neighbour's load on a shared host then hits both sides of a ratio alike.

    python benchmarks/speed/bench_score.py --rows 2000000 [--rss-rows 10000000] [--work-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[2]  # benchmarks/speed/ -> the repository
RECMTL = str(Path(sys.executable).with_name("recmtl"))

CONFIG = """
seed: 0
data: {{train: {data}/train.parquet, validation: {data}/valid.parquet}}
features: {features}
tasks:
  - {{name: click, head: binary}}
  - {{name: conversion, head: esmm, params: {{ctr_task: click}}}}
encoders: {{categorical: {{name: embedding, dim: 16}}}}
tower: {{name: mmoe, num_experts: 4, expert_units: [256, 128], task_units: [64]}}
train: {{batch_size: 2048, epochs: 1, progress: false, early_stopping: {{patience: 0}}}}
"""


def sh(*args: str) -> None:
    subprocess.run([RECMTL, *args], check=True, stdout=subprocess.DEVNULL)


def model_flops_per_row(path: Path) -> int:
    m = onnx.load(str(path))
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    flops = 0
    for node in m.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            for name in node.input[1:2]:
                if name in inits:
                    flops += 2 * int(np.prod(inits[name]))
    return flops


def gemm_ceiling(threads: int, m: int = 2048, k: int = 1024, n: int = 1024, reps: int = 20) -> float:
    """GFLOP/s of one large MatMul in onnxruntime (a fresh session each call)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.random.rand(k, n).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.rand(m, k).astype(np.float32)
    sess.run(None, {"x": x})
    t = time.perf_counter()
    for _ in range(reps):
        sess.run(None, {"x": x})
    return 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunk-rows", type=int, default=250_000, help="rows per back-to-back (a)/(b)/ceiling comparison")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rss-rows", type=int, default=0, help="also measure peak RSS of recmtl score on this many rows")
    ap.add_argument("--work-dir", type=Path)
    args = ap.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="recmtl-bench-score-"))
    data = work / "data"
    if not (data / "test.parquet").exists():
        # a small train split for a 1-epoch model; the scored set is `test` with --rows rows
        n_train = 200_000
        total = n_train + args.rows + 20_000
        sh("datagen", "funnel", str(data), "--rows", str(total), "--valid-fraction", str(20_000 / total),
           "--test-fraction", str(args.rows / total))
    run, model_path = work / "run", work / "model.onnx"
    if not (run / "metrics.json").exists():
        features = [{"name": c, "kind": "categorical"} for c in ["user_id", "item_id"] + [f"c{i:02d}" for i in range(3, 27)]]
        features += [{"name": f"d{i:02d}", "kind": "dense"} for i in range(1, 14)]
        (work / "cfg.yaml").write_text(CONFIG.format(data=data, features=json.dumps(features)))
        sh("train", str(work / "cfg.yaml"), "--out", str(run))
    if not model_path.exists():  # delete it to measure a new exporter on the same trained model
        sh("export", str(run), "-o", str(model_path))

    from recmtl.serving.score import Scorer, to_feeds
    from recmtl.training.evaluate import load_run
    table = pq.read_table(data / "test.parquet")
    n = table.num_rows
    loaded = load_run(run)
    torch.set_num_threads(args.threads)
    arrays = loaded.schema.transform(table, labels=False)
    tensors = {k: torch.from_numpy(v) for k, v in arrays.inputs.items()}
    scorers = {False: Scorer(model_path, args.threads), True: Scorer(model_path, args.threads, spin=True)}
    feeds = to_feeds(table, scorers[False].inputs)
    bs = args.batch_size

    spans = [(lo, min(lo + args.chunk_rows, n)) for lo in range(0, n, args.chunk_rows)]

    def torch_eager(lo: int, hi: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for s in range(lo, hi, bs):
                loaded.model.predict({k: v[s:min(s + bs, hi)] for k, v in tensors.items()})
        return time.perf_counter() - t

    def ort_model_only(spin: bool, lo: int, hi: int) -> float:
        scorer = scorers[spin]
        t = time.perf_counter()
        for s in range(lo, hi, bs):
            scorer.session.run(scorer.tasks, {k: v[s:min(s + bs, hi)] for k, v in feeds.items()})
        return time.perf_counter() - t

    def recmtl_score(spin: bool) -> float:
        out = work / "scores.parquet"
        t = time.perf_counter()
        subprocess.run([RECMTL, "score", str(model_path), str(data / "test.parquet"), "-o", str(out), "--no-progress",
                        "--threads", str(args.threads), "--batch-size", str(bs), *(["--spin"] if spin else [])],
                       check=True, stdout=subprocess.DEVNULL)
        return n / (time.perf_counter() - t)

    flops = model_flops_per_row(model_path)
    settings = {"default": "", "spin": "_spin"}  # onnxruntime threads sleep when idle / busy-wait inside a batch
    per_round: dict[str, list[float]] = {}  # rows/s of each path over the whole set, one entry per round
    per_chunk: dict[str, list[float]] = {}  # ratios measured back to back on the same chunk of rows
    for r in range(args.rounds):
        took: dict[str, float] = {}
        for lo, hi in spans:
            # (a), (b) and the ceiling alternate chunk by chunk: a busy neighbour on a shared host slows them alike
            t_torch = torch_eager(lo, hi)
            ceiling = gemm_ceiling(args.threads, reps=5)
            took["torch_eager"] = took.get("torch_eager", 0.0) + t_torch
            per_chunk.setdefault("gemm_gflops", []).append(ceiling)
            for setting, suffix in (settings.items() if r % 2 == 0 else reversed(settings.items())):
                t_ort = ort_model_only(setting == "spin", lo, hi)
                took["ort_model_only" + suffix] = took.get("ort_model_only" + suffix, 0.0) + t_ort
                per_chunk.setdefault("ort_over_torch" + suffix, []).append(t_torch / t_ort)
                per_chunk.setdefault("ort_over_ceiling" + suffix, []).append((hi - lo) * flops / 1e9 / t_ort / ceiling)
        for name, seconds in took.items():
            per_round.setdefault(name, []).append(n / seconds)
        for setting, suffix in (settings.items() if r % 2 == 0 else reversed(settings.items())):
            # (c) against (b) measured on one chunk just before and one just after it
            lo, hi = spans[r % len(spans)]
            before = (hi - lo) / ort_model_only(setting == "spin", lo, hi)
            per_round.setdefault("recmtl_score" + suffix, []).append(recmtl_score(setting == "spin"))
            after = (hi - lo) / ort_model_only(setting == "spin", lo, hi)
            per_round.setdefault("score_over_ort" + suffix, []).append(
                per_round["recmtl_score" + suffix][-1] / ((before + after) / 2))
        print(f"round {r + 1}: " + ", ".join(f"{k}={v[-1]:,.3f}" if "over" in k else f"{k}={v[-1]:,.0f}"
                                             for k, v in per_round.items()), flush=True)
    med = {k: statistics.median(v) for k, v in {**per_round, **per_chunk}.items()}
    report = {"rows": n, "batch_size": bs, "threads": args.threads, "rounds": args.rounds, "chunk_rows": args.chunk_rows,
              "model_mflops_per_row": round(flops / 1e6, 3), "gemm_ceiling_gflops": round(med["gemm_gflops"], 1),
              "torch_eager_rows_per_s": round(med["torch_eager"])}
    for setting, suffix in settings.items():
        report[setting] = {
            "rows_per_s": {"ort_model_only": round(med["ort_model_only" + suffix]),
                           "recmtl_score": round(med["recmtl_score" + suffix])},
            "ort_achieved_gflops": round(med["ort_model_only" + suffix] * flops / 1e9, 1),
            # (b)/(a) and (b)/ceiling: medians over every chunk of every round; (c)/(b): over rounds, each
            # against (b) on the chunks just before and after it
            "ratio_ort_over_torch": round(med["ort_over_torch" + suffix], 3),
            "ratio_ort_over_ceiling": round(med["ort_over_ceiling" + suffix], 3),
            "ratio_score_over_ort": round(med["score_over_ort" + suffix], 3),
            "per_round_score_over_ort": [round(x, 3) for x in per_round["score_over_ort" + suffix]],
        }
    if args.rss_rows:
        big = work / "big"
        if not (big / "train.parquet").exists():
            sh("datagen", "funnel", str(big), "--rows", str(args.rss_rows), "--valid-fraction", "0", "--test-fraction", "0", "--seed", "9")
        # a fresh parent whose only child is `recmtl score`, so ru_maxrss is that process's peak
        cmd = [RECMTL, "score", str(model_path), str(big / "train.parquet"), "-o", str(work / "big_scores.parquet"),
               "--no-progress", "--threads", str(args.threads), "--keep", "user_id"]
        probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
                 f"subprocess.run({cmd!r}, check=True, stdout=subprocess.DEVNULL); "
                 "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        seconds, peak_kb = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                                          text=True).stdout.split()
        report["rss_test"] = {"rows": args.rss_rows, "peak_rss_mb": round(int(peak_kb) / 1024, 1),
                              "rows_per_s": round(args.rss_rows / float(seconds))}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
