"""Training throughput: `recmtl train` from Parquet against the same model trained from tensors in memory.

Two measurements (see benchmarks/RESULTS.md for recorded figures):

1. Pipeline cost. For each tower (shared-bottom and MMoE) and each of ``--rounds`` interleaved rounds:
   * baseline: the same recmtl model (``MultiTaskModel`` from the fitted schema), the same optimisers
     (``recmtl.training.optimizers.make_optimizers``) and balancer, trained for one epoch on tensors already in memory:
     every row preprocessed up front, permuted once, then plain slicing into batches (no DataLoader);
   * pipeline: the real training loop, ``recmtl.training.loop.train`` with ``epochs=1`` and the progress bar off,
     reading Parquet; its ``rows_per_s`` comes from the ``metrics.json`` history (the epoch loop only:
     the fit pass, checkpoints and evaluation are not in it).
   Reported: median rows/s per side and the ratio pipeline / baseline (target >= 0.85).

2. Vocabulary size. A step's time (forward, backward, optimiser steps of the MMoE model) for ids spread
   uniformly over ``V`` ids in every one of the 26 categorical features, ``V`` in ``--vocab-sizes``; the
   models are built from a schema whose vocabularies hold exactly ``V`` ids per feature (constructed
   directly: datagen gives only user_id/item_id the full cardinality). Also timed: the schema transform
   (the id lookup of the Parquet pipeline) of the same rows. Reported: median step time per ``V`` and the
   ratio largest / smallest (target <= 1.3).

Usage: python benchmarks/speed/bench_train_throughput.py [--rows 1000000] [--rounds 3] [--work-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

import recmtl.training.loop as train_module
from recmtl.config import parse_config
from recmtl.data.parquet import ParquetSource
from recmtl.data.starter import starter_config
from recmtl.data.synthetic import funnel
from recmtl.registry import load_registry
from recmtl.schema import CategoricalColumn, DenseColumn, FittedSchema, LabelColumn, fit_schema
from recmtl.training.batches import to_batch
from recmtl.training.device import Precision
from recmtl.training.loop import seed_everything
from recmtl.training.loop import train as recmtl_train
from recmtl.training.model import MultiTaskModel, validate_plugins
from recmtl.training.optimizers import make_optimizers

TOWERS = {
    "shared_bottom": {"name": "shared_bottom", "bottom_units": [256, 128], "task_units": [64]},
    "mmoe": {"name": "mmoe", "num_experts": 4, "expert_units": [256, 128], "task_units": [64]},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_config(data: Path, tower: str, args: argparse.Namespace, config_path: Path) -> dict[str, Any]:
    """The config `recmtl init` writes for this data (click binary, conversion ESMM), one epoch, no bar."""
    cfg = starter_config(str(data), ["click", "conversion"], config_path, tower=tower)["config"]
    for t in cfg["tasks"]:
        if t["name"] == "conversion":
            t["head"] = "esmm"
    cfg["encoders"] = {"categorical": {"name": "embedding", "dim": args.embedding_dim}}
    cfg["tower"] = dict(TOWERS[tower])
    cfg["train"] = {"batch_size": args.batch_size, "epochs": 1, "progress": False, "precision": args.precision,
                    "early_stopping": {"monitor": "loss", "patience": 0}}
    if args.threads:
        cfg["train"]["threads"] = args.threads
    return cfg


def train_step(model, optimizers, balancer, shared, batch, precision: Precision | None = None) -> dict[str, torch.Tensor]:
    """The body of recmtl.training.loop.train's batch loop (fp32 or bf16 autocast: no loss scaling)."""
    precision = precision or Precision("fp32", torch.device("cpu"))
    with precision.autocast():
        outputs = model(batch.inputs)
        losses = model.losses(outputs, batch.labels, batch.mask)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    balancer.backward(precision.scale_losses(losses), shared)
    precision.step(optimizers)
    return losses


