"""The ``recmtl`` command line (typer). User mistakes print one line and exit 2, no traceback."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from recmtl.errors import ConfigError, RecmtlError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="recmtl: multi-task learning for recommenders, trained on Parquet.")
datagen_app = typer.Typer(no_args_is_help=True, help="Write synthetic Parquet data with a known ground truth.")
# Arguments every `recmtl datagen` generator shares.
TruthFolder = Annotated[Path, typer.Argument(help="Folder for train/valid/test.parquet and their .truth.parquet.")]
SplitsFolder = Annotated[Path, typer.Argument(help="Folder for train/valid/test.parquet.")]
ValidFraction = Annotated[float, typer.Option(help="Share of the rows written to valid.parquet.")]
TestFraction = Annotated[float, typer.Option(help="Share of the rows written to test.parquet.")]
app.add_typer(datagen_app, name="datagen")


class State:
    plugins: list[str] = []
    disabled: list[str] = []


@app.callback()
def _main(
    plugin: Annotated[list[str], typer.Option("--plugin", "-p", help="Extra plugin module (dotted name or .py path); repeatable.")] = [],
    disable_plugin: Annotated[list[str], typer.Option("--disable-plugin", help="Skip the plugin of this name; repeatable.")] = [],
) -> None:
    State.plugins = list(plugin)
    State.disabled = list(disable_plugin)


def _registry(extra: list[str] = ()):
    from recmtl.registry import load_registry
    return load_registry([*extra, *State.plugins], State.disabled)


@app.command()
def plugins() -> None:
    """List every registered tower, head, balancer, encoder and logger with the plugin that registered it."""
    rows = [("kind", "name", "plugin", "origin")]
    rows += [(e.kind, e.name, e.plugin, e.origin) for e in _registry().rows()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@app.command("new-plugin")
def new_plugin(
    name: Annotated[str, typer.Argument(help="Package name, e.g. my-tower (registered as my_tower).")],
    kind: Annotated[str, typer.Option(help="tower, head, balancer, encoder, interaction or logger.")] = "tower",
    directory: Annotated[Path, typer.Option("--dir", help="Where to create the package folder.")] = Path("."),
) -> None:
    """Scaffold a pip-installable plugin package (entry point, example, contract test)."""
    from recmtl.scaffold import scaffold
    root = scaffold(name, kind, directory)
    typer.echo(f"created {root}: pip install -e {root} && recmtl plugins   (tests: pytest {root})")


@app.command()
def init(
    data: Annotated[str, typer.Argument(help="Training Parquet file, folder or glob to inspect.")],
    task: Annotated[list[str], typer.Option("--task", "-t", help="Task label column, or NAME=COLUMN; repeatable.")] = [],
    positive: Annotated[list[str], typer.Option(
        help="TASK=SPEC: which label values count as 1 for that task; SPEC is a value (repeatable) or a threshold "
             "such as '>0' or '>=4'. COLUMN=SPEC also works when one task reads that column; a task name wins "
             "when KEY is both.")] = [],
    head: Annotated[list[str], typer.Option(
        help="TASK=HEAD, e.g. conversion=esmm (default: binary for 0/1 labels, else regression).")] = [],
    label: Annotated[list[str], typer.Option(
        help="An outcome column that is not a task now (another stage's label): never a feature; repeatable.")] = [],
    feature: Annotated[list[str], typer.Option(
        help="Use this column as a feature even where init would leave it out (an outcome-like name, an id); "
             "repeatable.")] = [],
    exclude: Annotated[list[str], typer.Option(help="Column not to use as a feature; repeatable.")] = [],
    dense: Annotated[list[str], typer.Option(help="Treat this number column as dense; repeatable.")] = [],
    categorical: Annotated[list[str], typer.Option(
        help="Treat this integer, string or boolean column as categorical; repeatable.")] = [],
    validation: Annotated[Optional[str], typer.Option(help="Validation Parquet (early stopping, metrics).")] = None,
    test: Annotated[Optional[str], typer.Option(help="Test Parquet, scored once with the best checkpoint.")] = None,
    tower: Annotated[Optional[str], typer.Option(
        help="Tower plugin name (default: shared_bottom for one task, mmoe for several).")] = None,
    group_column: Annotated[Optional[str], typer.Option(help="User-id column: binary tasks also report GAUC.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Config file to write.")] = Path("recmtl.yaml"),
    force: Annotated[bool, typer.Option(help="Overwrite an existing config file.")] = False,
) -> None:
    """Write a starter config by reading DATA: per column its type, distinct values, nulls and a proposal with
    the reason (printed as a table and kept as YAML comments), and defaults sized by the number of rows."""
    from recmtl.data.starter import render, starter_config, summary_table
    from recmtl.files import write_text
    if output.exists() and not force:
        raise ConfigError(f"{output} exists; pass --force to overwrite it")
    result = starter_config(data, task, output, positive, exclude, dense, categorical, validation, test, tower,
                            group_column, head, label, feature)
    cfg = result.config
    registry = _registry()
    registry.get("tower", cfg["tower"]["name"])
    for t in cfg["tasks"]:
        registry.get("head", t["head"])
    write_text(output, render(result))
    typer.echo(summary_table(result))
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    counts = {k: sum(f["kind"] == k for f in cfg["features"]) for k in ("categorical", "dense", "image", "sequence", "text")}
    typer.echo(f"wrote {output}: " + " + ".join(f"{n} {k}" for k, n in counts.items() if n or k in ("categorical", "dense"))
               + " features, tasks " + ", ".join(f"{t['name']} ({t['head']})" for t in cfg["tasks"])
               + f", tower {cfg['tower']['name']}, batch {cfg['train']['batch_size']}")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Config file (YAML or TOML).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")],
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    set_: Annotated[list[str], typer.Option("--set", help="Override a config value: key.path=value; repeatable.")] = [],
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or auto (default: train.device of the config, auto).")] = None,
    precision: Annotated[Optional[str], typer.Option(
        help="auto, fp32, bf16 or fp16 (default: train.precision of the config, auto: bf16 on CPUs with AMX or "
             "AVX-512 BF16, else fp32); --precision fp32 forces the fp32 path.")] = None,
    logger: Annotated[list[str], typer.Option("--logger", help="Experiment logger plugin (tensorboard, mlflow), added to "
                                                               "the config's loggers; repeatable.")] = [],
) -> None:
    """Train a multi-task model; writes best.pt, last.pt, config.yaml, schema.json, metrics.json to --out.
    Under `torchrun --nproc-per-node N` the same command trains data-parallel on N processes."""
    if device is not None:
        set_ = [*set_, f"train.device={device}"]
    if precision is not None:
        set_ = [*set_, f"train.precision={precision}"]
    from recmtl.config import load_config, parse_config, read_raw, set_dotted
    from recmtl.rundir import CONFIG, require_trusted_plugins
    from recmtl.training.evaluate import format_table
    from recmtl.training.loop import train as run_training
    if resume and (out / CONFIG).is_file():
        raw = read_raw(out / CONFIG)  # a resumed run keeps its own config
        for item in set_:
            key, _, value = item.partition("=")
            set_dotted(raw, key, __import__("yaml").safe_load(value))
        cfg = parse_config(raw, out, str(out / CONFIG))
        require_trusted_plugins(out, cfg.plugin_modules(), State.plugins)
    else:
        cfg = load_config(config, set_)
    named = {c.name for c in cfg.logger_components()}
    cfg.loggers = [*cfg.loggers, *dict.fromkeys(n for n in logger if n not in named)]
    summary = run_training(cfg, out, _registry(cfg.plugin_modules()), resume=resume)
    if __import__("os").environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 prints the results
    if summary.get("validation"):
        typer.echo(f"best epoch {summary['best_epoch']} by {summary['monitor']}; validation:")
        typer.echo(format_table(summary["validation"]))
    if summary.get("test"):
        typer.echo("test:")
        typer.echo(format_table(summary["test"]))
    typer.echo(f"run saved in {out}")


@app.command()
def compare(
    config: Annotated[Path, typer.Argument(help="Config file with two or more tasks.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Compare directory (cells, compare.json, report/).")],
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per cell: config seed, +1, ...")] = 3,
    towers: Annotated[Optional[str], typer.Option(help="Comma-separated towers of the multi-task cells (default: the config's).")] = None,
    balancers: Annotated[Optional[str], typer.Option(help="Comma-separated balancers (default: the config's).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Cells trained in parallel processes.")] = 1,
    metric: Annotated[list[str], typer.Option(help="TASK=METRIC compared for that task (default: auc, accuracy, rmse "
                                                   "or loss, the first reported); repeatable.")] = [],
    set_: Annotated[list[str], typer.Option("--set", help="Override a config value: key.path=value; repeatable.")] = [],
) -> None:
    """Single-task baselines vs multi-task variants, every seed: per-task deltas with paired CIs, negative
    transfer, Δm; a table, OUT/compare.json and OUT/report/index.html. Re-running skips finished cells."""
    from recmtl.compare_report import write_compare_report
    from recmtl.config import load_config
    from recmtl.training.compare import compare as run_compare
    from recmtl.training.compare import format_result, head_classes_of, parse_metric_choice, parse_names
    cfg = load_config(config, set_)
    registry = _registry(cfg.plugin_modules())
    if len(cfg.tasks) < 2:
        raise ConfigError(f"{config} has one task ('{cfg.tasks[0].name}'): nothing to compare; compare needs two or "
                          "more tasks")
    tower_list = parse_names(towers, "tower", registry.names("tower"))
    balancer_list = parse_names(balancers, "balancer", registry.names("balancer"))
    result = run_compare(cfg, out, seeds, tower_list, balancer_list, workers, [*cfg.plugin_modules(), *State.plugins],
                         State.disabled, head_classes_of(cfg, registry), parse_metric_choice(metric, cfg))
    typer.echo(format_result(result))
    index = write_compare_report(out)
    typer.echo(f"wrote {out / 'compare.json'} and {index}")


@app.command()
def group(
    source: Annotated[Path, typer.Argument(help="A run directory or a compare directory with affinity.jsonl "
                                                "(trained with train.affinity_every N).")],
    groups: Annotated[int, typer.Option(min=1, help="Number of task groups.")] = 2,
    train: Annotated[bool, typer.Option("--train", help="Also train the grouped models (every seed) and compare them "
                                                        "with the all-in-one and single-task models.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="With --train: the compare directory (default: "
                                                                    "SOURCE when it is one).")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="With --train: seeds per cell.")] = 3,
    workers: Annotated[int, typer.Option(min=1, help="With --train: cells trained in parallel processes.")] = 1,
) -> None:
    """Suggest which tasks to train together from the lookahead task affinity (TAG); --train trains the groups."""
    from recmtl.files import write_json
    from recmtl.training.grouping import config_of, format_suggestion, grouped_vs_all_in_one, suggest
    suggestion = suggest(source, groups)
    typer.echo(format_suggestion(suggestion))
    if not train:
        return
    from recmtl.compare_report import write_compare_report
    from recmtl.training.compare import RESULT, format_result, head_classes_of
    from recmtl.training.compare import compare as run_compare
    cfg, is_compare = config_of(source, State.plugins)
    if out is None:
        if not is_compare:
            raise ConfigError(f"{source} is a run directory: pass --out DIR for the compare directory of the grouped, "
                              "all-in-one and single-task models")
        out = source
    registry = _registry(cfg.plugin_modules())
    result = run_compare(cfg, out, seeds, [cfg.tower.name], [cfg.balancer.name], workers,
                         [*cfg.plugin_modules(), *State.plugins], State.disabled, head_classes_of(cfg, registry),
                         groups=suggestion["groups"])
    all_in_one = f"{cfg.tower.name}+{cfg.balancer.name}"
    result["groups"] = {**suggestion, "vs_all_in_one": grouped_vs_all_in_one(result, all_in_one, suggestion["groups"])}
    write_json(out / RESULT, result)
    typer.echo(format_result(result))
    vs = result["groups"]["vs_all_in_one"]
    if vs:
        typer.echo(f"grouped vs all-in-one ({all_in_one}), paired by seed:")
        for t, d in vs.items():
            ci = d["ci95"]
            typer.echo(f"  {t} {d['metric']}: {d['mean']:+.4f}" + (f"  95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")
                       + ("  worse" if d["grouped_worse"] else ""))
    typer.echo(f"wrote {out / RESULT} and {write_compare_report(out)}")


@app.command()
def tune(
    config: Annotated[Path, typer.Argument(help="Base config file (YAML or TOML); the space's keys override it.")],
    space: Annotated[Path, typer.Option(help="Search space YAML: config key -> {int: [LO, HI]}, {float: [LO, HI], "
                                             "log: true} or {choice: [...]}.")],
    trials: Annotated[int, typer.Option(min=1, help="Finished (complete or pruned) trials the study should hold.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the trials' run directories, "
                                                                    "best.yaml, trials.csv and plots (default: CONFIG_STEM-tune).")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage: an RDB URL (default sqlite:///OUT/study.db) "
                                                        "or journal:PATH.")] = None,
    study: Annotated[Optional[str], typer.Option(help="Study name (default: the config file's stem).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Processes working on the study on this machine.")] = 1,
    metric: Annotated[str, typer.Option(help="Validation metric to optimise: mean/METRIC or TASK/METRIC.")] = "mean/auc",
    pruner: Annotated[str, typer.Option(help="median (stop trials below the median at the same epoch) or none.")] = "median",
    seed: Annotated[Optional[int], typer.Option(help="Seed of the TPE sampler.")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override a base config value: key.path=value; repeatable.")] = [],
) -> None:
    """Search hyperparameters with Optuna (TPE, median pruning); resumable, several processes on one study."""
    from recmtl.training.tune import TuneOptions
    from recmtl.training.tune import tune as run_tune
    opts = TuneOptions(config, space, trials, out or Path(f"{config.stem}-tune"), storage, study, workers, metric,
                       pruner, seed, list(set_), list(State.plugins), list(State.disabled))
    run_tune(opts, typer.echo)


CHECKPOINT_HELP = ("Which trained weights: tasks (each task from its own best epoch, the default), best (best.pt: one "
                   "network, the best epoch by early_stopping.monitor), last, or a checkpoint file in the run directory.")
CALIBRATION_HELP = "Apply the calibrators `recmtl calibrate` stored in the run directory (when there are any)."


@app.command()
def calibrate(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `recmtl train`.")],
    data: Annotated[str, typer.Option(help="Held-out Parquet with the labels, to fit the calibrators on.")],
    method: Annotated[str, typer.Option(help="isotonic, platt or temperature.")] = "isotonic",
    tasks: Annotated[list[str], typer.Option(
        "--tasks", help="Task to calibrate; repeatable (default: every binary and esmm task).")] = [],
    test: Annotated[Optional[str], typer.Option(help="A second held-out Parquet: metrics before/after on it too.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16_384,
    checkpoint: Annotated[str, typer.Option(help=CHECKPOINT_HELP)] = "tasks",
) -> None:
    """Fit a post-hoc calibrator per probability task on held-out data; store it in RUN_DIR/calibrator.json."""
    from recmtl.training.calibrate import calibrate_run, format_results
    results = calibrate_run(run_dir, data, method, tasks, test, State.plugins, State.disabled, checkpoint, batch_size)
    typer.echo(format_results(results))
    typer.echo(f"wrote {results['path']} ({method}); evaluate uses it, and `recmtl export` puts it in the model")


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `recmtl train`.")],
    data: Annotated[str, typer.Argument(help="Parquet file, folder or glob with the label columns.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics as JSON.")] = False,
    save_predictions: Annotated[Optional[Path], typer.Option(help="Also write per-row scores (and labels) to this Parquet file.")] = None,
    keep: Annotated[list[str], typer.Option(help="With --save-predictions: column of DATA to copy next to the "
                                                 "scores (e.g. ids); repeatable.")] = [],
    reference: Annotated[Optional[Path], typer.Option(
        help="Row-aligned Parquet of reference scores, one column per task (e.g. a datagen truth file): "
             "their AUC is shown alongside.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16_384,
    checkpoint: Annotated[str, typer.Option(help=CHECKPOINT_HELP)] = "tasks",
    calibration: Annotated[bool, typer.Option(help=CALIBRATION_HELP)] = True,
) -> None:
    """Per-task metrics of a trained model on DATA, over each task's labelled rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recmtl.data.parquet import ParquetSource
    from recmtl.files import atomic_path
    from recmtl.metrics import auc
    from recmtl.schema import check_types
    from recmtl.training.evaluate import format_table, load_run, task_metrics

    run = load_run(run_dir, State.plugins, State.disabled, checkpoint, calibration)
    if run.scores.calibrators:
        typer.echo(f"calibrated scores ({run.scores.info.get('method')}: {', '.join(run.scores.calibrators)}; "
                   "--no-calibration for the raw ones)", err=True)
    cols = [c for t in run.config.tasks for c in t.label_columns] + run.schema.feature_columns
    if run.schema.group_column:
        cols.append(run.schema.group_column)
    source = ParquetSource(data, cols)
    check_types(run.config, source)
    keep = list(dict.fromkeys(keep))
    if keep and save_predictions is None:
        raise ConfigError("--keep copies columns into the --save-predictions file; pass --save-predictions too")
    kept_source = ParquetSource(data, keep) if keep else None
    pred = run.predict(source, batch_size)
    metrics = task_metrics(run.model, pred)
    ref_metrics = None
    if reference is not None:
        ref = pa.Table.from_batches(list(ParquetSource(str(reference)).batches()))
        if ref.num_rows != len(pred.mask):
            raise ConfigError(f"--reference {reference} has {ref.num_rows} rows, {data} has {len(pred.mask)}")
        ref_metrics = {}
        for t in run.model.task_names:
            if t in ref.column_names:
                label, m = pred.task_label(t)
                ref_metrics[t] = {"auc": auc(label[m], ref.column(t).to_numpy()[m])}
    if save_predictions is not None:
        from recmtl.serving.score import kept_names
        table = {}
        if kept_source is not None:  # read in file order, as predict did: row-aligned with the scores
            kept = pa.Table.from_batches(list(kept_source.batches(columns=keep)), schema=pa.schema(
                [kept_source.field(k) for k in keep]))
            taken = [n for t in run.model.task_names for n in (t, f"{t}__label")]
            for k, name in zip(keep, kept_names(keep, taken)):
                table[name] = kept.column(k)
        for t in run.model.task_names:
            label, m = pred.task_label(t)
            if pred.scores[t].ndim == 2:  # K class/attribute probabilities: fixed_size_list<float>[K]
                k = pred.scores[t].shape[1]
                table[t] = pa.FixedSizeListArray.from_arrays(pa.array(pred.scores[t].reshape(-1)), k)
            else:
                table[t] = pa.array(pred.scores[t])
            if label.ndim == 2:  # multilabel: a list of K labels, null where an attribute is unlabelled
                table[f"{t}__label"] = pa.FixedSizeListArray.from_arrays(
                    pa.array(label.reshape(-1), mask=np.isnan(label.reshape(-1))), label.shape[1], mask=pa.array(~m))
            else:
                table[f"{t}__label"] = pa.array(label, mask=~m)
        with atomic_path(save_predictions) as tmp:
            pq.write_table(pa.table(table), tmp)
    if as_json:
        out = {"data": data, "metrics": metrics, "epochs": run.epochs,
               "calibrators": {t: c.method for t, c in run.scores.calibrators.items()}}
        if ref_metrics:
            out["reference"] = ref_metrics
        typer.echo(json.dumps(out, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
    else:
        if run.epochs:
            typer.echo("epochs: " + ", ".join(f"{t} {e}" for t, e in run.epochs.items()), err=True)
        typer.echo(format_table(metrics, ref_metrics))


@app.command()
def importance(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `recmtl train`.")],
    data: Annotated[str, typer.Argument(help="Held-out Parquet file, folder or glob with the feature and label columns.")],
    tasks: Annotated[list[str], typer.Option("--tasks", help="Task to measure (repeatable; default: every task).")] = [],
    repeats: Annotated[int, typer.Option(min=1, help="Permutations per feature.")] = 5,
    rows: Annotated[int, typer.Option(min=1, help="Rows of DATA used (the first ones).")] = 50_000,
    min_drop: Annotated[float, typer.Option(min=0, help="Smallest metric drop that counts as a use.")] = 0.001,
    seed: int = 0,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for importance.json and importance.png "
                                                                  "(default: RUN_DIR/importance).")] = None,
    checkpoint: Annotated[str, typer.Option(help=CHECKPOINT_HELP)] = "tasks",
) -> None:
    """Permutation importance per task per feature on held-out DATA; groups features into useful to all tasks,
    task-specific and no measurable use."""
    from recmtl.data.parquet import ParquetSource
    from recmtl.files import atomic_path
    from recmtl.schema import check_types
    from recmtl.training.evaluate import load_run
    from recmtl.training.importance import format_importance, importance_figure, permutation_importance, read_rows

    run = load_run(run_dir, State.plugins, State.disabled, checkpoint)
    cols = [c for t in run.config.tasks for c in t.label_columns] + run.schema.feature_columns
    source = ParquetSource(data, cols)
    check_types(run.config, source)
    chosen = list(dict.fromkeys(tasks)) or list(run.model.task_names)
    result = permutation_importance(run.model, run.schema, read_rows(source, rows), chosen, repeats, seed, min_drop)
    result["data"] = data
    folder = out or Path(run_dir) / "importance"
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "importance.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2))
    with atomic_path(folder / "importance.png") as tmp:
        importance_figure(result, tmp)
    typer.echo(format_importance(result))
    typer.echo(f"wrote {folder / 'importance.json'} and {folder / 'importance.png'}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `recmtl train`.")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Folder for index.html and the PNGs (default: RUN_DIR/report).")] = None,
) -> None:
    """Training curves, tower diagnostics and task-balance plots: PNGs and one self-contained index.html."""
    from recmtl.report import write_report
    index = write_report(run_dir, out)
    typer.echo(f"wrote {index}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `recmtl train`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="ONNX file to write.")],
    sample: Annotated[Optional[str], typer.Option(help="Parquet rows for the parity check (default: the validation data).")] = None,
    sample_rows: Annotated[int, typer.Option(min=1)] = 4096,
    triton_repo: Annotated[Optional[Path], typer.Option(
        help="Also write a Triton model repository here (NAME/1/model.onnx + config.pbtxt).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Model name in the Triton repository and the MLflow model registry "
                                                     "(default: the output file's stem).")] = None,
    checkpoint: Annotated[str, typer.Option(help=CHECKPOINT_HELP)] = "tasks",
    calibration: Annotated[bool, typer.Option(help=CALIBRATION_HELP)] = True,
    fuse: Annotated[Optional[str], typer.Option(
        help="A ranking score over the (calibrated) task scores, e.g. 'click^1.0 * conversion^0.5': an extra output "
             "ranking_score (task names, numbers, + - * / ^, parentheses); default: the config's export.fuse; '' for "
             "none.")] = None,
    precision: Annotated[str, typer.Option(help="fp32 (default), int8 (dynamic int8 dense layers, int8 embedding "
                                                "tables), int8-static (calibrated on --calibration-data rows) or fp16; "
                                                "int8/fp16 are checked against fp32 on labelled --sample rows.")] = "fp32",
    calibration_data: Annotated[Optional[str], typer.Option(
        help="Parquet rows whose activation ranges calibrate --precision int8-static (default: the validation "
             "data).")] = None,
    mlflow: Annotated[bool, typer.Option("--mlflow", help="Also log the model with MLflow's ONNX flavour into the run's "
                                                          "MLflow run and register it as --name.")] = False,
) -> None:
    """Export a self-contained ONNX model (raw columns in, one score per task out), checked against PyTorch."""
    from recmtl.export import PARITY_ATOL, PARITY_RTOL, QUALITY_BOUND, export_run
    from recmtl.serving.triton import write_triton_repo
    diffs = export_run(run_dir, output, sample, sample_rows, State.plugins, State.disabled, checkpoint, typer.echo,
                       calibration=calibration, fuse=fuse, precision=precision, calibration_data=calibration_data)
    checked = diffs.pop("quality", None)
    typer.echo("parity vs PyTorch (max abs diff): " + ", ".join(f"{t}={d['max_abs']:.2e}" for t, d in diffs.items())
               + f" (limit {PARITY_ATOL:g} + {PARITY_RTOL:g} x |score|)")
    if checked:
        typer.echo(f"{precision} vs fp32 on {next(iter(checked.values()))['rows']:,} labelled rows: " + ", ".join(
            f"{t} max abs diff {q['max_abs']:.2e}" + (f", {q['metric']} {q['fp32']:.4f} -> {q['value']:.4f} "
                                                     f"({q['delta']:+.5f})" if q.get("metric") else "")
            for t, q in checked.items()) + f" (bound |difference| <= {QUALITY_BOUND:g})")
    typer.echo(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB)")
    if triton_repo is not None:
        folder = write_triton_repo(output, triton_repo, name or output.stem)
        typer.echo(f"wrote Triton model {folder} (config.pbtxt, 1/model.onnx)")
    if mlflow:
        from recmtl.export.tracking import log_onnx_model
        logged = log_onnx_model(run_dir, output, name or output.stem)
        typer.echo(f"logged to MLflow at {logged['tracking_uri']}: run {logged['run_id']}, {logged['model_uri']}, "
                   f"registered as {name or output.stem} version {logged['version']}")


