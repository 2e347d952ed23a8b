"""The training loop: fit pass, epochs with a progress bar, validation, early stopping, atomic
checkpoints, ``--resume``, and the run directory."""
from __future__ import annotations

import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow
import torch

import recmtl
from recmtl.config import Config, dump_config
from recmtl.contracts import Balancer
from recmtl.data.parquet import ParquetSource
from recmtl.errors import ConfigError, DataError
from recmtl.progress import progress
from recmtl.registry import Registry
from recmtl.rundir import BEST, LAST, RunDir
from recmtl.schema import FittedSchema, check_types, fit_schema
from recmtl.threads import ThreadTuner, auto_threads, available_cpus
from recmtl.training.balance_log import BalanceLog
from recmtl.training.batches import blocks, minibatches
from recmtl.training.device import Precision, batches_to, resolve_precision
from recmtl.training.distributed import (
    Context,
    env_world,
    format_bytes,
    mark_sparse,
    memory_estimate,
    setup,
)
from recmtl.training.early_stopping import Monitor
from recmtl.training.evaluate import merge_predictions, predict, task_metrics
from recmtl.training.model import MultiTaskModel, sparse_parameters, validate_plugins
from recmtl.training.optimizers import make_optimizers


def env_local_world() -> int:
    """Processes ``torchrun`` started on this machine (1 without torchrun): they share its CPUs."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def say(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 talks
        print(msg, file=sys.stderr, flush=True)


@dataclass
class TrainRun:
    """What life-cycle hooks receive."""

    config: Config
    schema: FittedSchema
    model: MultiTaskModel
    balancer: Balancer
    run_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    return {"recmtl": recmtl.__version__, "torch": torch.__version__, "pyarrow": pyarrow.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def train(config: Config, run_dir: str | Path, registry: Registry, resume: bool = False) -> dict[str, Any]:
    """Train ``config`` into ``run_dir``; returns the content of ``metrics.json``."""
    run_dir = Path(run_dir)
    files = RunDir(run_dir)
    rank, world, _ = env_world()
    if config.train.batch_size % world:
        raise ConfigError(f"train.batch_size {config.train.batch_size} is the global batch and must be divisible by "
                          f"the number of processes ({world})")
    if rank == 0 and resume and not files.file(LAST).is_file():
        raise ConfigError(f"nothing to resume: {run_dir} has no {LAST}")
    if rank == 0 and not resume and files.holds_run:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    ctx = setup(config.train.device)  # under torchrun: joins the process group (recmtl/distributed.py)
    main = ctx.is_main  # only rank 0 reads and writes the run directory
    # train.threads: null -> one per CPU this process may use (affinity, cgroup quota; recmtl/threads.py)
    cpus = None if config.train.threads else available_cpus()
    threads = config.train.threads or auto_threads(torch.get_num_threads(), env_local_world(), cpus)
    torch.set_num_threads(threads)
    seed_everything(config.seed)
    heads = validate_plugins(config, registry)

    columns = config.columns()
    train_src = ParquetSource(config.resolve(config.data.train), columns)
    valid_src = ParquetSource(config.resolve(config.data.validation), columns) if config.data.validation else None
    test_src = ParquetSource(config.resolve(config.data.test), columns) if config.data.test else None
    for src in (valid_src, test_src):
        if src is not None:
            check_types(config, src)

    if not main:
        schema = None  # rank 0 fits (or loads) it and broadcasts it below
    elif resume:
        schema = FittedSchema.load(run_dir)
    else:
        with progress(train_src.num_rows, "fit schema", config.train.progress) as bar:
            schema = fit_schema(config, train_src, {t.name: heads[t.name] for t in config.tasks}, bar.update)
        run_dir.mkdir(parents=True, exist_ok=True)
        schema.save(run_dir)
        files.write_config(dump_config(config))
        files.write_run_info({"versions": versions(), "argv": sys.argv,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world_size": ctx.world,
                              "threads": {"count": threads, "source": "auto" if cpus else "train.threads",
                                          "cpu_affinity": cpus.affinity if cpus else None,
                                          "cpu_quota": cpus.quota if cpus else None,
                                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}})
    schema = ctx.broadcast_object(schema)

    model = MultiTaskModel(config, schema, registry)
    weights = {t.name: t.weight for t in config.tasks}
    balancer = registry.create("balancer", config.balancer.name, [t.name for t in config.tasks], weights,
                               **config.balancer.params)
    model.to(ctx.device)
    balancer.to(ctx.device)
    ctx.broadcast_state([model, balancer])  # every rank starts from rank 0's parameters
    mark_sparse(sparse_parameters(model))
    precision = Precision(resolve_precision(config.train.precision, ctx.device), ctx.device)
    optimizers = make_optimizers(config, model, balancer)
    _report_memory(config, schema, model, balancer, optimizers, ctx, precision)
    monitor = Monitor(config.train.early_stopping.monitor, model)
    shared = model.shared_parameters()
    # train.threads: null on one CPU process: the thread count follows the measured speed (recmtl/threads.py)
    tuner = ThreadTuner(threads) if cpus and ctx.world == 1 and ctx.device.type == "cpu" else None
    run = TrainRun(config, schema, model, balancer, run_dir)
    hook = registry.pm.hook
    balance_log = BalanceLog(files.balance_log, config.train.log_every if main else 0, model.task_names)

    start_epoch, best, best_epoch, bad_epochs = 0, None, -1, 0
    if resume:
        state = ctx.broadcast_object(files.load_checkpoint(LAST) if main else None)
        model.load_state_dict(state["model"])
        precision.load_state_dict(state.get("amp", {}))
        balancer.load_state_dict(state["balancer"])
        for opt, opt_state in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        start_epoch, best, best_epoch, bad_epochs = state["epoch"] + 1, state["best"], state["best_epoch"], state["bad_epochs"]
        run.history = state["history"]
        balance_log.step = state.get("global_step", 0)
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        say(f"resuming {run_dir} after epoch {state['epoch'] + 1} (best {monitor.spec} = {best} at epoch {best_epoch + 1})")
        if state.get("stopped_early"):
            say("the run had stopped early; nothing to train")
            start_epoch = config.train.epochs
        elif start_epoch >= config.train.epochs:
            say(f"the run already trained {start_epoch} epochs (train.epochs = {config.train.epochs}); nothing to train")

    if main:  # life-cycle hooks run on rank 0 only
        hook.recmtl_train_start(run=run)
    rank_batch = config.train.batch_size // ctx.world
    sync_params = list(model.parameters()) + list(balancer.parameters())
    balancer_state = [*balancer.parameters(), *balancer.buffers()]
    patience = config.train.early_stopping.patience
    tc = config.train
    for epoch in range(start_epoch, tc.epochs):
        rng = np.random.default_rng([config.seed, epoch])
        model.train()
        loss_sum = {t: 0.0 for t in model.task_names}
        steps, rows, t0 = 0, 0, time.perf_counter()
        applied: dict[str, float] = {}
        stream = minibatches(blocks(train_src, schema, config.data.read_rows, rng, shard=ctx.shard), rank_batch,
                             config.data.shuffle_buffer, rng)
        with progress(train_src.num_rows, f"epoch {epoch + 1}/{tc.epochs}", tc.progress and main) as bar:
            for batch in ctx.steps(batches_to(stream, ctx.device)):  # the same step count on every rank
                step_start = time.perf_counter()
                with precision.autocast():
                    outputs = model(batch.inputs)
                    losses = model.losses(outputs, batch.labels, batch.mask)
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                balance_log.before_backward(losses, shared)
                model.backward_regularization()  # the tower's extra term (e.g. soft sharing's L2), if any
                precision.scale_grads(sync_params)  # fp16: that term's gradient (alone so far) gets the loss scale
                applied = balancer.backward(precision.scale_losses(losses), shared)
                balance_log.after_backward(epoch + 1, applied)
                # gradients, and the state a balancer updates itself, averaged over ranks (no-op in one process)
                ctx.average_gradients(sync_params, balancer_state)
                precision.step(optimizers, unscaled=balancer.parameters())
                for t, loss in losses.items():
                    loss_sum[t] += loss.item()
                if tuner is not None and (changed := tuner.step(batch.rows, time.perf_counter() - step_start)):
                    torch.set_num_threads(changed)
                steps += 1
                rows += batch.rows
                bar.update(batch.rows * ctx.world)
                if steps % 50 == 0:
                    bar.set_postfix({t: f"{loss_sum[t] / steps:.4f}" for t in model.task_names}, refresh=False)
        seconds = time.perf_counter() - t0
        if tuner is not None:
            tuner.pause()  # validation and checkpoints are not steps
        if ctx.world > 1:  # every rank's losses, steps and rows
            *sums, steps, rows = ctx.all_sum([*loss_sum.values(), steps, rows])
            steps, rows = int(steps), int(rows)
            loss_sum = {t: v / ctx.world for t, v in zip(loss_sum, sums)}
            steps //= ctx.world
        if steps == 0:
            raise DataError(f"training data {train_src.spec} produced no batches")
        train_loss = {t: v / steps for t, v in loss_sum.items()}
        for t, v in train_loss.items():
            if not math.isfinite(v):
                raise DataError(f"task '{t}' training loss became {v} in epoch {epoch + 1}; lower optimizer.lr "
                                "or check the label and feature values")
        balancer.on_epoch_end(epoch, train_loss)
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss, "weights": applied,
                                  "rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1),
                                  "threads": torch.get_num_threads()}
        if valid_src is not None:
            val = _metrics(ctx, model, schema, valid_src, config, [balancer])
            record["validation"] = val
            score = monitor.value(val)
            diag = model.diagnostics()
            if diag:
                record["diagnostics"] = diag
        else:
            score = float(np.mean(list(train_loss.values())))
        record["monitor"] = {monitor.spec if valid_src is not None else "train_loss": score}
        improved = (monitor.better(score, best) if valid_src is not None else (best is None or score < best))
        if improved:
            best, best_epoch, bad_epochs = score, epoch, 0
        else:
            bad_epochs += 1
        run.history.append(record)
        summary = "  ".join(
            f"{t}: " + " ".join(f"{k}={v:.4f}" for k, v in m.items() if k in ("auc", "logloss", "rmse", "gauc", "accuracy"))
            for t, m in record.get("validation", {}).items())
        say(f"epoch {epoch + 1}: {rows / seconds:,.0f} rows/s  train loss "
            + " ".join(f"{t}={v:.4f}" for t, v in train_loss.items())
            + (f"  | valid {summary}" if summary else "") + ("  *best*" if improved else ""))
        stop = patience > 0 and bad_epochs >= patience
        state = {"model": model.state_dict(), "balancer": balancer.state_dict(),
                 "optimizers": [o.state_dict() for o in optimizers], "epoch": epoch, "best": best,
                 "best_epoch": best_epoch, "bad_epochs": bad_epochs, "history": run.history, "stopped_early": stop,
                 "global_step": balance_log.step,
                 "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}}
        state["amp"] = precision.state_dict()
        if improved and main:
            path = files.save_checkpoint(BEST, {"model": model.state_dict(), "epoch": epoch})
            hook.recmtl_checkpoint_saved(run=run, path=str(path), is_best=True)
        if main:
            path = files.save_checkpoint(LAST, state)
            hook.recmtl_checkpoint_saved(run=run, path=str(path), is_best=False)
            files.write_metrics(_summary(run.history, best_epoch, monitor.spec, None))
            hook.recmtl_epoch_end(run=run, epoch=epoch + 1, metrics=record)
        if stop:
            say(f"early stopping: {monitor.spec} did not improve for {patience} epochs; best epoch {best_epoch + 1}")
            break

    # final metrics from the best checkpoint
    best_state = files.load_checkpoint(BEST)["model"] if main else None
    model.load_state_dict(ctx.broadcast_object(best_state))
    test_metrics = None
    if test_src is not None:
        test_metrics = _metrics(ctx, model, schema, test_src, config)
    summary = _summary(run.history, best_epoch, monitor.spec, test_metrics)
    if main:
        files.write_metrics(summary)
        hook.recmtl_train_end(run=run, metrics=summary)
    ctx.barrier()
    ctx.close()
    return summary


def _metrics(ctx: Context, model: MultiTaskModel, schema: FittedSchema, source: ParquetSource, config: Config,
             others: list[torch.nn.Module] = ()) -> dict[str, dict[str, float]]:
    """Per-task metrics over all of ``source``: each rank predicts its share, rank 0 gathers the predictions
    (AUC and GAUC do not average over shards) and computes the metrics, every rank receives them."""
    ctx.broadcast_state([model, *others], buffers_only=True)  # e.g. batch-norm statistics: rank 0's
    part = predict(model, schema, source, config.train.eval_batch_size, config.data.read_rows, shard=ctx.shard)
    parts = ctx.gather_object(part)
    metrics = task_metrics(model, merge_predictions(parts, source.spec)) if ctx.is_main else None
    return ctx.broadcast_object(metrics)


def _report_memory(config: Config, schema: FittedSchema, model: MultiTaskModel, balancer: Balancer,
                   optimizers: list[torch.optim.Optimizer], ctx: Context, precision: Precision) -> None:
    """Print what one rank needs before training starts (every rank holds the whole model)."""
    row_bytes = (8 * (len(schema.categorical) + len(schema.dense)) + 8 * sum(lab.width for lab in schema.labels) + 8
                 + sum(4 * i.channels * i.height * i.width for i in schema.image)  # images: float32 C*H*W a row
                 + 8 * len(schema.sequence) * schema.sequence_width)  # sequences: int64 ids, padded
    buffered = max(config.data.shuffle_buffer, config.train.batch_size // ctx.world) + config.data.read_rows
    est = memory_estimate(model, balancer, optimizers, sparse_parameters(model), buffered, row_bytes)
    say(f"memory per rank (estimate, {ctx.world} process(es) on {ctx.device}, {precision.mode}): "
        f"parameters {format_bytes(est['parameters'])} (embedding tables {format_bytes(est['embedding_tables'])}), "
        f"gradients {format_bytes(est['gradients'])}, optimizer state {format_bytes(est['optimizer_state'])}, "
        f"data buffers {format_bytes(est['data'])}; total {format_bytes(est['total'])} plus activations")


def _summary(history: list[dict[str, Any]], best_epoch: int, monitor: str, test: dict | None) -> dict[str, Any]:
    best = history[best_epoch] if 0 <= best_epoch < len(history) else {}
    out: dict[str, Any] = {"monitor": monitor, "best_epoch": best_epoch + 1,
                           "validation": best.get("validation"), "history": history}
    if test is not None:
        out["test"] = test
    return out
