"""The training loop: fit pass, epochs with a progress bar, validation, early stopping, atomic
checkpoints, ``--resume``, and the run directory."""
from __future__ import annotations

import itertools
import math
import os
import platform
import random
import sys
import time
from collections.abc import Iterator
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
from recmtl.files import sweep_temporary_files
from recmtl.metrics import DEAD_SHARE
from recmtl.progress import progress
from recmtl.registry import Registry
from recmtl.rundir import BEST, LAST, RunDir, epoch_checkpoint
from recmtl.schema import FittedSchema, check_types, fit_schema
from recmtl.schema.fit import fit_units
from recmtl.schema.summary import format_summary, run_summary
from recmtl.threads import ThreadTuner, auto_threads, available_cpus
from recmtl.training.affinity import AffinityLog
from recmtl.training.balance_log import BalanceLog
from recmtl.training.batches import Passes, blocks, minibatches
from recmtl.training.device import Precision, PrecisionProbe, batches_to, precision_reason, resolve_precision, wants_probe
from recmtl.training.distributed import (
    Context,
    env_world,
    format_bytes,
    mark_sparse,
    memory_estimate,
    setup,
)
from recmtl.training.early_stopping import BestValue, Monitor, TaskMonitors, reference_metrics
from recmtl.training.evaluate import (
    map_scores,
    merge_predictions,
    per_task_model,
    predict,
    reliability_bins,
    score_map,
    task_metrics,
)
from recmtl.training.model import MultiTaskModel, model_for_state, resolved_config, sparse_parameters, validate_plugins
from recmtl.training.optimizers import make_optimizers
from recmtl.training.tracking import attached, build_loggers


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

    def write_report(self, out_dir: Path | None = None) -> Path:
        """``recmtl report`` for the run so far (see ``recmtl.TrainingRun``)."""
        from recmtl.report import write_report
        return write_report(self.run_dir, out_dir)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    return {"recmtl": recmtl.__version__, "torch": torch.__version__, "pyarrow": pyarrow.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def train(config: Config, run_dir: str | Path, registry: Registry, resume: bool = False,
          observers: list[Any] = ()) -> dict[str, Any]:
    """Train ``config`` into ``run_dir``; returns the content of ``metrics.json``. Rank 0 holds the run directory's
    lock while it trains (a second ``recmtl train`` into it is refused) and first sweeps the temporary files that
    interrupted writes left there. On rank 0 the config's ``loggers`` and ``observers`` (objects with ``@hookimpl``
    life-cycle methods, e.g. ``recmtl tune``'s pruning callback) receive the life-cycle hooks of this run."""
    rank, world, _ = env_world()
    if config.train.batch_size % world:
        raise ConfigError(f"train.batch_size {config.train.batch_size} is the global batch and must be divisible by "
                          f"the number of processes ({world})")
    if rank != 0:
        return _train(config, Path(run_dir), registry, resume)
    files = RunDir(run_dir)
    with files.lock():
        swept = sweep_temporary_files(files.path)
        if swept:
            say(f"removed {len(swept)} temporary file(s) left by an interrupted run: "
                + ", ".join(str(p.relative_to(files.path)) for p in swept[:5]))
        if resume and not files.file(LAST).is_file():
            if not files.file(BEST).is_file():
                raise ConfigError(f"nothing to resume: {files.path} has no {LAST}")
            say(f"{files.path} has {BEST} but no {LAST}: the run was interrupted while writing its first checkpoint; "
                "training it again from the start")
            files.discard_checkpoints()
            resume = False
        if not resume and files.holds_run:
            hint = (f"; it has no {LAST} (interrupted during its first checkpoint): pass --resume to train it again "
                    "from the start" if not files.file(LAST).is_file() else "; pass --resume to continue it")
            raise ConfigError(f"{files.path} already holds a run{hint}, or choose another --out")
        with attached(registry, [*build_loggers(config, registry), *observers]):
            return _train(config, files.path, registry, resume)


def _train(config: Config, run_dir: Path, registry: Registry, resume: bool) -> dict[str, Any]:
    files = RunDir(run_dir)
    ctx = setup(config.train.device)  # under torchrun: joins the process group (recmtl/distributed.py)
    main = ctx.is_main  # only rank 0 reads and writes the run directory
    resume = ctx.broadcast_object(resume)  # rank 0 may have turned an interrupted first epoch into a fresh start
    # train.threads: null -> one per CPU this process may use (affinity, cgroup quota; recmtl/threads.py)
    cpus = None if config.train.threads else available_cpus()
    threads = config.train.threads or auto_threads(torch.get_num_threads(), env_local_world(), cpus)
    torch.set_num_threads(threads)
    seed_everything(config.seed)
    heads = validate_plugins(config, registry)
    ref = config.train.early_stopping.reference  # delta_m's single-task metrics: a compare directory or a mapping
    reference = reference_metrics(config.resolve(ref) if isinstance(ref, str) else ref, [t.name for t in config.tasks])
    mode = resolve_precision(config.train.precision, ctx.device, say)  # bf16 on CPUs with AMX / AVX-512 BF16
    # auto on such a CPU: the first steps measure fp32 against bf16 and the faster is kept (device.py)
    probe = PrecisionProbe() if wants_probe(config.train.precision, ctx.device, ctx.world) else None

    columns = config.columns()
    train_src = ParquetSource(config.resolve(config.data.train), columns)
    valid_src = ParquetSource(config.resolve(config.data.validation), columns) if config.data.validation else None
    test_src = ParquetSource(config.resolve(config.data.test), columns) if config.data.test else None
    for src in (valid_src, test_src):
        if src is not None:
            check_types(config, src)

    heads_by_task = {t.name: t.head for t in config.tasks}
    label_text = None  # the label summary, printed once the model is built
    if resume and not main:
        schema = None  # rank 0 loads it and broadcasts it below
    elif resume:
        schema = FittedSchema.load(run_dir)
        saved = (files.read_run_info() or {}).get("labels")
        label_text = format_summary(saved, heads_by_task) if isinstance(saved, dict) else None  # the run's start
    else:  # the sharded fit pass: every rank counts its row groups, every rank gets the schema
        share = sum(train_src.unit_rows[u] for u in fit_units(train_src, ctx.rank, ctx.world))
        with progress(share, "fit schema", config.train.progress and main) as bar:
            schema = fit_schema(config, train_src, {t.name: heads[t.name] for t in config.tasks}, bar.update, ctx)
    if main and not resume:
        # the label summary per task and split; one class or none in the validation labels stops here
        labels = run_summary(schema.labels, schema.label_summary, {"validation": valid_src, "test": test_src},
                             config.data.read_rows)
        label_text = format_summary(labels, heads_by_task)
        run_dir.mkdir(parents=True, exist_ok=True)
        schema.save(run_dir)
        files.write_config(dump_config(resolved_config(config, registry)))
        files.write_run_info({"versions": versions(), "argv": sys.argv,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world_size": ctx.world,
                              "labels": labels,
                              "threads": {"count": threads, "source": "auto" if cpus else "train.threads",
                                          "cpu_affinity": cpus.affinity if cpus else None,
                                          "cpu_quota": cpus.quota if cpus else None,
                                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
                              "precision": {"mode": "probing" if probe else mode,
                                            "train.precision": config.train.precision,
                                            "reason": precision_reason(mode, config.train.precision, ctx.device,
                                                                       probe)}})
    if resume:
        schema = ctx.broadcast_object(schema)

    state = ctx.broadcast_object(files.load_checkpoint(LAST) if main else None) if resume else None
    if state is None:
        model = MultiTaskModel(config, schema, registry)
    else:  # the checkpoint's layout: a run saved before one table per vocabulary trains on with its own tables
        model = model_for_state(config, schema, registry, state["model"], f"{LAST} of {run_dir}")
        if not model.shares_tables:
            say(f"{run_dir} was trained before encoders shared one embedding table per vocabulary: it trains on "
                "with a table per encoder (retrain it, in a new directory, for the shared table)")
    weights = {t.name: t.weight for t in config.tasks}
    balancer = registry.create("balancer", config.balancer.name, [t.name for t in config.tasks], weights,
                               **config.balancer.params)
    model.to(ctx.device)
    balancer.to(ctx.device)
    ctx.broadcast_state([model, balancer])  # every rank starts from rank 0's parameters
    mark_sparse(sparse_parameters(model))
    precision = Precision(mode, ctx.device)
    optimizers = make_optimizers(config, model, balancer)
    if label_text:
        say(label_text)
    say(precision_reason(mode, config.train.precision, ctx.device, probe))  # after the checks: errors come first
    _report_memory(config, schema, model, balancer, optimizers, ctx, precision)
    spec = config.train.early_stopping.monitor
    monitor = Monitor(spec if isinstance(spec, str) else "auto", model,  # best.pt (a mapping: as auto)
                      reference)
    task_monitors = TaskMonitors(spec, model)  # each task's best epoch -> best_epochs/
    loss_fallback = BestValue(higher=False)  # best.pt while the monitor has been NaN on every epoch
    shared = model.shared_parameters()
    # train.threads: null on one CPU process: the thread count follows the measured speed (recmtl/threads.py)
    tuner = ThreadTuner(threads) if cpus and ctx.world == 1 and ctx.device.type == "cpu" else None
    run = TrainRun(config, schema, model, balancer, run_dir)
    hook = registry.pm.hook
    balance_log = BalanceLog(files.balance_log, config.train.log_every if main else 0, model.task_names)
    affinity = AffinityLog(files.affinity_log, config.train.affinity_every if main else 0, model.task_names,
                           config.optimizer.lr)

    start_epoch, best, best_epoch, bad_epochs, in_epoch = 0, None, -1, 0, None
    spe = config.train.steps_per_epoch
    position = [0, 0]  # train.steps_per_epoch: [pass, step] of the stream where the next step comes from
    if state is not None:
        if state.get("steps_per_epoch") != spe:
            def shown(v: int | None) -> str:
                return "null" if v is None else str(v)
            raise ConfigError(f"{run_dir} was trained with train.steps_per_epoch {shown(state.get('steps_per_epoch'))}; "
                              f"resume it with the same value (not {shown(spe)}), or train into a new --out")
        position = state.get("stream", position)
        precision.load_state_dict(state.get("amp", {}))
        if probe is not None and state.get("precision_mode") in ("fp32", "bf16"):  # the probe's decision stands
            precision.use(state["precision_mode"])
            probe = None
            say(f"precision {precision.mode} (auto: the probe's decision when the run started, kept on resume)")
        balancer.load_state_dict(state["balancer"])
        for opt, opt_state in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        start_epoch, best, best_epoch, bad_epochs = state["epoch"] + 1, state["best"], state["best_epoch"], state["bad_epochs"]
        task_monitors.load_state_dict(state.get("task_monitors", {}))
        in_epoch = state.get("in_epoch")  # saved inside an epoch (train.checkpoint_every)
        loss_fallback.value, loss_fallback.epoch = state.get("loss_fallback", (math.nan, -1))
        run.history = state["history"]
        balance_log.step = state.get("global_step", 0)
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        where = (f"at step {in_epoch['steps']} of epoch {in_epoch['epoch'] + 1}" if in_epoch
                 else f"after epoch {state['epoch'] + 1}")
        if "stream" in state:  # train.steps_per_epoch: where in the data the next step comes from
            where += f" (pass {position[0] + 1}, {position[1]} of its steps taken)"
        say(f"resuming {run_dir} {where} (best {monitor.spec} = {best} at epoch {best_epoch + 1})")
        trained_for = state.get("epochs", _saved_epochs(files))  # train.epochs when the run last trained
        if state.get("stopped_early") and config.train.epochs > trained_for and start_epoch < config.train.epochs:
            say(f"the run had stopped early after epoch {start_epoch}; train.epochs {trained_for} -> "
                f"{config.train.epochs}: training on, with {config.train.early_stopping.patience} epochs' patience again")
            bad_epochs = 0
            if main:
                files.write_config(dump_config(resolved_config(config, registry)))
        elif state.get("stopped_early"):
            say(f"the run had stopped early; nothing to train (raise train.epochs above {trained_for} to train on)")
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
    every_steps, every_seconds = tc.checkpoint_interval()
    if spe is not None:
        pass_steps = max(1, math.ceil(train_src.num_rows / tc.batch_size))  # about: ranks' shards differ a little
        say(f"an epoch = {spe} steps (train.steps_per_epoch) = {spe / pass_steps:.2f} passes over the training data "
            f"(a pass ~ {pass_steps} steps of {tc.batch_size} rows); validation, early stopping and "
            "checkpoints per epoch")

    def pass_batches(p: int, skip: int) -> Iterator[Any]:
        """Pass ``p`` over the training data (shuffled with its own rng), its first ``skip`` steps read and dropped,
        cut to the same step count on every rank."""
        rng = np.random.default_rng([config.seed, p])
        stream = minibatches(blocks(train_src, schema, config.data.read_rows, rng, shard=ctx.shard), rank_batch,
                             config.data.shuffle_buffer, rng)
        return ctx.steps(batches_to(itertools.islice(stream, skip, None), ctx.device))
    # steps_per_epoch: epoch e is the steps [e * S, (e + 1) * S) of one stream of passes 0, 1, ...
    passes = Passes(pass_batches, *position, what=f"training data {train_src.spec}") if spe is not None else None

    def save_last(state: dict[str, Any]) -> None:
        state["amp"] = precision.state_dict()
        if probe is None or probe.decided:
            state["precision_mode"] = precision.mode
        path = files.save_checkpoint(LAST, state)
        hook.recmtl_checkpoint_saved(run=run, path=str(path), is_best=False)

    def stream_state() -> dict[str, Any]:
        """What a checkpoint keeps of the stream: steps_per_epoch, and with it the position of the next step."""
        return {"steps_per_epoch": spe} if passes is None else {"steps_per_epoch": spe, "stream": passes.position}

    val_bins: dict[int, dict[str, Any]] = {}  # epoch (1-based) -> reliability bins per task, for metrics.json
    for epoch in range(start_epoch, tc.epochs):
        model.train()
        loss_sum = {t: 0.0 for t in model.task_names}
        steps, rows, t0 = 0, 0, time.perf_counter()
        applied: dict[str, float] = {}
        if in_epoch is not None and in_epoch["epoch"] == epoch:
            # the same batches as the interrupted run: the stream again, the steps taken read and dropped
            steps, rows, applied = in_epoch["steps"], in_epoch["rows"], in_epoch["applied"]
            loss_sum = dict(in_epoch["loss_sum"])
            t0 -= in_epoch["seconds"]
        in_epoch = None
        saved_at = time.perf_counter()
        # the same step count on every rank: ctx.steps cuts each pass
        stream = pass_batches(epoch, steps) if passes is None else itertools.islice(passes, spe - steps)
        epoch_rows = train_src.num_rows if spe is None else spe * tc.batch_size
        with progress(epoch_rows, f"epoch {epoch + 1}/{tc.epochs}", tc.progress and main,
                      initial=rows * ctx.world) as bar:
            for batch in stream:
                step_start = time.perf_counter()
                if probe is not None and probe.decided is None:
                    precision.use(probe.next_mode())
                with precision.autocast():
                    outputs = model(batch.inputs)
                    losses = model.losses(outputs, batch.labels, batch.mask)
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                balance_log.before_backward(losses, shared)
                affinity.measure(balance_log.step, epoch + 1, model, batch, losses,
                                 lambda b: model.losses(model(b.inputs), b.labels, b.mask), shared, precision.autocast)
                model.backward_regularization()  # the tower's extra term (e.g. soft sharing's L2), if any
                precision.scale_grads(sync_params)  # fp16: that term's gradient (alone so far) gets the loss scale
                scaled = precision.scale_losses(losses)
                balancer.grad_scale = precision.grad_scale()  # fp16's loss scale (1.0 otherwise), see Balancer
                applied = balancer.backward(scaled, shared)
                logged = balance_log.after_backward(epoch + 1, applied)
                if logged is not None and main:
                    hook.recmtl_step_logged(run=run, step=logged["step"],
                                            record={**logged, "losses": {t: v.item() for t, v in losses.items()}})
                # gradients, and the state a balancer updates itself, averaged over ranks (no-op in one process)
                ctx.average_gradients(sync_params, balancer_state)
                precision.step(optimizers, unscaled=balancer.parameters())
                for t, loss in losses.items():
                    loss_sum[t] += loss.item()
                if probe is not None and probe.decided is None:  # the thread tuner waits for the probe
                    if probe.record(batch.rows, time.perf_counter() - step_start):
                        precision.use(probe.decided)
                        _probe_decided(probe, precision, config, ctx, files if main else None, say)
                elif tuner is not None and (changed := tuner.step(batch.rows, time.perf_counter() - step_start)):
                    torch.set_num_threads(changed)
                steps += 1
                rows += batch.rows
                bar.update(batch.rows * ctx.world)
                if steps % 50 == 0:
                    bar.set_postfix({t: f"{loss_sum[t] / steps:.4f}" for t in model.task_names}, refresh=False)
                if main and ((every_steps and steps % every_steps == 0)
                             or (every_seconds and time.perf_counter() - saved_at >= every_seconds)):
                    # under torchrun the resumed epoch's train loss continues from rank 0's partial sums
                    save_last({"model": model.state_dict(), "balancer": balancer.state_dict(),
                               "optimizers": [o.state_dict() for o in optimizers], "epoch": epoch - 1, "best": best,
                               "best_epoch": best_epoch, "bad_epochs": bad_epochs, "history": run.history,
                               "stopped_early": False, "global_step": balance_log.step, "epochs": tc.epochs,
                               "task_monitors": task_monitors.state_dict(),
                               "loss_fallback": (loss_fallback.value, loss_fallback.epoch),
                               "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
                               **stream_state(),
                               "in_epoch": {"epoch": epoch, "steps": steps, "rows": rows, "loss_sum": dict(loss_sum),
                                            "seconds": time.perf_counter() - t0, "applied": dict(applied)}})
                    saved_at = time.perf_counter()
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
        if passes is not None:  # where in the data the epoch ended: steps taken of which pass (1-based)
            record["steps"] = steps
            record["pass"], record["pass_steps"] = passes.pass_index + 1, passes.step
        if valid_src is not None:
            val_bins[epoch + 1] = {}
            dead: dict[str, list[int]] = {}
            val = _metrics(ctx, model, schema, valid_src, config, [balancer], val_bins[epoch + 1], dead)
            record["validation"] = val
            score = monitor.value(val)
            diag = model.diagnostics()
            if dead:  # rank 0: each task's head-input units constant on every validation row
                diag["dead_units"] = dead
            if diag:
                record["diagnostics"] = diag
            moved = task_monitors.update(val, epoch)
            fallback = loss_fallback.offer(float(np.nanmean([m["loss"] for m in val.values()])), epoch)
        else:  # no validation data: the training loss selects, per task and overall
            score = float(np.mean(list(train_loss.values())))
            moved = task_monitors.update({t: {"loss": v} for t, v in train_loss.items()}, epoch)
            fallback = False
        record["monitor"] = {monitor.spec if valid_src is not None else "train_loss": score}
        improved = (monitor.better(score, best) if valid_src is not None else (best is None or score < best))
        if improved:
            best, best_epoch = score, epoch
        elif fallback and (best is None or math.isnan(best)):  # the monitor was NaN on every epoch so far
            if best_epoch < 0:
                say(f"{monitor.spec} is NaN on the validation data; best.pt is chosen by the validation loss until it "
                    "is defined (set early_stopping.monitor to change what selects)")
            best_epoch, improved = epoch, True
        if isinstance(spec, dict):  # per-task monitors: stop when no task improved for `patience` epochs
            bad_epochs = 0 if moved else bad_epochs + 1
        else:
            bad_epochs = 0 if improved else bad_epochs + 1
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
                 "global_step": balance_log.step, "epochs": tc.epochs, "task_monitors": task_monitors.state_dict(),
                 "loss_fallback": (loss_fallback.value, loss_fallback.epoch),
                 "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}, **stream_state()}
        if improved and main:
            path = files.save_checkpoint(BEST, {"model": model.state_dict(), "epoch": epoch})
            hook.recmtl_checkpoint_saved(run=run, path=str(path), is_best=True)
        if moved and main:  # some task's best epoch is this one: keep its model, drop epochs no task needs
            files.save_checkpoint(epoch_checkpoint(epoch + 1), {"model": model.state_dict(), "epoch": epoch})
            files.prune_epoch_checkpoints({task_monitors.best_epoch(t) + 1 for t in model.task_names})
        if main:
            save_last(state)
            files.write_metrics(_summary(run.history, best_epoch, monitor.spec, None, task_monitors))
            hook.recmtl_epoch_end(run=run, epoch=epoch + 1, metrics=record)
        if stop:
            what = "no task's monitored metric" if isinstance(spec, dict) else monitor.spec
            say(f"early stopping: {what} did not improve for {patience} epochs; best epoch {best_epoch + 1}")
            break

    # final metrics: each task from the model of its own best epoch (as `evaluate` and `export` use by default)
    epochs = {t: task_monitors.best_epoch(t) + 1 for t in model.task_names}
    if min(epochs.values()) < 1:  # no epoch was ever finite for some task: best.pt for all
        epochs = {t: best_epoch + 1 for t in model.task_names}

    def state_of(e: int) -> dict[str, Any] | None:
        if not main:
            return None
        name = epoch_checkpoint(e) if files.file(epoch_checkpoint(e)).is_file() else BEST  # BEST: the fallback above
        return files.load_checkpoint(name)["model"]
    states = {e: ctx.broadcast_object(state_of(e)) for e in sorted(set(epochs.values()))}
    final = per_task_model(config, schema, registry, states, epochs, run_dir).to(ctx.device)
    test_metrics = None
    test_bins: dict[str, Any] = {}
    if test_src is not None:
        test_metrics = _metrics(ctx, final, schema, test_src, config, bins=test_bins)
    summary = _summary(run.history, best_epoch, monitor.spec, test_metrics, task_monitors)
    # reliability diagrams (recmtl report): validation at each task's epoch (this session's epochs), the test split
    reliability = {"validation": {t: {"epoch": e, **val_bins[e][t]} for t, e in epochs.items() if t in val_bins.get(e, {})},
                   "test": test_bins}
    if any(reliability.values()):
        summary["reliability"] = {k: v for k, v in reliability.items() if v}
    dead_at_best = dead_units_at(run.history, epochs)
    if dead_at_best:
        summary["dead_units"] = dead_at_best
        for line in dead_unit_warnings(dead_at_best, getattr(model.tower, "dead_units_hint", "")):
            say(line)
    if main:
        files.write_metrics(summary)
        hook.recmtl_train_end(run=run, metrics=summary)
    ctx.barrier()
    ctx.close()
    return summary


def _metrics(ctx: Context, model: MultiTaskModel, schema: FittedSchema, source: ParquetSource, config: Config,
             others: list[torch.nn.Module] = (), bins: dict[str, Any] | None = None,
             dead: dict[str, list[int]] | None = None) -> dict[str, dict[str, float]]:
    """Per-task metrics over all of ``source``: each rank predicts its share, rank 0 gathers the predictions
    (AUC and GAUC do not average over shards) and computes the metrics, every rank receives them. Scores (and the
    loss) are corrected for ``negative_sampling_rate``; ``bins`` (rank 0) receives each probability task's reliability
    bins, ``dead`` (rank 0) each task's ``[dead, units]`` of its head input over all ranks' rows (``UnitRange``)."""
    ctx.broadcast_state([model, *others], buffers_only=True)  # e.g. batch-norm statistics: rank 0's
    smap = score_map(config)
    part = predict(model, schema, source, config.train.eval_batch_size, config.data.read_rows, shard=ctx.shard,
                   raw=smap.mapped, units=dead is not None)
    parts = ctx.gather_object(part)
    metrics = None
    if ctx.is_main:
        pred = map_scores(merge_predictions(parts, source.spec), smap)
        metrics = task_metrics(model, pred)
        if bins is not None:
            bins.update(reliability_bins(config, pred))
        if dead is not None and pred.units is not None:
            dead.update(pred.units.dead_units())
    return ctx.broadcast_object(metrics)


def dead_units_at(history: list[dict[str, Any]], epochs: dict[str, int]) -> dict[str, dict[str, int]]:
    """Each task's dead head-input units at its epoch (``epochs``: task -> 1-based epoch, e.g. its best), from the
    history's ``diagnostics.dead_units``: ``{task: {"epoch", "dead", "units"}}``; tasks without the count left out."""
    by_epoch = {rec.get("epoch"): (rec.get("diagnostics") or {}).get("dead_units") or {} for rec in history}
    out = {}
    for t, e in epochs.items():
        count = by_epoch.get(e, {}).get(t)
        if isinstance(count, list) and len(count) == 2:
            out[t] = {"epoch": e, "dead": int(count[0]), "units": int(count[1])}
    return out


def dead_unit_warnings(dead: dict[str, dict[str, int]], hint: str = "") -> list[str]:
    """One warning per task with at least ``DEAD_SHARE`` of its head-input units dead (``dead_units_at``); ``hint``:
    the tower's own remedy (``Tower.dead_units_hint``)."""
    return [f"warning: task '{t}': {d['dead']} of the {d['units']} units of its head input (the tower's output for "
            f"it) are dead at epoch {d['epoch']} (constant on every validation row, e.g. a ReLU that is 0 on all), so "
            f"its head reads {d['units'] - d['dead']}; if its metrics are weaker than expected, try a wider last task "
            f"layer{'; ' + hint if hint else ''} (docs/training.md, \"Dead units\")"
            for t, d in dead.items() if d["units"] and d["dead"] >= DEAD_SHARE * d["units"]]


def row_bytes(schema: FittedSchema) -> int:
    """Bytes one preprocessed row holds in the data buffers (``FittedSchema.transform``'s arrays)."""
    return (8 * (len(schema.categorical) + len(schema.dense)) + 8 * sum(lab.width for lab in schema.labels) + 8
            + sum(4 * i.channels * i.height * i.width for i in schema.image)  # images: float32 C*H*W a row
            + 8 * len(schema.sequence) * schema.sequence_width  # sequences: int64 ids, padded
            + 8 * len(schema.text) * schema.text_width)  # text: int64 hashed n-gram ids, padded to max_tokens


def _probe_decided(probe: PrecisionProbe, precision: Precision, config: Config, ctx: Context,
                   files: RunDir | None, say: Any) -> None:
    """Print the precision probe's decision and record it in run.json (rank 0)."""
    reason = precision_reason(precision.mode, config.train.precision, ctx.device, probe)
    say(reason)
    if files is not None:
        info = files.read_run_info() or {}
        info["precision"] = {"mode": precision.mode, "train.precision": config.train.precision, "reason": reason,
                             "probe": probe.summary()}
        files.write_run_info(info)


def _report_memory(config: Config, schema: FittedSchema, model: MultiTaskModel, balancer: Balancer,
                   optimizers: list[torch.optim.Optimizer], ctx: Context, precision: Precision) -> None:
    """Print what one rank needs before training starts (every rank holds the whole model)."""
    buffered = max(config.data.shuffle_buffer, config.train.batch_size // ctx.world) + config.data.read_rows
    est = memory_estimate(model, balancer, optimizers, sparse_parameters(model), buffered, row_bytes(schema))
    say(f"memory per rank (estimate, {ctx.world} process(es) on {ctx.device}, {precision.mode}): "
        f"parameters {format_bytes(est['parameters'])} (embedding tables {format_bytes(est['embedding_tables'])}), "
        f"gradients {format_bytes(est['gradients'])}, optimizer state {format_bytes(est['optimizer_state'])}, "
        f"data buffers {format_bytes(est['data'])}; total {format_bytes(est['total'])} plus activations")


def _saved_epochs(files: RunDir) -> int:
    """``train.epochs`` of the run directory's saved config (runs whose last.pt predates recording it)."""
    import yaml
    try:
        raw = yaml.safe_load(files.read_config_text()) or {}
        return int((raw.get("train") or {}).get("epochs", 10))
    except (yaml.YAMLError, TypeError, ValueError, AttributeError):
        return 10


def _summary(history: list[dict[str, Any]], best_epoch: int, monitor: str, test: dict | None,
             task_monitors: TaskMonitors | None = None) -> dict[str, Any]:
    best = history[best_epoch] if 0 <= best_epoch < len(history) else {}
    out: dict[str, Any] = {"monitor": monitor, "best_epoch": best_epoch + 1,
                           "validation": best.get("validation"), "history": history}
    if task_monitors is not None:  # each task's best epoch, what chose it, and its validation metrics there
        task_best = task_monitors.summary()
        for t, entry in task_best.items():
            record = history[entry["epoch"] - 1] if 1 <= entry["epoch"] <= len(history) else {}
            entry["validation"] = (record.get("validation") or {}).get(t)
        out["task_best"] = task_best
    if test is not None:
        out["test"] = test
    return out