@app.command()
def score(
    model: Annotated[Path, typer.Argument(help="ONNX model written by `recmtl export`.")],
    data: Annotated[str, typer.Argument(help="Parquet file, folder or glob to score.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Parquet file to write (atomically).")],
    keep: Annotated[list[str], typer.Option(help="Column to copy next to the scores (e.g. ids); repeatable.")] = [],
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per onnxruntime call.")] = 1024,
    threads: Annotated[Optional[int], typer.Option(min=1, help="onnxruntime threads (per worker).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Processes scoring row groups in parallel.")] = 1,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    spin: Annotated[bool, typer.Option(help="Let onnxruntime's threads busy-wait inside a batch: faster on cores "
                                            "nobody else uses, slower on a shared machine.")] = False,
) -> None:
    """Score Parquet -> Parquet with only the ONNX file; output rows in input order."""
    from recmtl.serving.score import score_parquet
    rows = score_parquet(model, data, output, keep, batch_size, threads, workers, progress=progress, spin=spin)
    typer.echo(f"wrote {output}: {rows:,} rows")


@app.command()
def serve(
    model: Annotated[Path, typer.Argument(help="An ONNX model, or a folder of them (each served under its name).")],
    host: Annotated[str, typer.Option(help="Interface to bind (default: loopback only).")] = "127.0.0.1",
    port: int = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes.")] = 1,
    max_batch_size: Annotated[int, typer.Option(min=0, help="Rows merged into one onnxruntime call; 0 disables micro-batching.")] = 256,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="How long a request may wait for others to batch with.")] = 2.0,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Larger request bodies get 413.")] = 16.0,
    threads: Annotated[Optional[int], typer.Option(min=1, help="onnxruntime threads per worker.")] = None,
    max_request_rows: Annotated[int, typer.Option(min=1, help="Requests of more rows get 413.")] = 65_536,
    max_concurrency: Annotated[int, typer.Option(min=1, help="Inference requests in flight per worker; "
                                                        "more get 503 with Retry-After.")] = 64,
    read_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds a request's head, then its body, may take "
                                                         "to arrive (else 408).")] = 10.0,
    max_inflight_mb: Annotated[float, typer.Option(min=0.001, help="Request bodies in flight per worker, in all; "
                                                              "more get 503 with Retry-After.")] = 64.0,
    max_connections: Annotated[int, typer.Option(min=1, help="Open connections per worker; requests on more "
                                                        "get 503 with Retry-After.")] = 1024,
) -> None:
    """Serve exported models over HTTP: Open Inference Protocol (v2), /v1 JSON predict, /metrics."""
    from recmtl.serving.app import ServeOptions
    from recmtl.serving.app import serve as run_server
    typer.echo(f"serving {model} on http://{host}:{port} (v2: /v2/models/NAME/infer, v1: /v1/models/NAME/predict)")
    run_server(model, host, port, workers, ServeOptions(max_batch_size, max_wait_ms, int(max_body_mb * (1 << 20)), threads,
                                                        max_request_rows, max_concurrency, int(max_inflight_mb * (1 << 20)),
                                                        read_timeout, max_connections=max_connections))


