"""Issue 21: training precision and low-precision exports, on the funnel MMoE benchmark model (26 categorical
dim 16, 13 dense, 4 experts [256, 128], towers [64], batch 2048).

1. ``train``: epoch rows/s of the real loop (``recmtl.training.loop.train``, one epoch, progress bar off) with
   ``train.precision`` auto, fp32 and bf16, interleaved over ``--rounds`` rounds; medians, and the ratios auto /
   fp32 and bf16 / fp32. Prints what ``auto`` resolved to and which bf16 units torch reports. ``--precisions``
   may add ``auto-full``: auto with the probe's early stop turned off.
2. ``score``: ``recmtl score`` rows/s (wall time of the subprocess, onnxruntime ``--threads`` threads) of the fp32,
   int8 and fp16 exports of one run, interleaved over ``--rounds`` rounds; medians, ratios to fp32, file sizes.
   The exports (and their quality check: |ΔAUC| against fp32 on held-out rows) are made by ``recmtl export
   --precision``.
3. ``quant``: the int8 variants side by side (issue 21's speed target): fp32, dynamic int8 (``--precision int8``)
   and static int8 (``recmtl.export.precision.to_int8_static``: QDQ and QOperator format, per tensor and per
   channel, u8/s8 activations, ``reduce_range``), each with onnxruntime's graph optimisation ``all`` and for
   fp32 / QDQ also ``basic``. Per variant: the quality check of ``recmtl export`` (|ΔAUC| on ``--sample``),
   the file size, the in-graph rows/s (``session.run`` on 8 batches of 1,024 pre-converted rows, ``--threads``
   threads, rounds interleaved, medians and per-round ratios), the kernels onnxruntime runs most, and the
   ``recmtl score`` rows/s (subprocess) of ``--score-variants`` on ``--data``.

    python benchmarks/speed/bench_precision.py train --rows 20000 --rounds 3 [--work-dir DIR]
    python benchmarks/speed/bench_precision.py score --run RUN --data FILE.parquet --sample FILE.parquet --rounds 3
    python benchmarks/speed/bench_precision.py quant --run RUN --data FILE.parquet --sample FILE.parquet --rounds 7
    python benchmarks/speed/bench_precision.py e2e --models fp32=A.onnx,int8=B.onnx --data BIG.parquet --rounds 3

4. ``e2e``: ``recmtl score`` of given model files on a large input (so that start-up is not what is measured), at
   each of ``--thread-counts``, interleaved; a variant may name another checkout's ``recmtl`` to compare code; and
   where the time goes in one process, stage by stage (``stages``).
5. ``parts``: the training step of the benchmark model in fp32 and bf16, part by part (forward, zero_grad,
   backward, dense and sparse optimiser steps, the losses' ``.item()``; wall and CPU ms), for the optimiser
   ``--variants`` (``before``: torch's Adam and SparseAdam as ``make_optimizers`` built them before issue 21's step
   work; ``recmtl``: ``make_optimizers``), interleaved; and from torch.profiler the share of the step in matrix
   products and the "matmuls free" bound, step / (step - GEMM time). ``train --variants before,recmtl`` compares
   the same optimisers by epoch rows/s.

    python benchmarks/speed/bench_precision.py parts --rows 20000 --threads 1 --rounds 10 --steps 8
    python benchmarks/speed/bench_precision.py train --rows 60000 --rounds 5 --threads 1 --variants before,recmtl
"""
from __future__ import annotations

import argparse
import functools
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


#: ``train --model``: the tower (and batch) of each model measured; the funnel benchmark model is the default.
#: ``init``: what ``recmtl init`` writes for a funnel set of ~240k training rows (narrow MMoE, batch 1,024);
#: ``census``: census_income.py's MMoE (8 experts [16], towers [8]) on census-income, batch 2,048.
MODELS = {
    "benchmark": ({"name": "mmoe", "num_experts": 4, "expert_units": [256, 128], "task_units": [64]}, 2048),
    "init": ({"name": "mmoe", "num_experts": 4, "expert_units": [64], "task_units": [32], "dropout": 0.1}, 1024),
    "shared_bottom_small": ({"name": "shared_bottom", "bottom_units": [128], "task_units": [32]}, 1024),
    "census": ({"name": "mmoe", "num_experts": 8, "expert_units": [16], "task_units": [8]}, 2048),
}


