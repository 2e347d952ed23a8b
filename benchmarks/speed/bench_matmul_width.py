"""Issue 21: fp32 CPU GEMM speed against the input width, and ``Experts``' zero pad of its input
(``recmtl.layers.input_pad``).

1. ``products``: the first expert layer's three products (``x @ W`` forward; ``grad @ W.T`` and ``x.T @ grad``
   backward) for each case ``width:batch:columns`` of ``--cases``, fp32 and under bf16 autocast, variants
   ``plain`` (width as it is), ``prepadded`` (x and W already zero-padded to a multiple of 16: the products alone)
   and ``pad{m}`` for each of ``--multiples`` (``F.pad`` of x and W to a multiple of m each step, and the slices of
   their gradients in the backward: what ``Experts`` does); blocks shuffled in each round, medians of CPU ms per forward + backward.
2. ``step``: the benchmark model's whole training step (bench_precision.py's ``step`` runner: forward, losses,
   backward, optimiser steps on 8 pre-built batches) in fp32 with the pad on and off
   (``recmtl.layers.EXPERTS_PAD_MULTIPLE`` as set / 0), interleaved; per-round ratios of CPU ms.

    python benchmarks/speed/bench_matmul_width.py products --rounds 15 --threads 1 [--multiples 4,8,16]
    python benchmarks/speed/bench_matmul_width.py step --rounds 15 --threads 1 --models benchmark,init
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from step_timing import interleaved_times  # noqa: E402

#: width:batch:columns — the funnel benchmark model's flat vector (429) into 4 x 256, and nearby widths; the same
#: input into ``recmtl init``'s 4 x 64 experts at batch 1,024
CASES = "429:2048:1024,432:2048:1024,448:2048:1024,421:2048:1024,437:2048:1024,445:2048:1024,461:2048:1024," \
        "429:1024:256"


def product_block(width: int, batch: int, cols: int, variant: str, bf16: bool, reps: int):
    """A function running ``reps`` forward + backward passes of the first layer's product; returns nothing.
    ``variant``: ``plain``, ``prepadded`` or ``pad{m}`` (padded at run time to a multiple of ``m``)."""
    g = torch.Generator().manual_seed(width)
    pad = -width % (int(variant[3:]) if variant.startswith("pad") and variant != "pad" else 16)
    w_in = width + pad if variant == "prepadded" else width
    x = torch.randn(batch, w_in, generator=g).requires_grad_()
    w = torch.randn(w_in, cols, generator=g).div_(w_in ** 0.5).requires_grad_()
    grad = torch.randn(batch, cols, generator=g)

    def run() -> None:
        for _ in range(reps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                a, b = (F.pad(x, (0, pad)), F.pad(w, (0, 0, 0, pad))) if variant.startswith("pad") else (x, w)
                h = a @ b
            h.backward(grad)
            x.grad = w.grad = None
    return run


def bench_products(cases: str, rounds: int, reps: int, multiples: tuple[int, ...] = (16,)) -> dict:
    blocks = {}
    for case in cases.split(","):
        width, batch, cols = (int(v) for v in case.split(":"))
        for prec in ("fp32", "bf16"):
            for variant in ("plain", "prepadded", *(f"pad{m}" for m in multiples)):
                if variant != "plain" and width % (int(variant[3:]) if variant.startswith("pad") else 16) == 0:
                    continue
                blocks[(case, prec, variant)] = product_block(width, batch, cols, variant, prec == "bf16", reps)
    for run in blocks.values():
        run()  # warm-up
    cpu = {k: [1000 * t / reps for t in ts] for k, ts in interleaved_times(blocks, rounds, time.process_time).items()}
    out = {}
    for (case, prec, variant), v in cpu.items():
        row = {"cpu_ms": round(statistics.median(v), 2), "per_round": [round(t, 2) for t in v]}
        if variant != "plain":
            ratios = [a / b for a, b in zip(cpu[(case, prec, "plain")], v)]
            row |= {"speedup_median": round(statistics.median(ratios), 3),
                    "speedup_mean": round(statistics.mean(ratios), 3),
                    "speedup_std": round(statistics.stdev(ratios), 3) if len(ratios) > 1 else 0.0,
                    "wins": f"{sum(q > 1 for q in ratios)}/{len(ratios)}"}
        out[f"{case} {prec} {variant}"] = row
        print(f"{case} {prec} {variant}: {row['cpu_ms']} ms"
              + (f", speed-up {row['speedup_median']} (wins {row['wins']})" if "wins" in row else ""), file=sys.stderr)
    return out


def bench_step(rows: int, rounds: int, work: Path, models: list[str], steps: int) -> dict:
    import bench_precision

    from recmtl import layers

    on = layers.EXPERTS_PAD_MULTIPLE
    runners = {}
    for multiple in (0, on):
        layers.EXPERTS_PAD_MULTIPLE = multiple
        for (model, _), run in bench_precision.step_runners(rows, work, models, None, steps, modes=("fp32",)).items():
            runners[(model, multiple)] = run
    def with_multiple(run, multiple):
        def block():
            layers.EXPERTS_PAD_MULTIPLE = multiple
            run()
        return block

    blocks = {(model, multiple): with_multiple(run, multiple) for (model, multiple), run in runners.items()}
    cpu = {k: [1000 * t / steps for t in ts] for k, ts in interleaved_times(blocks, rounds, time.process_time).items()}
    layers.EXPERTS_PAD_MULTIPLE = on
    out = {}
    for model in models:
        ratios = [a / b for a, b in zip(cpu[(model, 0)], cpu[(model, on)])]
        out[model] = {"cpu_ms_off": round(statistics.median(cpu[(model, 0)]), 2),
                      "cpu_ms_on": round(statistics.median(cpu[(model, on)]), 2), "multiple": on,
                      "speedup_median": round(statistics.median(ratios), 3),
                      "speedup_mean": round(statistics.mean(ratios), 3),
                      "speedup_std": round(statistics.stdev(ratios), 3) if len(ratios) > 1 else 0.0,
                      "wins": f"{sum(q > 1 for q in ratios)}/{len(ratios)}",
                      "per_round": [round(q, 3) for q in ratios]}
        print(f"{model}: {out[model]}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["products", "step"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", default=CASES, help="products: width:batch:columns, comma-separated")
    ap.add_argument("--multiples", default="4,16", help="products: the pad{m} variants, comma-separated")
    ap.add_argument("--reps", type=int, default=3, help="products: passes per block")
    ap.add_argument("--models", default="benchmark", help="step: bench_precision.py MODELS, comma-separated")
    ap.add_argument("--rows", type=int, default=20000, help="step: rows of the synthetic funnel set")
    ap.add_argument("--steps", type=int, default=8, help="step: steps per block")
    ap.add_argument("--work-dir", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "products":
        result = bench_products(args.cases, args.rounds, args.reps,
                                tuple(int(m) for m in args.multiples.split(",")))
    else:
        work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_width_"))
        result = bench_step(args.rows, args.rounds, work, args.models.split(","), args.steps)
    print(json.dumps({"what": args.what, "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
                      "result": result}, indent=1))


if __name__ == "__main__":
    main()