def baseline_epoch(raw: dict[str, Any], config_path: Path, registry, tensors) -> float:
    """One epoch from in-memory tensors with the same model/optimisers/balancer as `recmtl train`."""
    config = parse_config(raw, config_path.parent)
    seed_everything(config.seed)
    model = MultiTaskModel(config, tensors["schema"], registry)
    weights = {t.name: t.weight for t in config.tasks}
    balancer = registry.create("balancer", config.balancer.name, [t.name for t in config.tasks], weights,
                               **config.balancer.params)
    optimizers = make_optimizers(config, model, balancer)
    shared = model.shared_parameters()
    precision = Precision(config.train.precision, torch.device("cpu"))
    model.train()
    inputs, labels, mask = tensors["inputs"], tensors["labels"], tensors["mask"]
    n, bs = len(labels), config.train.batch_size
    loss_sum = {t: 0.0 for t in model.task_names}
    rows = 0
    t0 = time.perf_counter()
    for start in range(0, n, bs):
        end = min(start + bs, n)
        batch = type("B", (), {})()
        batch.inputs = {k: v[start:end] for k, v in inputs.items()}
        batch.labels, batch.mask = labels[start:end], mask[start:end]
        losses = train_step(model, optimizers, balancer, shared, batch, precision)
        for t, loss in losses.items():
            loss_sum[t] += loss.item()
        rows += end - start
    seconds = time.perf_counter() - t0
    return rows / seconds


class TimedStream:
    """Wraps the minibatch iterator of the training loop and adds up the time spent producing batches."""

    def __init__(self, it) -> None:
        self.it, self.seconds = it, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.seconds += time.perf_counter() - t0


def pipeline_epoch(raw: dict[str, Any], config_path: Path, registry, run_dir: Path) -> tuple[float, float]:
    """One epoch of the real training loop; returns its rows/s and the share of the epoch spent waiting for
    batches (reading Parquet, transform, shuffle buffer), measured inside the same epoch."""
    config = parse_config(raw, config_path.parent)
    streams: list[TimedStream] = []
    original = train_module.minibatches

    def timed_minibatches(*a, **k):
        streams.append(TimedStream(original(*a, **k)))
        return streams[-1]

    train_module.minibatches = timed_minibatches
    try:
        summary = recmtl_train(config, run_dir, registry)
    finally:
        train_module.minibatches = original
    epoch = summary["history"][0]
    return float(epoch["rows_per_s"]), streams[0].seconds / epoch["seconds"]


def in_memory_tensors(raw: dict[str, Any], config_path: Path, registry) -> dict[str, Any]:
    """Fit the schema as `recmtl train` does, preprocess every row, permute once: tensors in memory."""
    config = parse_config(raw, config_path.parent)
    heads = validate_plugins(config, registry)
    source = ParquetSource(config.resolve(config.data.train), config.columns())
    schema = fit_schema(config, source, heads)
    table = pa.Table.from_batches(list(source.batches(read_rows=config.data.read_rows)))
    arrays = schema.transform(table)
    arrays = arrays.take(np.random.default_rng(config.seed).permutation(len(arrays)))
    batch = to_batch(arrays)
    return {"schema": schema, "inputs": batch.inputs, "labels": batch.labels, "mask": batch.mask}


def throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    data_dir = work / "funnel"
    if not (data_dir / "train.parquet").is_file():
        log(f"generating {args.rows:,} rows of funnel data into {data_dir}")
        funnel(data_dir, args.rows, seed=args.seed, cardinality=args.cardinality,
               valid_fraction=0.0, test_fraction=0.0)
    registry = load_registry()
    configs, tensors = {}, None
    for tower in args.towers:
        config_path = work / f"{tower}.yaml"
        configs[tower] = (make_config(data_dir / "train.parquet", tower, args, config_path), config_path)
    first_raw, first_path = configs[args.towers[0]]
    if args.threads:
        torch.set_num_threads(args.threads)
    tensors = in_memory_tensors(first_raw, first_path, registry)
    log(f"{len(tensors['labels']):,} rows preprocessed in memory; torch threads {torch.get_num_threads()}")
    results: dict[str, dict[str, list[float]]] = {t: {"baseline": [], "pipeline": [], "data_share": []}
                                                  for t in args.towers}
    for r in range(args.rounds):
        for tower in args.towers:
            raw, path = configs[tower]
            order = ["baseline", "pipeline"] if r % 2 == 0 else ["pipeline", "baseline"]
            for side in order:
                extra = ""
                if side == "baseline":
                    rate = baseline_epoch(raw, path, registry, tensors)
                else:
                    run_dir = work / "runs" / f"{tower}-{r}"
                    shutil.rmtree(run_dir, ignore_errors=True)
                    rate, share = pipeline_epoch(raw, path, registry, run_dir)
                    results[tower]["data_share"].append(share)
                    extra = f"  ({100 * share:.1f}% of the epoch waiting for batches)"
                results[tower][side].append(rate)
                log(f"round {r + 1}/{args.rounds} {tower:13s} {side:8s} {rate:10,.0f} rows/s{extra}")
    summary = {}
    for tower, sides in results.items():
        b, p = statistics.median(sides["baseline"]), statistics.median(sides["pipeline"])
        per_round = [pp / bb for bb, pp in zip(sides["baseline"], sides["pipeline"])]
        summary[tower] = {"baseline_rows_per_s": sides["baseline"], "pipeline_rows_per_s": sides["pipeline"],
                          "baseline_median": b, "pipeline_median": p, "ratio_of_medians": p / b,
                          "ratio_per_round": per_round, "ratio_median_of_rounds": statistics.median(per_round),
                          "data_share_per_round": sides["data_share"],
                          "data_share_median": statistics.median(sides["data_share"])}
    return summary