def model_config(model: str, data: Path, precision: str, seed: int, census: Path | None, batch: int = 0) -> dict:
    """The raw config of one ``train`` run: the funnel features (or census-income's, from ``census``'s
    ``census.yaml`` as census_income.py writes it) with ``MODELS[model]``, one epoch, no validation."""
    import yaml
    tower, default_batch = MODELS[model]
    batch = batch or default_batch
    train = {"batch_size": batch, "epochs": 1, "progress": False, "precision": precision}
    if model == "census":
        if census is None or not (census / "census.yaml").is_file():
            raise SystemExit("train --model census: pass --census-dir, a folder where "
                             "benchmarks/quality/census_income.py prepared census.yaml and its Parquet files")
        raw = yaml.safe_load((census / "census.yaml").read_text())
        raw["data"] = {"train": str(census / "train.parquet")}
        raw["encoders"] = {"categorical": {"name": "embedding", "dim": 16}}
        return raw | {"seed": seed, "tower": tower, "train": train}
    return {"seed": seed, "data": {"train": str(data / "train.parquet")}, "features": features(),
            "tasks": [{"name": "click", "head": "binary"},
                      {"name": "conversion", "head": "esmm", "params": {"ctr_task": "click"}}],
            "encoders": {"categorical": {"name": "embedding", "dim": 16}}, "tower": tower, "train": train}


def bench_train(rows: int, rounds: int, work: Path, model: str = "benchmark", census: Path | None = None,
                precisions: tuple[str, ...] = ("auto", "fp32", "bf16"), variants: tuple[str, ...] = ("recmtl",),
                threads: int | None = None) -> dict:
    """Epoch rows/s of each precision (and, with more than the ``recmtl`` variant, of each optimiser variant of
    :data:`OPTIMIZERS`, patched into the loop: keys ``precision/variant``), interleaved over the rounds; ``threads``:
    ``train.threads`` (default: the loop's own choice)."""
    from unittest import mock

    from recmtl.config import parse_config
    from recmtl.data.synthetic import funnel
    from recmtl.registry import load_registry
    from recmtl.training.device import PrecisionProbe, cpu_bf16_units, resolve_precision
    from recmtl.training.loop import train

    data = work / "data"
    if model != "census" and not (data / "train.parquet").is_file():
        funnel(data, rows=rows, seed=0)
    registry = load_registry()
    plain = variants == ("recmtl",)
    runs = {(p if plain else f"{p}/{v}"): (p, v) for p in precisions for v in variants}
    reference = "fp32" if plain else f"fp32/{variants[0]}"
    results: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}  # CPU seconds of the whole run (fit pass, epoch, checkpoint)
    resolved: dict[str, str] = {}
    for r in range(rounds):
        for key, (precision, variant) in runs.items():
            raw = model_config(model, data, "auto" if precision == "auto-full" else precision, r, census)
            if threads:
                raw["train"]["threads"] = threads
            out = work / f"run_{model}_{key.replace('/', '_')}_{r}"
            probe = functools.partial(PrecisionProbe, early_pairs=0) if precision == "auto-full" else PrecisionProbe
            c0 = time.process_time()
            with (mock.patch("recmtl.training.loop.make_optimizers", OPTIMIZERS[variant]),
                  mock.patch("recmtl.training.loop.PrecisionProbe", probe)):
                summary = train(parse_config(raw, work, "bench"), out, registry)
            cpu[key].append(time.process_time() - c0)
            results[key].append(summary["history"][0]["rows_per_s"])
            resolved[key] = json.loads((out / "run.json").read_text())["precision"]["reason"]
            print(f"round {r + 1} {model} {key}: {results[key][-1]:,.0f} rows/s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    ratios = {k: statistics.median(a / b for a, b in zip(v, results[reference])) for k, v in results.items()}
    return {"model": model, "tower": MODELS[model][0], "batch_size": MODELS[model][1],
            "auto_resolves_to": resolve_precision("auto", torch.device("cpu")), "bf16_units": cpu_bf16_units(),
            "resolved": resolved, "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
            "rounds": rounds, "rows_per_s": results, "median_rows_per_s": med,
            "over_fp32": {k: v / med[reference] for k, v in med.items()}, "median_round_ratio_over_fp32": ratios,
            "run_cpu_s": cpu, "run_cpu_ratio_reference_over": {
                k: statistics.median(b / a for a, b in zip(v, cpu[reference])) for k, v in cpu.items()}}


def sampled_batches(model_name: str, rows: int, work: Path, census: Path | None, steps: int, batch: int = 0):
    """``(config, registry, schema, batches)``: ``model_name``'s fp32 config on the funnel data in ``work/data``
    (generated with ``rows`` rows when missing), its fitted schema and its first ``steps`` training batches."""
    from recmtl.config import parse_config
    from recmtl.data.parquet import ParquetSource
    from recmtl.data.synthetic import funnel
    from recmtl.registry import load_registry
    from recmtl.schema import fit_schema
    from recmtl.training.batches import blocks, minibatches
    from recmtl.training.model import validate_plugins

    data = work / "data"
    if not (data / "train.parquet").is_file():
        funnel(data, rows=rows, seed=0)
    registry = load_registry()
    cfg = parse_config(model_config(model_name, data, "fp32", 0, census, batch), work, "bench")
    heads = validate_plugins(cfg, registry)
    src = ParquetSource(cfg.resolve(cfg.data.train), cfg.columns())
    schema = fit_schema(cfg, src, {t.name: heads[t.name] for t in cfg.tasks})
    batches = []
    for b in minibatches(blocks(src, schema, 65536), cfg.train.batch_size):
        batches.append(b)
        if len(batches) == steps:
            break
    return cfg, registry, schema, batches


def step_runners(rows: int, work: Path, models: list[str], census: Path | None, steps: int, batch: int = 0,
                 modes: tuple[str, ...] = ("fp32", "bf16")) -> dict:
    """{(model, mode): a function running ``steps`` training steps as the loop takes them (autocast forward and
    losses, zero_grad, the balancer's backward, the optimizers' steps) on the same pre-built batches}."""
    from recmtl.training.device import Precision
    from recmtl.training.model import MultiTaskModel
    from recmtl.training.optimizers import make_optimizers

    runners = {}
    for model_name in models:
        cfg, registry, schema, batches = sampled_batches(model_name, rows, work, census, steps, batch)
        for mode in modes:
            torch.manual_seed(0)
            model = MultiTaskModel(cfg, schema, registry)
            balancer = registry.create("balancer", cfg.balancer.name, model.task_names,
                                       {t.name: t.weight for t in cfg.tasks})
            optimizers = make_optimizers(cfg, model, balancer)
            precision = Precision(mode, torch.device("cpu"))

            def block(model=model, balancer=balancer, optimizers=optimizers, precision=precision, batches=batches):
                shared = model.shared_parameters()
                for batch in batches:
                    with precision.autocast():
                        losses = model.losses(model(batch.inputs), batch.labels, batch.mask)
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=True)
                    balancer.backward(precision.scale_losses(losses), shared)
                    precision.step(optimizers)
            block()  # warm-up: optimizer state, allocator
            runners[(model_name, mode)] = block
    return runners