@app.command()
def inspect(model: Annotated[Path, typer.Argument(help="ONNX model file.")]) -> None:
    """Print an ONNX model's inputs, outputs, recmtl metadata and size."""
    from recmtl.serving.wire import describe
    typer.echo("\n".join(describe(model)))


@datagen_app.command("funnel")
def datagen_funnel(
    out: TruthFolder,
    rows: Annotated[int, typer.Option(help="Total rows over all splits.")] = 200_000,
    seed: int = 0,
    categorical: Annotated[int, typer.Option(help="Number of categorical features.")] = 26,
    dense: Annotated[int, typer.Option(help="Number of dense features.")] = 13,
    cardinality: Annotated[int, typer.Option(help="Distinct ids of user_id/item_id (others spread from 3 up to it).")] = 1000,
    correlation: Annotated[float, typer.Option(help="Correlation of the click and conversion effects.")] = 0.5,
    valid_fraction: ValidFraction = 0.1,
    test_fraction: TestFraction = 0.1,
    tail: Annotated[int, typer.Option(help="Add a long tail: tail_id with this many ids (Zipf popularity, strong "
                                           "per-id effects) and two heavy-tailed numbers, views and price (0: off).")] = 0,
    interactions: Annotated[float, typer.Option(help="Add FM-style pairwise products of the categorical fields' factors "
                                                     "to the logits, with this standard deviation (0: off).")] = 0.0,
    task_fields: Annotated[int, typer.Option(help="N: the last N categorical fields move only click, the N before "
                                                  "them only conversion (0: off).")] = 0,
) -> None:
    """Impressions with click and conversion (conversion only after a click) and their true probabilities."""
    from recmtl.data.synthetic import funnel
    paths = funnel(out, rows, seed, categorical, dense, cardinality, correlation, valid_fraction=valid_fraction,
                   test_fraction=test_fraction, tail=tail, interactions=interactions, task_fields=task_fields)
    typer.echo("wrote " + ", ".join(str(p) for p in paths) + " (+ .truth.parquet with the true probabilities)")


