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
    kind: Annotated[str, typer.Option(help="tower, head, balancer or encoder.")] = "tower",
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
    counts = {k: sum(f["kind"] == k for f in cfg["features"]) for k in ("categorical", "dense", "image", "sequence")}
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
    logger: Annotated[list[str], typer.Option("--logger", help="Experiment logger plugin (tensorboard, mlflow), added to "
                                                               "the config's loggers; repeatable.")] = [],
) -> None:
    """Train a multi-task model; writes best.pt, last.pt, config.yaml, schema.json, metrics.json to --out.
    Under `torchrun --nproc-per-node N` the same command trains data-parallel on N processes."""
    if device is not None:
        set_ = [*set_, f"train.device={device}"]
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
) -> None:
    """Per-task metrics of a trained model on DATA, over each task's labelled rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recmtl.data.parquet import ParquetSource
    from recmtl.files import atomic_path
    from recmtl.metrics import auc
    from recmtl.schema import check_types
    from recmtl.training.evaluate import format_table, load_run, predict, task_metrics

    run = load_run(run_dir, State.plugins, State.disabled, checkpoint)
    cols = [c for t in run.config.tasks for c in t.label_columns] + run.schema.feature_columns
    if run.schema.group_column:
        cols.append(run.schema.group_column)
    source = ParquetSource(data, cols)
    check_types(run.config, source)
    keep = list(dict.fromkeys(keep))
    if keep and save_predictions is None:
        raise ConfigError("--keep copies columns into the --save-predictions file; pass --save-predictions too")
    kept_source = ParquetSource(data, keep) if keep else None
    pred = predict(run.model, run.schema, source, batch_size, run.config.data.read_rows)
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
        out = {"data": data, "metrics": metrics, "epochs": run.epochs}
        if ref_metrics:
            out["reference"] = ref_metrics
        typer.echo(json.dumps(out, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
    else:
        if run.epochs:
            typer.echo("epochs: " + ", ".join(f"{t} {e}" for t, e in run.epochs.items()), err=True)
        typer.echo(format_table(metrics, ref_metrics))


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
    mlflow: Annotated[bool, typer.Option("--mlflow", help="Also log the model with MLflow's ONNX flavour into the run's "
                                                          "MLflow run and register it as --name.")] = False,
) -> None:
    """Export a self-contained ONNX model (raw columns in, one score per task out), checked against PyTorch."""
    from recmtl.export import PARITY_ATOL, PARITY_RTOL, export_run
    from recmtl.serving.triton import write_triton_repo
    diffs = export_run(run_dir, output, sample, sample_rows, State.plugins, State.disabled, checkpoint, typer.echo)
    typer.echo("parity vs PyTorch (max abs diff): " + ", ".join(f"{t}={d['max_abs']:.2e}" for t, d in diffs.items())
               + f" (limit {PARITY_ATOL:g} + {PARITY_RTOL:g} x |score|)")
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
    out: Annotated[Path, typer.Argument(help="Folder for train/valid/test.parquet and their .truth.parquet.")],
    rows: Annotated[int, typer.Option(help="Total rows over all splits.")] = 200_000,
    seed: int = 0,
    categorical: Annotated[int, typer.Option(help="Number of categorical features.")] = 26,
    dense: Annotated[int, typer.Option(help="Number of dense features.")] = 13,
    cardinality: Annotated[int, typer.Option(help="Distinct ids of user_id/item_id (others spread from 3 up to it).")] = 1000,
    correlation: Annotated[float, typer.Option(help="Correlation of the click and conversion effects.")] = 0.5,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    tail: Annotated[int, typer.Option(help="Add a long tail: tail_id with this many ids (Zipf popularity, strong "
                                           "per-id effects) and two heavy-tailed numbers, views and price (0: off).")] = 0,
) -> None:
    """Impressions with click and conversion (conversion only after a click) and their true probabilities."""
    from recmtl.data.synthetic import funnel
    paths = funnel(out, rows, seed, categorical, dense, cardinality, correlation, valid_fraction=valid_fraction,
                   test_fraction=test_fraction, tail=tail)
    typer.echo("wrote " + ", ".join(str(p) for p in paths) + " (+ .truth.parquet with the true probabilities)")


@datagen_app.command("mmoe-synthetic")
def datagen_mmoe(
    out: Annotated[Path, typer.Argument(help="Folder for train/valid/test.parquet.")],
    correlation: Annotated[float, typer.Option(help="Task correlation p in [-1, 1] (the paper's 1.0, 0.9, 0.5, 0).")] = 0.5,
    rows: int = 100_000,
    seed: int = 0,
    dim: Annotated[int, typer.Option(help="Input dimension (the paper: 100).")] = 100,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> None:
    """The MMoE paper's synthetic regression task pair (section 4) with a chosen task correlation."""
    from recmtl.data.synthetic import mmoe_synthetic
    paths = mmoe_synthetic(out, rows, correlation, seed, dim, valid_fraction=valid_fraction, test_fraction=test_fraction)
    typer.echo("wrote " + ", ".join(str(p) for p in paths))


@datagen_app.command("digits-attributes")
def datagen_digits(
    out: Annotated[Path, typer.Argument(help="Folder for train/valid/test.parquet and config.yaml.")],
    seed: Annotated[int, typer.Option(help="Seed of the stratified split.")] = 0,
    valid_fraction: float = 0.15,
    test_fraction: float = 0.15,
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
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
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