def bench_step(rows: int, rounds: int, work: Path, models: list[str], census: Path | None, threads: int,
               steps: int = 8, batch: int = 0) -> dict:
    """Training-step cost of each model in fp32 and under bf16 autocast, in one process: the loop's step
    (forward, losses, balancer backward, optimizer steps) on the same pre-built batches, ``steps`` steps per
    block, blocks of every (model, precision) shuffled within each round; medians of wall and CPU ms per step."""
    import random

    torch.set_num_threads(threads)
    runners = step_runners(rows, work, models, census, steps, batch)
    wall: dict = {k: [] for k in runners}
    cpu: dict = {k: [] for k in runners}
    for r in range(rounds):
        order = list(runners)
        random.shuffle(order)
        for k in order:
            t0, c0 = time.perf_counter(), time.process_time()
            runners[k]()
            wall[k].append(1000 * (time.perf_counter() - t0) / steps)
            cpu[k].append(1000 * (time.process_time() - c0) / steps)
    out = {}
    for m in models:
        w = {p: statistics.median(wall[(m, p)]) for p in ("fp32", "bf16")}
        c = {p: statistics.median(cpu[(m, p)]) for p in ("fp32", "bf16")}
        per_round = [a / b for a, b in zip(wall[(m, "fp32")], wall[(m, "bf16")])]
        out[m] = {"tower": MODELS[m][0], "batch_size": batch or MODELS[m][1], "wall_ms": w, "cpu_ms": c,
                  "bf16_speedup_wall": w["fp32"] / w["bf16"], "bf16_speedup_cpu": c["fp32"] / c["bf16"],
                  "bf16_speedup_median_round": statistics.median(per_round)}
        print(f"{m}: fp32 {w['fp32']:.1f} ms, bf16 {w['bf16']:.1f} ms a step (wall); cpu {c['fp32']:.1f} / "
              f"{c['bf16']:.1f} ms; bf16 speed-up {out[m]['bf16_speedup_wall']:.2f}x wall, "
              f"{out[m]['bf16_speedup_cpu']:.2f}x cpu", file=sys.stderr, flush=True)
    return {"threads": threads, "rounds": rounds, "steps_per_block": steps, "torch": torch.__version__,
            "models": out}


#: torch.profiler's operator names grouped into the parts of a step (first match wins; the rest: "other")
PROFILE_GROUPS = [
    ("optimizer step", ("Optimizer.step", "_single_tensor", "_multi_tensor", "sparse_adam", "adam", "adagrad",
                        "_foreach")),
    ("sparse embedding", ("embedding", "_sparse", "coalesce", "index_select", "index_add", "sparse", "_indices",
                          "_values", "unique")),
    ("matmul", ("addmm", "mm", "bmm", "matmul", "linear", "baddbmm", "einsum")),
    ("casts / copies", ("_to_copy", "aten::to", "copy_", "contiguous", "clone")),
    ("loss / metrics", ("binary_cross_entropy", "log_sigmoid", "softplus", "nll", "log_softmax")),
]


