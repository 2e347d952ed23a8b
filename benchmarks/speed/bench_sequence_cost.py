"""Issue 17 evidence: the cost of target attention at history length 50 and 200, relative to mean pooling.

Per length: ``recmtl datagen interests --history L`` (every row's history drawn up to L items), one short
training run per encoder (``sequence_pool`` mean, ``din``, ``transformer``) for a model, then in a fresh process
per (encoder, length): the median time of a training step (forward, both tasks' losses, backward, Adam on the
dense and SparseAdam on the sparse parameters, as ``recmtl train`` does) on a fixed batch, one thread, and that
process's peak RSS; then the exported ONNX model's scoring rows/s (``Scorer.score`` on the validation rows repeated
to at least ``--score-rows``, 48,000 by default; onnxruntime's default threads) — the export itself runs the parity
check. Step times are wall clock and this thread's CPU time (``thread_time``: less inflated by a loaded machine);
``--repeats R`` runs each (encoder, length) process R times, the encoders taking turns, and reports medians.

    nice -n 10 .venv/bin/python benchmarks/speed/bench_sequence_cost.py --work-dir /tmp/seqcost --repeats 3

``--ab REF``: before/after instead, in one process per length: the three models built from each run's config and
schema (fresh weights, seed 0) twice, once with the sequence encoders of git revision REF ("before") and once with
the working tree's ("after"), their training steps interleaved (before and after of every encoder take turns, so
the machine's load hits both alike), medians; no export.

    nice -n 10 .venv/bin/python benchmarks/speed/bench_sequence_cost.py --work-dir /tmp/seqcost --ab 52b5b3b

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


def measure(run_dir: str, model_path: str, data: str, batch: int, steps: int, score_rows: int) -> dict:
    """In this process: step time of the trained model, peak RSS, scoring rows/s of the ONNX file (on DATA's rows
    repeated up to at least ``score_rows``)."""
    import numpy as np
    import pyarrow as pa
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
    times, cpu = [], []
    for i in range(steps + 3):
        start, start_cpu = time.perf_counter(), time.thread_time()
        for o in opts:
            o.zero_grad()
        losses = model.losses(model(inputs), labels, mask)
        sum(losses.values()).backward()
        for o in opts:
            o.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
            cpu.append(time.thread_time() - start_cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    scorer = Scorer(model_path)
    scorer.score(table.slice(0, 1000))
    table = pa.concat_tables([table] * -(-score_rows // len(table)))
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        scorer.score(table)
        rates.append(len(table) / (time.perf_counter() - start))
    return {"step_ms": 1000 * float(np.median(times)), "step_cpu_ms": 1000 * float(np.median(cpu)), "peak_rss_mb": peak,
            "score_rows_s": float(np.median(rates)), "score_rows": len(table)}


def _step_fn(model, schema, table, batch: int):
    """One training step of ``model`` on the first ``batch`` rows of ``table``, as ``measure`` times it."""
    import numpy as np
    import torch

    from recmtl.training.model import sparse_parameters
    arrays = schema.transform(table.slice(0, batch))
    inputs = {k: torch.from_numpy(v) for k, v in arrays.inputs.items()}
    labels, mask = torch.from_numpy(arrays.labels), torch.from_numpy(arrays.mask.astype(np.float32))
    sparse = {id(p) for p in sparse_parameters(model)}
    opts = [torch.optim.Adam([p for p in model.parameters() if id(p) not in sparse], lr=1e-3)]
    if sparse:
        opts.append(torch.optim.SparseAdam([p for p in model.parameters() if id(p) in sparse], lr=1e-3))

    def step() -> None:
        for o in opts:
            o.zero_grad()
        losses = model.losses(model(inputs), labels, mask)
        sum(losses.values()).backward()
        for o in opts:
            o.step()
    return step


def ab_steps(work: Path, names: list[str], ref: str, batch: int, steps: int) -> dict:
    """Interleaved step times (ms, median) of each encoder's model with REF's sequence encoders and the current ones."""
    import dataclasses
    import importlib.util
    import tempfile

    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from recmtl.config import parse_config, read_raw
    from recmtl.registry import load_registry
    from recmtl.schema import FittedSchema
    from recmtl.training.model import MultiTaskModel
    torch.set_num_threads(1)
    old = {}
    with tempfile.TemporaryDirectory() as tmp:
        for module in ("din", "transformer", "sequence"):
            src = subprocess.run(["git", "show", f"{ref}:recmtl_plugins/encoders/{module}.py"], capture_output=True,
                                 text=True, check=True).stdout
            path = Path(tmp) / f"before_{module}.py"
            path.write_text(src)
            spec = importlib.util.spec_from_file_location(f"before_{module}", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            old.update(mod.recmtl_register_encoders())
    table = pq.read_table(work / "data" / "valid.parquet")
    steps_of = {}
    for name in names:
        config = parse_config(read_raw(work / name / "config.yaml"), work / name)
        schema = FittedSchema.load(work / name)
        for when in ("before", "after"):
            registry = load_registry()
            if when == "before":
                registry.tables["encoder"] = {n: dataclasses.replace(e, factory=old.get(n, e.factory))
                                              for n, e in registry.tables["encoder"].items()}
            torch.manual_seed(0)
            model = MultiTaskModel(config, schema, registry).train()
            steps_of[(name, when)] = _step_fn(model, schema, table, batch)
    times = {k: [] for k in steps_of}
    cpu = {k: [] for k in steps_of}
    for i in range(steps + 3):
        for k, step in steps_of.items():
            start, start_cpu = time.perf_counter(), time.thread_time()
            step()
            if i >= 3:
                times[k].append(time.perf_counter() - start)
                cpu[k].append(time.thread_time() - start_cpu)
    return {k: (1000 * float(np.median(v)), 1000 * float(np.median(cpu[k]))) for k, v in times.items()}


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
    ap.add_argument("--repeats", type=int, default=1, help="processes per (encoder, length), in turns; medians")
    ap.add_argument("--score-rows", type=int, default=48_000, help="scoring: the validation rows repeated up to this")
    ap.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--text-runs", nargs=3, metavar=("WITH", "WITHOUT", "DATA"))
    ap.add_argument("--ab", metavar="REF", help="before (git REF's sequence encoders) / after, interleaved")
    ap.add_argument("--ab-measure", nargs=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.text_runs:
        text_throughput(*args.text_runs, args.work_dir)
        return
    if args.measure:
        print(json.dumps(measure(*args.measure, args.batch, args.steps, args.score_rows)))
        return
    if args.ab_measure:
        res = ab_steps(Path(args.ab_measure[0]), args.encoders.split(","), args.ab, args.batch, args.steps)
        print(json.dumps([[name, when, *ms] for (name, when), ms in res.items()]))
        return
    import numpy as np
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
            if not model.exists() and not (args.ab and (run_dir / "best.pt").exists()):
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
        rounds: dict[str, list[dict]] = {name: [] for name in args.encoders.split(",")}
        for _ in range(0 if args.ab else args.repeats):  # the encoders' processes take turns, medians per field
            for name in rounds:
                out = subprocess.run([sys.executable, __file__, "--work-dir", str(args.work_dir), "--batch",
                                      str(args.batch), "--steps", str(args.steps), "--score-rows", str(args.score_rows),
                                      "--measure", str(work / name), str(work / f"{name}.onnx"),
                                      str(data / "valid.parquet")], capture_output=True, text=True, check=True)
                rounds[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(length, name, rounds[name][-1], flush=True)
        for name, rs in rounds.items():
            if rs:
                results[(length, name)] = {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
        if args.ab:  # one process per length, every model of it interleaved
            out = subprocess.run([sys.executable, __file__, "--work-dir", str(args.work_dir), "--batch", str(args.batch),
                                  "--steps", str(args.steps), "--encoders", args.encoders, "--ab", args.ab,
                                  "--ab-measure", str(work)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            for name, when, ms, cpu_ms in json.loads(out.stdout.strip().splitlines()[-1]):
                results[(length, name, when)] = ms
                results[(length, name, when, "cpu")] = cpu_ms
    if args.ab:
        print(f"\nbatch {args.batch}, {args.steps} steps interleaved (median), 1 torch thread; before = {args.ab}")
        print("wall: perf_counter; cpu: this thread's CPU time (thread_time), less sensitive to the machine's load")
        print(f"{'length':>6} {'encoder':<12} {'clock':<5} {'before ms':>10} {'x mean':>7} {'after ms':>9} {'x mean':>7} "
              f"{'speed-up':>9}")
        for key, ms in results.items():
            if len(key) == 3 and key[2] == "before":
                length, name = key[:2]
                for clock, tail in (("wall", ()), ("cpu", ("cpu",))):
                    before, after = results[(length, name, "before", *tail)], results[(length, name, "after", *tail)]
                    b0, a0 = results[(length, "mean", "before", *tail)], results[(length, "mean", "after", *tail)]
                    print(f"{length:>6} {name:<12} {clock:<5} {before:>10.1f} {before / b0:>7.2f} {after:>9.1f} "
                          f"{after / a0:>7.2f} {before / after:>9.2f}")
        return
    print(f"\nbatch {args.batch}, {args.steps} steps (median), 1 torch thread; scoring: the validation rows repeated to "
          f">= {args.score_rows:,} rows, onnxruntime default threads")
    print(f"{'length':>6} {'encoder':<12} {'step ms':>8} {'x mean':>7} {'cpu ms':>7} {'x mean':>7} {'peak RSS MB':>12} "
          f"{'score rows/s':>13} {'x mean':>7}")
    for (length, name), r in results.items():
        base = results.get((length, "mean"), r)
        print(f"{length:>6} {name:<12} {r['step_ms']:>8.1f} {r['step_ms'] / base['step_ms']:>7.2f} {r['step_cpu_ms']:>7.1f} "
              f"{r['step_cpu_ms'] / base['step_cpu_ms']:>7.2f} {r['peak_rss_mb']:>12.0f} "
              f"{r['score_rows_s']:>13,.0f} {r['score_rows_s'] / base['score_rows_s']:>7.2f}")


if __name__ == "__main__":
    main()