@datagen_app.command("interests")
def datagen_interests(
    out: TruthFolder,
    rows: Annotated[int, typer.Option(help="Total rows over all splits.")] = 100_000,
    seed: int = 0,
    items: Annotated[int, typer.Option(help="Distinct item ids.")] = 1000,
    topics: Annotated[int, typer.Option(help="Latent topics of the items.")] = 20,
    history: Annotated[int, typer.Option(help="The most items in a row's history (hist).")] = 20,
    text: Annotated[bool, typer.Option(help="Add a title string whose words move the click.")] = False,
    valid_fraction: ValidFraction = 0.1,
    test_fraction: TestFraction = 0.1,
) -> None:
    """Candidate items and user histories (latent interests and topics): click from the history's relation to the
    candidate, conversion from its brand; their true probabilities."""
    from recmtl.data.synthetic import interests
    paths = interests(out, rows, seed, items, topics, history, text, valid_fraction, test_fraction)
    typer.echo("wrote " + ", ".join(str(p) for p in paths) + " (+ .truth.parquet with the true probabilities)")


@datagen_app.command("mmoe-synthetic")
def datagen_mmoe(
    out: SplitsFolder,
    correlation: Annotated[float, typer.Option(help="Task correlation p in [-1, 1] (the paper's 1.0, 0.9, 0.5, 0).")] = 0.5,
    rows: int = 100_000,
    seed: int = 0,
    dim: Annotated[int, typer.Option(help="Input dimension (the paper: 100).")] = 100,
    valid_fraction: ValidFraction = 0.1,
    test_fraction: TestFraction = 0.1,
) -> None:
    """The MMoE paper's synthetic regression task pair (section 4) with a chosen task correlation."""
    from recmtl.data.synthetic import mmoe_synthetic
    paths = mmoe_synthetic(out, rows, correlation, seed, dim, valid_fraction=valid_fraction, test_fraction=test_fraction)
    typer.echo("wrote " + ", ".join(str(p) for p in paths))