# ---- vocabulary size ----------------------------------------------------------------------------
def vocab_model(vocab: int, args: argparse.Namespace, registry, rng: np.random.Generator):
    """An MMoE model over a schema with exactly ``vocab`` ids in each of the 26 categorical features."""
    cat_names = [f"c{i:02d}" for i in range(1, 27)]
    dense_names = [f"d{i:02d}" for i in range(1, 14)]
    raw = {
        "data": {"train": "unused.parquet"},
        "features": [{"name": c, "kind": "categorical"} for c in cat_names]
                    + [{"name": d, "kind": "dense"} for d in dense_names],
        "tasks": [{"name": "click"}, {"name": "conversion", "head": "esmm"}],
        "encoders": {"categorical": {"name": "embedding", "dim": args.embedding_dim}},
        "tower": dict(TOWERS["mmoe"]),
        "train": {"batch_size": args.batch_size},
    }
    config = parse_config(raw)
    # the values of each feature in id order, as a fitted vocabulary would hold them (not sorted)
    vocabs = [rng.permutation(vocab).astype(np.int64) for _ in cat_names]
    schema = FittedSchema([CategoricalColumn(c, "int", v) for c, v in zip(cat_names, vocabs)],
                          [DenseColumn(d) for d in dense_names],
                          [LabelColumn("click", "click"), LabelColumn("conversion", "conversion")])
    seed_everything(0)
    model = MultiTaskModel(config, schema, registry)
    weights = {t.name: t.weight for t in config.tasks}
    balancer = registry.create("balancer", "fixed", [t.name for t in config.tasks], weights)
    optimizers = make_optimizers(config, model, balancer)
    return config, schema, vocabs, model, balancer, optimizers


def vocab_table(vocabs: list[np.ndarray], rows: int, rng: np.random.Generator) -> pa.Table:
    """Rows whose ids are spread uniformly over each feature's whole vocabulary."""
    cols: dict[str, pa.Array] = {}
    for j, v in enumerate(vocabs):
        cols[f"c{j + 1:02d}"] = pa.array(v[rng.integers(0, len(v), rows)])
    for j in range(13):
        cols[f"d{j + 1:02d}"] = pa.array(rng.normal(0, 1, rows).astype(np.float32))
    click = (rng.random(rows) < 0.2).astype(np.int8)
    cols["click"] = pa.array(click)
    cols["conversion"] = pa.array((click.astype(bool) & (rng.random(rows) < 0.2)).astype(np.int8))
    return pa.table(cols)