def bench_profile(rows: int, work: Path, model: str, census: Path | None, threads: int, steps: int = 8) -> dict:
    """torch.profiler over ``steps`` training steps of ``model`` in fp32 and bf16 (one warm-up block first): self
    CPU time per operator, the top operators and the totals per part of the step (:data:`PROFILE_GROUPS`)."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    runners = step_runners(rows, work, [model], census, steps)
    out = {}
    for (_, mode), run in runners.items():
        run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events)
        groups: dict[str, float] = {}
        for e in events:
            name = e.key.lower()
            part = next((g for g, keys in PROFILE_GROUPS if any(k.lower() in name for k in keys)), "other")
            groups[part] = groups.get(part, 0.0) + e.self_cpu_time_total
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:20]
        out[mode] = {"self_cpu_ms_per_step": total / 1000 / steps,
                     "parts_ms_per_step": {g: round(v / 1000 / steps, 2) for g, v in
                                           sorted(groups.items(), key=lambda kv: -kv[1])},
                     "top_ms_per_step": {e.key: round(e.self_cpu_time_total / 1000 / steps, 2) for e in top}}
        print(f"{mode}: {out[mode]['self_cpu_ms_per_step']:.1f} ms self CPU a step; "
              + ", ".join(f"{g} {v}" for g, v in out[mode]["parts_ms_per_step"].items()), file=sys.stderr)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    return {"model": model, "threads": threads, "steps": steps, "profile": out}


#: torch.profiler operator names counted as matrix products (their self time is the GEMM kernels' time)
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::linear", "aten::matmul",
            "aten::einsum", "aten::_addmm_activation", "aten::addmm_", "mkldnn::_linear_pointwise"}
def optimizers_before(config, model, balancer) -> list[torch.optim.Optimizer]:
    """The benchmark model's optimisers as ``make_optimizers`` built them before issue 21's step work: the dense
    ``torch.optim.Adam`` (not fused) and ``torch.optim.SparseAdam`` (no embedding weight decay)."""
    from recmtl.training.model import sparse_parameters
    from recmtl.training.optimizers import dense_groups
    sparse = sparse_parameters(model)
    dense = [p for p in list(model.parameters()) + list(balancer.parameters()) if all(p is not s for s in sparse)]
    lr = config.optimizer.lr
    return [torch.optim.Adam(dense_groups(model, dense, lr), lr=lr, weight_decay=config.optimizer.weight_decay),
            torch.optim.SparseAdam(sparse, lr=config.optimizer.embedding_lr or lr)]


def _make_optimizers(config, model, balancer) -> list[torch.optim.Optimizer]:
    from recmtl.training.optimizers import make_optimizers
    return make_optimizers(config, model, balancer)


#: ``--variants``: the optimisers compared (``parts``, ``train``)
OPTIMIZERS = {"before": optimizers_before, "recmtl": _make_optimizers}
#: the parts of a step :func:`bench_parts` times, in order
PARTS = ("forward", "zero_grad", "backward", "dense_opt", "sparse_opt", "metrics")


def part_runners(rows: int, work: Path, variants: tuple[str, ...], steps: int,
                 modes: tuple[str, ...] = ("fp32", "bf16")) -> dict:
    """{(mode, variant): a function running ``steps`` steps of the benchmark model on the same pre-built batches and
    returning each part's (:data:`PARTS`) wall and CPU seconds per step}. Variant ``before``: the optimisers as
    ``make_optimizers`` built them before issue 21's step work (:func:`optimizers_before`); ``recmtl``:
    ``make_optimizers`` as it is."""
    from recmtl.training.device import Precision
    from recmtl.training.model import MultiTaskModel

    cfg, registry, schema, batches = sampled_batches("benchmark", rows, work, None, steps)
    runners = {}
    for mode in modes:
        for variant in variants:
            torch.manual_seed(0)
            model = MultiTaskModel(cfg, schema, registry)
            balancer = registry.create("balancer", cfg.balancer.name, model.task_names,
                                       {t.name: t.weight for t in cfg.tasks})
            if variant not in OPTIMIZERS:
                raise SystemExit(f"parts: unknown variant {variant!r}; expected one of {', '.join(OPTIMIZERS)}")
            dense_opt, sparse_opt = OPTIMIZERS[variant](cfg, model, balancer)
            precision = Precision(mode, torch.device("cpu"))

            def block(model=model, balancer=balancer, dense_opt=dense_opt, sparse_opt=sparse_opt,
                      precision=precision) -> dict[str, list[tuple[float, float]]]:
                shared = model.shared_parameters()
                spent: dict[str, list[tuple[float, float]]] = {k: [] for k in PARTS}
                for batch in batches:
                    marks = [(time.perf_counter(), time.process_time())]
                    with precision.autocast():
                        losses = model.losses(model(batch.inputs), batch.labels, batch.mask)
                    marks.append((time.perf_counter(), time.process_time()))
                    dense_opt.zero_grad(set_to_none=True)
                    sparse_opt.zero_grad(set_to_none=True)
                    marks.append((time.perf_counter(), time.process_time()))
                    balancer.backward(precision.scale_losses(losses), shared)
                    marks.append((time.perf_counter(), time.process_time()))
                    dense_opt.step()
                    marks.append((time.perf_counter(), time.process_time()))
                    sparse_opt.step()
                    marks.append((time.perf_counter(), time.process_time()))
                    _ = {t: v.item() for t, v in losses.items()}  # the loop's running loss sums
                    marks.append((time.perf_counter(), time.process_time()))
                    for k, (a, b) in zip(PARTS, zip(marks[:-1], marks[1:])):
                        spent[k].append((b[0] - a[0], b[1] - a[1]))
                return spent
            block()  # warm-up: optimizer state, allocator
            runners[(mode, variant)] = block
    return runners


def bench_parts(rows: int, work: Path, threads: int, rounds: int, variants: tuple[str, ...], steps: int = 8) -> dict:
    """Where the benchmark model's training step goes, fp32 and bf16, per optimiser ``variants``
    (:func:`part_runners`): each part's wall and CPU ms per step (medians over ``rounds`` x ``steps`` steps, blocks
    of every (precision, variant) shuffled within each round), and in each round one torch.profiler block of each:
    the self time in matrix products (:data:`GEMM_OPS`) and in the rest (the profiler's times are wall times, so
    their shares are what to read on a loaded machine), the top other operators, and the bound a CPU with
    infinitely fast matrix units would reach: the fp32 step over the step without its GEMM time."""
    import random

    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    runners = part_runners(rows, work, variants, steps)
    times: dict = {k: {p: [] for p in PARTS} for k in runners}
    steps_wall: dict = {k: [] for k in runners}
    steps_cpu: dict = {k: [] for k in runners}
    ratio: dict = {k: [] for k in runners}  # each block's CPU time over the same round's (fp32, first variant)
    op_ms: dict = {k: {} for k in runners}
    first = ("fp32", variants[0])
    for r in range(rounds):
        order = list(runners)
        random.shuffle(order)
        block_cpu = {}
        for k in order:
            spent = runners[k]()
            for p, xs in spent.items():
                times[k][p].extend(xs)
            per_step = [sum(spent[p][i][j] for p in PARTS) for i in range(steps) for j in (0, 1)]
            steps_wall[k].extend(per_step[0::2])
            steps_cpu[k].extend(per_step[1::2])
            block_cpu[k] = sum(per_step[1::2])
        for k in runners:
            ratio[k].append(block_cpu[first] / block_cpu[k])
        for k in order:  # then one profiled block of each: the operators' self time, summed over the rounds
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                runners[k]()
            for e in prof.key_averages():
                op_ms[k][e.key] = op_ms[k].get(e.key, 0.0) + e.self_cpu_time_total / 1000 / steps / rounds
        print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    out: dict = {}
    for k in runners:
        total = sum(op_ms[k].values())
        gemm = sum(v for op, v in op_ms[k].items() if op in GEMM_OPS)
        others = sorted((op for op in op_ms[k] if op not in GEMM_OPS), key=lambda op: -op_ms[k][op])[:12]
        med = {p: (1000 * statistics.median(w for w, _ in v), 1000 * statistics.median(c for _, c in v))
               for p, v in times[k].items()}
        out[f"{k[0]}/{k[1]}"] = {
            "step_ms": {"wall": 1000 * statistics.median(steps_wall[k]), "cpu": 1000 * statistics.median(steps_cpu[k])},
            "parts_ms": {p: {"wall": round(w, 2), "cpu": round(c, 2)} for p, (w, c) in med.items()},
            "speed_over_first_cpu": {"median_round_ratio": statistics.median(ratio[k]), "per_round": ratio[k]},
            "profile_ms": {"total": round(total, 2), "gemm": round(gemm, 2), "rest": round(total - gemm, 2),
                           "gemm_share": round(gemm / total, 3), "matmuls_free_bound": round(total / (total - gemm), 2)},
            "top_rest_ms": {op: round(op_ms[k][op], 2) for op in others}}
    for v in variants:  # AMX's ceiling: fp32 step over the bf16 step without its GEMM time (bf16 casts stay)
        f32, b16 = out[f"fp32/{v}"]["profile_ms"], out[f"bf16/{v}"]["profile_ms"]
        out[f"bound/{v}"] = {"fp32_over_fp32_rest": round(f32["total"] / f32["rest"], 2),
                             "fp32_over_bf16_rest": round(f32["total"] / b16["rest"], 2),
                             "bf16_over_bf16_rest": round(b16["total"] / b16["rest"], 2)}
    for k, v in out.items():
        print(k, json.dumps(v), file=sys.stderr)
    return {"threads": threads, "rounds": rounds, "steps_per_block": steps, "torch": torch.__version__,
            "parts": out}


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


QUANT_VARIANTS = {  # name: (precision, to_int8_static keywords, onnxruntime graph optimisation)
    "fp32": ("fp32", {}, "all"), "fp32@basic": ("fp32", {}, "basic"),
    "int8-dynamic": ("int8", {}, "all"),
    "static-qdq": ("int8-static", {}, "all"), "static-qdq@basic": ("int8-static", {}, "basic"),
    "static-qdq-per-channel": ("int8-static", {"per_channel": True}, "all"),
    "static-qdq-s8s8": ("int8-static", {"activation_type": "int8"}, "all"),
    "static-qdq-reduce-range": ("int8-static", {"reduce_range": True}, "all"),
    "static-qoperator": ("int8-static", {"quant_format": "qoperator"}, "all"),
}


def bench_quant(run_dir: Path, data: str, sample: str, rounds: int, threads: int, work: Path,
                score_variants: list[str], score_rows: int) -> dict:
    import collections
    import os

    import onnx
    import onnxruntime as ort
    import pyarrow.parquet as pq

    from recmtl.export import precision as lowp
    from recmtl.serving.score import Scorer, to_feeds
    from recmtl.training.evaluate import load_run
    fp32 = work / "fp32.onnx"
    if not fp32.is_file():
        subprocess.run([RECMTL, "export", str(run_dir), "-o", str(fp32), "--sample", sample], check=True,
                       capture_output=True)
    run = load_run(run_dir)
    base = onnx.load(str(fp32))
    scorer = Scorer(fp32)
    cal = pq.read_table(run.config.resolve(run.config.data.validation), columns=run.schema.feature_columns)
    feeds = to_feeds(cal.slice(0, lowp.CALIBRATION_ROWS), scorer.inputs)
    calibration = [{k: v[i:i + 256] for k, v in feeds.items()} for i in range(0, lowp.CALIBRATION_ROWS, 256)]
    held_out = pq.read_table(sample)
    files, quality, sizes = {}, {}, {}
    for name, (precision, kw, _) in QUANT_VARIANTS.items():
        path = work / f"{name.split('@')[0]}.onnx"
        if not path.is_file():
            model = lowp.to_int8_static(base, calibration, **kw) if precision == "int8-static" else \
                lowp.convert(base, precision)
            onnx.save_model(model, str(path))
        files[name], sizes[name] = path, path.stat().st_size
        if precision != "fp32" and name not in quality:
            quality[name] = {t: {k: q[k] for k in ("metric", "fp32", "value", "delta", "max_abs")}
                             for t, q in lowp.quality(run, fp32, path, held_out).items()}
    timing = to_feeds(held_out.slice(0, 8192), scorer.inputs)
    chunks = [{k: v[i:i + 1024] for k, v in timing.items()} for i in range(0, 8192, 1024)]
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
    sessions, kernels = {}, {}
    for name, (_, _, level) in QUANT_VARIANTS.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.graph_optimization_level = levels[level]
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        prof = ort.SessionOptions()  # a second, profiled session for the table of kernels
        prof.intra_op_num_threads, prof.inter_op_num_threads = threads, 1
        prof.graph_optimization_level = levels[level]
        prof.enable_profiling, prof.profile_file_prefix = True, str(work / f"profile_{name}")
        prof.log_severity_level = 3
        sessions[name] = ort.InferenceSession(str(files[name]), opts, providers=["CPUExecutionProvider"])
        profiled = ort.InferenceSession(str(files[name]), prof, providers=["CPUExecutionProvider"])
        for c in chunks:
            profiled.run(scorer.tasks, c)
        trace = profiled.end_profiling()
        by: collections.Counter = collections.Counter()
        for event in json.loads(Path(trace).read_text()):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                by[event["args"]["op_name"]] += event["dur"]
        os.remove(trace)
        kernels[name] = {"total_ms": sum(by.values()) / 1000,
                         "top": {k: round(v / 1000, 1) for k, v in by.most_common(5)}}
    graph: dict[str, list[float]] = {k: [] for k in sessions}
    graph_cpu: dict[str, list[float]] = {k: [] for k in sessions}  # rows per CPU second: less hit by neighbours
    ratio: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(rounds):
        for name, sess in sessions.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for c in chunks:
                sess.run(scorer.tasks, c)
            graph[name].append(8192 / (time.perf_counter() - t0))
            graph_cpu[name].append(8192 / (time.process_time() - c0))
        for name in sessions:
            ratio[name].append(graph[name][-1] / graph["fp32"][-1])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in graph.items()), file=sys.stderr, flush=True)
    rows_file = work / "score_input.parquet"
    if not rows_file.is_file():
        pq.write_table(pq.read_table(data).slice(0, score_rows), rows_file)
    n = pq.ParquetFile(rows_file).metadata.num_rows
    import resource
    score: dict[str, list[float]] = {k: [] for k in score_variants}
    score_cpu: dict[str, list[float]] = {k: [] for k in score_variants}
    score_ratio: dict[str, list[float]] = {k: [] for k in score_variants}

    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime
    for r in range(rounds):
        for name in score_variants:
            t0, c0 = time.perf_counter(), children_cpu()
            subprocess.run([RECMTL, "score", str(files[name]), str(rows_file), "-o", str(work / "scores.parquet"),
                            "--no-progress", "--threads", str(threads)], check=True, capture_output=True)
            score[name].append(n / (time.perf_counter() - t0))
            score_cpu[name].append(n / (children_cpu() - c0))
        for name in score_variants:
            score_ratio[name].append(score[name][-1] / score[score_variants[0]][-1])
        print(f"score round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in score.items()), file=sys.stderr,
              flush=True)
    med = {k: statistics.median(v) for k, v in graph.items()}
    smed = {k: statistics.median(v) for k, v in score.items()}
    cmed = {k: statistics.median(v) for k, v in graph_cpu.items()}
    scmed = {k: statistics.median(v) for k, v in score_cpu.items()}
    return {"threads": threads, "rounds": rounds, "onnxruntime": ort.__version__, "bytes": sizes, "quality": quality,
            "graph_rows_per_s": graph, "graph_median": med,
            "graph_median_over_fp32": {k: v / med["fp32"] for k, v in med.items()},
            "graph_median_round_ratio": {k: statistics.median(v) for k, v in ratio.items()}, "kernels": kernels,
            "graph_rows_per_cpu_s": graph_cpu, "graph_cpu_median_over_fp32": {k: v / cmed["fp32"] for k, v in cmed.items()},
            "score_rows": n, "score_rows_per_s": score, "score_median": smed,
            "score_median_over_first": {k: v / smed[score_variants[0]] for k, v in smed.items()},
            "score_median_round_ratio": {k: statistics.median(v) for k, v in score_ratio.items()},
            "score_rows_per_cpu_s": score_cpu,
            "score_cpu_median_over_first": {k: v / scmed[score_variants[0]] for k, v in scmed.items()}}


def stages(model: str, data: str, threads: int, batch_size: int, read_rows: int = 65_536) -> dict:
    """Where ``recmtl score``'s time goes, in one process, every stage in turn (no overlap): wall and CPU seconds of
    the session load, the Parquet read, ``to_feeds``, onnxruntime, building the output batch and the Parquet write."""
    import pyarrow.parquet as pq

    from recmtl.data.parquet import ParquetSource
    from recmtl.serving.score import Scorer, to_feeds
    spent = {k: [0.0, 0.0] for k in ("session", "read", "to_feeds", "onnxruntime", "build", "write")}

    def timed(key: str, fn, *args):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args)
        spent[key][0] += time.perf_counter() - t0
        spent[key][1] += time.process_time() - c0
        return out
    scorer = timed("session", Scorer, model, threads)
    source = ParquetSource(data, read_dictionary=scorer.string_columns)
    schema = pa_schema(scorer)
    start, rows = time.perf_counter(), 0
    with tempfile.TemporaryDirectory() as tmp, pq.ParquetWriter(f"{tmp}/o.parquet", schema, use_dictionary=[]) as w:
        batches = source.batches(read_rows=read_rows, columns=[i.name for i in scorer.inputs])
        while (batch := timed("read", next, batches, None)) is not None:
            feeds = timed("to_feeds", to_feeds, batch, scorer.inputs)
            parts = timed("onnxruntime", scorer.run, feeds, batch.num_rows, batch_size)
            out = timed("build", scorer.assemble, batch, parts)
            timed("write", w.write_batch, out.cast(schema))
            rows += batch.num_rows
    wall = time.perf_counter() - start
    return {"model": model, "rows": rows, "threads": threads, "batch_size": batch_size, "loop_s": wall,
            "rows_per_s": rows / wall, "wall_s": {k: v[0] for k, v in spent.items()},
            "cpu_s": {k: v[1] for k, v in spent.items()}}


def pa_schema(scorer):
    import pyarrow as pa
    return pa.schema([pa.field(t, scorer.output_type(t)) for t in scorer.tasks])


def bench_e2e(variants: list[str], data: str, rounds: int, threads: list[int], work: Path,
              batch_size: int | None) -> dict:
    """``recmtl score`` (subprocess) of the models ``name=MODEL[:RECMTL]`` (RECMTL: another checkout's ``recmtl``, to
    compare code) on ``data``, every variant and thread count in each round; wall rows/s, child CPU, ratios to the
    first variant within each round, and where the time goes in one process (``stages``)."""
    import resource

    import pyarrow.parquet as pq
    n = pq.ParquetFile(data).metadata.num_rows
    spec = {}
    for v in variants:
        name, rest = v.split("=", 1)
        model, _, binary = rest.partition(":")
        spec[name] = (model, binary or RECMTL)

    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime
    keys = [f"{name}@{t}" for t in threads for name in spec]
    wall: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    ratio: dict[str, list[float]] = {k: [] for k in keys}
    first = next(iter(spec))
    extra = ["--batch-size", str(batch_size)] if batch_size else []
    for r in range(rounds):
        for t in threads:
            for name, (model, binary) in spec.items():
                t0, c0 = time.perf_counter(), children_cpu()
                subprocess.run([binary, "score", model, data, "-o", str(work / "scores.parquet"), "--no-progress",
                                "--threads", str(t), *extra], check=True, capture_output=True)
                wall[f"{name}@{t}"].append(n / (time.perf_counter() - t0))
                cpu[f"{name}@{t}"].append(n / (children_cpu() - c0))
            for name in spec:
                ratio[f"{name}@{t}"].append(wall[f"{name}@{t}"][-1] / wall[f"{first}@{t}"][-1])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in wall.items()), file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    return {"rows": n, "rounds": rounds, "variants": spec, "rows_per_s": wall, "median": med,
            "median_over_first": {k: med[k] / med[f"{first}@{k.split('@')[1]}"] for k in keys},
            "median_round_ratio": {k: statistics.median(v) for k, v in ratio.items()},
            "rows_per_cpu_s": cpu, "cpu_median_over_first": {k: cmed[k] / cmed[f"{first}@{k.split('@')[1]}"] for k in keys},
            "stages": [stages(model, data, t, batch_size or 1024) for t in threads for model, _ in spec.values()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["train", "step", "profile", "parts", "score", "quant", "e2e"])
    ap.add_argument("--thread-counts", default="1,2", help="e2e: onnxruntime threads to run each model with")
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--run", type=Path)
    ap.add_argument("--data")
    ap.add_argument("--sample")
    ap.add_argument("--threads", type=int, help="torch / onnxruntime threads (default 2; train: train.threads, "
                    "default the loop's own choice)")
    ap.add_argument("--work-dir", type=Path)
    ap.add_argument("--model", choices=list(MODELS), default="benchmark", help="train: the model measured")
    ap.add_argument("--models", help="step: the models measured (comma-separated; default: all); e2e: "
                    "comma-separated name=MODEL.onnx[:path/to/recmtl] (the first: reference)")
    ap.add_argument("--batch-size", type=int, help="step: override every model's batch size; e2e: recmtl score "
                    "--batch-size (default: its own)")
    ap.add_argument("--census-dir", type=Path, help="train --model census: census_income.py's prepared folder")
    ap.add_argument("--precisions", default="auto,fp32,bf16", help="train: the train.precision values, in order "
                    "(auto-full: auto with the probe's early stop off, its full 12 steps)")
    ap.add_argument("--variants", help="parts, train: the optimiser variants (before: torch.optim.Adam and "
                    "SparseAdam as make_optimizers built them before; recmtl: make_optimizers); parts' default "
                    "before,recmtl, train's recmtl")
    ap.add_argument("--steps", type=int, default=8, help="parts: steps per block")
    ap.add_argument("--reuse", action="store_true", help="score: keep the models already in --work-dir")
    ap.add_argument("--score-variants", default="fp32,int8-dynamic,static-qdq,static-qoperator",
                    help="quant: the variants `recmtl score` runs (the first is the reference)")
    ap.add_argument("--score-rows", type=int, default=60_000, help="quant: rows of --data `recmtl score` reads")
    args = ap.parse_args()
    if args.what != "train":
        args.threads = args.threads or 2
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.what == "train":
            result = bench_train(args.rows, args.rounds, work, args.model, args.census_dir,
                                 tuple(args.precisions.split(",")), tuple((args.variants or "recmtl").split(",")),
                                 args.threads)
        elif args.what == "step":
            result = bench_step(args.rows, args.rounds, work, (args.models or ",".join(MODELS)).split(","), args.census_dir, args.threads,
                                batch=args.batch_size or 0)
        elif args.what == "parts":
            result = bench_parts(args.rows, work, args.threads, args.rounds, tuple((args.variants or "before,recmtl").split(",")),
                                 args.steps)
        elif args.what == "profile":
            result = bench_profile(args.rows, work, args.model, args.census_dir, args.threads)
        elif args.what == "e2e":
            result = bench_e2e(args.models.split(","), args.data, args.rounds,
                               [int(t) for t in args.thread_counts.split(",")], work, args.batch_size)
        elif args.what == "quant":
            result = bench_quant(args.run, args.data, args.sample, args.rounds, args.threads, work,
                                 args.score_variants.split(","), args.score_rows)
        else:
            result = bench_score(args.run, args.data, args.sample, args.rounds, args.threads, work, args.reuse)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