@datagen_app.command("task-clusters")
def datagen_task_clusters(
    out: SplitsFolder,
    rows: int = 20_000,
    seed: int = 0,
    clusters: Annotated[int, typer.Option(min=1, help="Clusters of related tasks.")] = 2,
    per_cluster: Annotated[int, typer.Option(min=1, help="Tasks per cluster (named c1_t1, c1_t2, ...).")] = 2,
    within: Annotated[float, typer.Option(help="Correlation of the tasks of one cluster; 0 across clusters.")] = 0.9,
    dim: Annotated[int, typer.Option(help="Input dimension.")] = 50,
) -> None:
    """Regression tasks in clusters of related ones (MMoE-synthetic style): the grouping `recmtl group` should find."""
    from recmtl.data.synthetic import task_clusters
    paths = task_clusters(out, rows, seed, clusters, per_cluster, within, dim)
    typer.echo("wrote " + ", ".join(str(p) for p in paths))


@datagen_app.command("digits-attributes")
def datagen_digits(
    out: Annotated[Path, typer.Argument(help="Folder for train/valid/test.parquet and config.yaml.")],
    seed: Annotated[int, typer.Option(help="Seed of the stratified split.")] = 0,
    valid_fraction: ValidFraction = 0.15,
    test_fraction: TestFraction = 0.15,
) -> None:
    """scikit-learn's bundled handwritten digits (8x8 PNG) with the digit and attributes (even, > 4, closed loop, ...)."""
    from recmtl.data.synthetic import digits_attributes
    paths = digits_attributes(out, seed, valid_fraction, test_fraction)
    typer.echo("wrote " + ", ".join(str(p) for p in paths) + f" and {out / 'config.yaml'}")