def vocabulary(args: argparse.Namespace) -> dict[str, Any]:
    registry = load_registry()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    bs = args.batch_size
    setups = {}
    for v in args.vocab_sizes:
        config, schema, vocabs, model, balancer, optimizers = vocab_model(v, args, registry, rng)
        table = vocab_table(vocabs, args.vocab_rows, rng)
        schema.transform(table.slice(0, 1000))  # builds the lookup index once, as the first block of an epoch does
        batches = [to_batch(schema.transform(table.slice(s, bs))) for s in range(0, args.vocab_rows - bs + 1, bs)]
        model.train()
        shared = model.shared_parameters()
        for b in batches[:args.vocab_warmup]:  # warm-up: SparseAdam allocates its state on the first step
            train_step(model, optimizers, balancer, shared, b)
        setups[v] = {"model": model, "balancer": balancer, "optimizers": optimizers, "shared": shared,
                     "batches": batches, "schema": schema, "table": table, "cursor": args.vocab_warmup}
        log(f"vocab {v:,}: {sum(p.numel() for p in model.parameters()):,} parameters")
    steps: dict[int, list[float]] = {v: [] for v in args.vocab_sizes}
    transform: dict[int, list[float]] = {v: [] for v in args.vocab_sizes}
    for r in range(args.rounds * 2):
        order = list(args.vocab_sizes) if r % 2 == 0 else list(reversed(args.vocab_sizes))
        for v in order:
            s = setups[v]
            for _ in range(args.vocab_steps):
                b = s["batches"][s["cursor"] % len(s["batches"])]
                s["cursor"] += 1
                t0 = time.perf_counter()
                losses = train_step(s["model"], s["optimizers"], s["balancer"], s["shared"], b)
                for loss in losses.values():
                    loss.item()
                steps[v].append(time.perf_counter() - t0)
            block = s["table"].slice((r * 65_536) % max(len(s["table"]) - 65_536, 1), 65_536)
            t0 = time.perf_counter()
            s["schema"].transform(block)
            transform[v].append((time.perf_counter() - t0) / block.num_rows * bs)
    out: dict[str, Any] = {"per_vocab": {}}
    for v in args.vocab_sizes:
        out["per_vocab"][str(v)] = {"step_ms_median": 1e3 * statistics.median(steps[v]),
                                    "transform_ms_per_batch_median": 1e3 * statistics.median(transform[v]),
                                    "steps_timed": len(steps[v])}
    lo, hi = str(min(args.vocab_sizes)), str(max(args.vocab_sizes))
    pv = out["per_vocab"]
    out["step_ratio"] = pv[hi]["step_ms_median"] / pv[lo]["step_ms_median"]
    out["step_plus_transform_ratio"] = ((pv[hi]["step_ms_median"] + pv[hi]["transform_ms_per_batch_median"])
                                        / (pv[lo]["step_ms_median"] + pv[lo]["transform_ms_per_batch_median"]))
    return out


def machine() -> dict[str, Any]:
    try:
        model = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="training rows of funnel data")
    ap.add_argument("--cardinality", type=int, default=1000, help="datagen --cardinality")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--embedding-dim", type=int, default=16)
    ap.add_argument("--towers", nargs="+", default=["shared_bottom", "mmoe"], choices=sorted(TOWERS))
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="train.precision of both sides (bf16: autocast in the in-memory loop too)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved baseline/pipeline rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--vocab-sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--vocab-steps", type=int, default=20, help="timed steps per vocabulary per round")
    ap.add_argument("--vocab-warmup", type=int, default=5)
    ap.add_argument("--vocab-rows", type=int, default=131_072, help="rows of constructed ids per vocabulary")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-vocab", action="store_true")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep data and runs here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = ap.parse_args(argv)

    result: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="recmtl-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not args.skip_throughput:
            result["throughput"] = throughput(args, work)
        if not args.skip_vocab:
            result["vocabulary"] = vocabulary(args)
    result["machine"]["torch_threads"] = torch.get_num_threads()

    print(f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
          f"torch {result['machine']['torch']} ({result['machine']['torch_threads']} threads), {result['machine']['date']}")
    if "throughput" in result:
        print(f"\ntraining throughput, {args.rows:,} rows, batch {args.batch_size}, medians of {args.rounds} interleaved rounds")
        print(f"{'tower':14s} {'in-memory rows/s':>17s} {'recmtl train rows/s':>20s} {'ratio':>7s} "
              f"{'waiting for batches':>20s}  per-round ratios")
        for tower, s in result["throughput"].items():
            print(f"{tower:14s} {s['baseline_median']:17,.0f} {s['pipeline_median']:20,.0f} "
                  f"{s['ratio_of_medians']:7.3f} {100 * s['data_share_median']:19.1f}%  "
                  + " ".join(f"{x:.3f}" for x in s["ratio_per_round"]))
    if "vocabulary" in result:
        v = result["vocabulary"]
        print("\nstep time vs vocabulary size (MMoE, ids uniform over V ids in each of 26 features)")
        print(f"{'V':>10s} {'step ms':>9s} {'transform ms/batch':>19s}")
        for size, s in v["per_vocab"].items():
            print(f"{int(size):10,d} {s['step_ms_median']:9.2f} {s['transform_ms_per_batch_median']:19.2f}")
        print(f"step time ratio {max(args.vocab_sizes):,} / {min(args.vocab_sizes):,}: {v['step_ratio']:.3f}"
              f"  (with the id lookup of the pipeline: {v['step_plus_transform_ratio']:.3f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
