"""Issue 17 evidence: the cost of target attention at history length 50 and 200, relative to mean pooling.

Per length: ``recmtl datagen interests --history L`` (every row's history drawn up to L items), one short
training run per encoder (``sequence_pool`` mean, ``din``, ``transformer``) for a model, then in a fresh process
per (encoder, length): the median time of a training step (forward, both tasks' losses, backward, Adam on the
dense and SparseAdam on the sparse parameters, as ``recmtl train`` does) on a fixed batch, one thread, and that
process's peak RSS; then the exported ONNX model's scoring rows/s (``Scorer.score`` on the validation rows,
onnxruntime's default threads) — the export itself runs the parity check.

    nice -n 10 .venv/bin/python benchmarks/speed/bench_sequence_cost.py --work-dir /tmp/seqcost

``--text-runs WITH WITHOUT DATA``: tokenisation throughput instead: the two run directories (e.g. the quality
benchmark's ``mean_text`` and ``mean``) exported, then ``Scorer.score`` (what ``recmtl score`` runs per batch) on
DATA's rows, median of 3, and what the text input costs per row.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

RECMTL = str(Path(sys.executable).with_name("recmtl"))
ENCODERS = {
    "mean": {"name": "sequence_pool", "dim": 16, "pooling": "mean"},
    "din": {"name": "din", "dim": 16},
    "transformer": {"name": "transformer", "dim": 16, "num_heads": 2, "num_layers": 1, "dropout": 0.0},
}


def run(*args: str) -> str:
    out = subprocess.run([RECMTL, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"recmtl {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def measure(run_dir: str, model_path: str, data: str, batch: int, steps: int) -> dict:
    """In this process: step time of the trained model, peak RSS, scoring rows/s of the ONNX file."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from recmtl.serving.score import Scorer
    from recmtl.training.evaluate import load_run
    from recmtl.training.model import sparse_parameters
    torch.set_num_threads(1)
    loaded = load_run(run_dir, [], [], "best")
    model, schema = loaded.model.train(), loaded.schema
    table = pq.read_table(data)
    arrays = schema.transform(table.slice(0, batch))
    inputs = {k: torch.from_numpy(v) for k, v in arrays.inputs.items()}
    labels, mask = torch.from_numpy(arrays.labels), torch.from_numpy(arrays.mask.astype(np.float32))
    sparse = {id(p) for p in sparse_parameters(model)}
    opts = [torch.optim.Adam([p for p in model.parameters() if id(p) not in sparse], lr=1e-3)]
    if sparse:
        opts.append(torch.optim.SparseAdam([p for p in model.parameters() if id(p) in sparse], lr=1e-3))
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        for o in opts:
            o.zero_grad()
        losses = model.losses(model(inputs), labels, mask)
        sum(losses.values()).backward()
        for o in opts:
            o.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    scorer = Scorer(model_path)
    scorer.score(table.slice(0, 1000))
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        scorer.score(table)
        rates.append(len(table) / (time.perf_counter() - start))
    return {"step_ms": 1000 * float(np.median(times)), "peak_rss_mb": peak, "score_rows_s": float(np.median(rates))}


def text_throughput(with_text: str, without: str, data: str, work: Path) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    from recmtl.serving.score import Scorer
    work.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(data)
    rates = {}
    for name, run_dir in (("with text", with_text), ("without", without)):
        model = work / f"{Path(run_dir).name}.onnx"
        if not model.exists():
            run("export", run_dir, "-o", str(model))
        scorer = Scorer(model)
        scorer.score(table.slice(0, 1000))
        times = []
        for _ in range(3):
            start = time.perf_counter()
            scorer.score(table)
            times.append(time.perf_counter() - start)
        rates[name] = len(table) / float(np.median(times))
        print(f"{name:<10} {rates[name]:>12,.0f} rows/s  ({len(table):,} rows of {data})")
    extra = 1e6 / rates["with text"] - 1e6 / rates["without"]
    print(f"the text input: {extra:.1f} us per row (tokenise, hash, embed) -> about {1e6 / max(extra, 1e-9):,.0f} rows/s "
          "of tokenisation alone")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--lengths", default="50,200")
    ap.add_argument("--encoders", default="mean,din,transformer")
    ap.add_argument("--rows", type=int, default=12_000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--text-runs", nargs=3, metavar=("WITH", "WITHOUT", "DATA"))
    args = ap.parse_args()
    if args.text_runs:
        text_throughput(*args.text_runs, args.work_dir)
        return
    if args.measure:
        print(json.dumps(measure(*args.measure, args.batch, args.steps)))
        return
    results = {}
    for length in [int(x) for x in args.lengths.split(",")]:
        work = args.work_dir / f"L{length}"
        data = work / "data"
        if not (data / "valid.parquet").exists():
            run("datagen", "interests", str(data), "--rows", str(args.rows), "--history", str(length),
                "--test-fraction", "0")
        for name in args.encoders.split(","):
            enc = ENCODERS[name]
            run_dir, model = work / name, work / f"{name}.onnx"
            if not model.exists():
                cfg = {"seed": 0, "data": {"train": str(data / "train.parquet"), "validation": str(data / "valid.parquet")},
                       "features": [{"name": "item_id", "kind": "categorical"},
                                    {"name": "hist", "kind": "sequence", "max_length": length, "vocabulary": "item_id",
                                     "target": "item_id"}],
                       "tasks": [{"name": "click"}, {"name": "conversion", "head": "esmm", "params": {"ctr_task": "click"}}],
                       "encoders": {"categorical": {"name": "embedding", "dim": 16}, "sequence": enc},
                       "tower": {"name": "shared_bottom", "bottom_units": [64], "task_units": [32]},
                       "train": {"batch_size": 1024, "epochs": 1, "progress": False, "threads": 1}}
                (work / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
                run("train", str(work / f"{name}.yaml"), "--out", str(run_dir))
                run("export", str(run_dir), "-o", str(model))
            out = subprocess.run([sys.executable, __file__, "--work-dir", str(args.work_dir), "--batch", str(args.batch),
                                  "--steps", str(args.steps), "--measure", str(run_dir), str(model),
                                  str(data / "valid.parquet")], capture_output=True, text=True, check=True)
            results[(length, name)] = json.loads(out.stdout.strip().splitlines()[-1])
            print(length, name, results[(length, name)], flush=True)
    print(f"\nbatch {args.batch}, {args.steps} steps (median), 1 torch thread; scoring: {int(args.rows * 0.1):,} "
          "validation rows, onnxruntime default threads")
    print(f"{'length':>6} {'encoder':<12} {'step ms':>8} {'x mean':>7} {'peak RSS MB':>12} {'score rows/s':>13} {'x mean':>7}")
    for (length, name), r in results.items():
        base = results.get((length, "mean"), r)
        print(f"{length:>6} {name:<12} {r['step_ms']:>8.1f} {r['step_ms'] / base['step_ms']:>7.2f} {r['peak_rss_mb']:>12.0f} "
              f"{r['score_rows_s']:>13,.0f} {r['score_rows_s'] / base['score_rows_s']:>7.2f}")


if __name__ == "__main__":
    main()