@datagen_app.command("shapes")
def datagen_shapes(
    out: Annotated[Path, typer.Argument(help="Folder for train/valid/test.parquet (+ .truth.parquet) and config.yaml.")],
    rows: Annotated[int, typer.Option(help="Total images over all splits.")] = 10_000,
    size: Annotated[int, typer.Option(help="Image width and height in pixels.")] = 32,
    seed: int = 0,
    valid_fraction: ValidFraction = 0.1,
    test_fraction: TestFraction = 0.1,
) -> None:
    """Drawn shapes (RGB PNG) with a known class (shape) and attributes (colour, fill, size)."""
    from recmtl.data.synthetic import shapes
    paths = shapes(out, rows, seed, size, valid_fraction, test_fraction)
    typer.echo("wrote " + ", ".join(str(p) for p in paths) + f" (+ .truth.parquet with the geometry) and {out / 'config.yaml'}")


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="CSV file (.csv or .csv.gz).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Parquet file to write.")],
    names: Annotated[Optional[str], typer.Option(help="Comma-separated column names (needed with --no-header).")] = None,
    header: Annotated[bool, typer.Option(help="The first line holds column names.")] = True,
    delimiter: str = ",",
    null_value: Annotated[list[str], typer.Option(
        help="A string read as null, e.g. '?'; repeatable. Default: empty field only, so 'NA' stays a value.")] = [],
    strip: Annotated[bool, typer.Option(help="Trim spaces around values ('a, b').")] = True,
    type_: Annotated[list[str], typer.Option("--type", help="COLUMN=TYPE (int64, float64, string); repeatable.")] = [],
    encoding: Annotated[str, typer.Option(help="The file's text encoding, e.g. latin-1 or cp1252.")] = "utf-8",
) -> None:
    """Convert CSV to Parquet, streaming (pyarrow's CSV reader)."""
    from recmtl.data.convert import csv_to_parquet
    col_names = [n.strip() for n in names.split(",")] if names else None
    if not header and not col_names:
        raise ConfigError("--no-header needs --names a,b,c")
    types = {}
    for item in type_:
        col, sep, typ = item.partition("=")
        if not sep:
            raise ConfigError(f"--type '{item}' must look like COLUMN=TYPE")
        types[col] = typ
    rows = csv_to_parquet(src, output, col_names, header, delimiter, null_value, strip, types, encoding=encoding)
    typer.echo(f"wrote {output}: {rows:,} rows")


@app.command()
def split(
    src: Annotated[str, typer.Argument(help="Parquet file, folder or glob.")],
    output: Annotated[list[Path], typer.Option("--output", "-o", help="Output Parquet file; one per fraction.")],
    fractions: Annotated[str, typer.Option(help="Comma-separated fractions summing to 1.")] = "0.5,0.5",
    seed: int = 0,
    order_by: Annotated[Optional[str], typer.Option(
        help="Time split: the rows with the earliest values of this column to the first output, the latest to the last.")] = None,
    group_by: Annotated[Optional[str], typer.Option(
        help="Group split: all rows of a value of this column (e.g. a user id) to one output.")] = None,
) -> None:
    """Split rows into several Parquet files (e.g. train, validation and test): at random, by time
    (--order-by) or by group (--group-by)."""
    from recmtl.data.convert import split_parquet
    try:
        fr = [float(x) for x in fractions.split(",")]
    except ValueError:
        raise ConfigError(f"--fractions '{fractions}' must be numbers like 0.5,0.5") from None
    counts = split_parquet(src, output, fr, seed, order_by=order_by, group_by=group_by)
    typer.echo(", ".join(f"{p}: {n:,} rows" for p, n in zip(output, counts)))


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="recmtl")
    except RecmtlError as exc:
        print(f"recmtl: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("recmtl: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
