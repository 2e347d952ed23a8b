"""``recmtl export``: one self-contained ONNX file from a run directory.

Inputs are the raw feature columns (int64 or string for categorical, float32 for dense, dynamic batch);
vocabulary lookup (``ai.onnx.ml.LabelEncoder``) or hashing, null handling and standardisation run inside
the graph. An image feature is a float32 input ``[batch, C, H, W]`` with pixels scaled to [0, 1]: decoding
PNG/JPEG bytes stays outside the graph (``recmtl.data.images``, used by ``recmtl score`` and ``recmtl serve``).
A sequence feature is an int64 or string input ``[batch, max_length]``: a row's last items, the unused
positions holding the padding sentinel (``recmtl.serving.wire.PAD_INT`` = INT64_MIN + 1, ``PAD_STRING``), which
the in-graph lookup maps to the padding id; nulls inside a list are missing values as for categorical.
One output per task: ``[batch]`` (a probability for binary heads, pCTCVR for ESMM, a value for regression)
or ``[batch, K]`` (class probabilities of a multiclass head, attribute probabilities of a multilabel head,
their names in the metadata's ``classes``). A binary or ESMM task trained with ``negative_sampling_rate`` < 1 is
corrected to the full base rate inside the graph, and a calibrator ``recmtl calibrate`` stored is applied after that
(metadata ``recmtl.calibration``); ``fuse`` adds the output ``ranking_score`` computed from the final task scores. The recmtl
schema, task names, versions and the precision (``recmtl.precision``) are in ``metadata_props``. Export checks
parity against PyTorch on sample rows and writes nothing when it fails; ``precision`` int8 or fp16 converts the
checked fp32 graph (``recmtl.export.precision``) and checks its quality on labelled sample rows instead;
``int8-static`` calibrates on ``calibration_data`` (default: the validation data).
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
import pyarrow as pa

from recmtl.calibration import FUSED_OUTPUT, fuse_expression
from recmtl.data.parquet import ParquetSource
from recmtl.errors import ConfigError, DataError, RecmtlError
from recmtl.export.graph import build_onnx
from recmtl.export.metadata import metadata, model_inputs
from recmtl.export.parity import PARITY_ATOL, PARITY_RTOL, parity, parity_failures
from recmtl.export.precision import CALIBRATION_ROWS, PRECISIONS, QUALITY_BOUND, convert, quality
from recmtl.files import atomic_path
from recmtl.training.evaluate import PER_TASK, load_run


class ExportError(RecmtlError):
    """Export failed (e.g. the ONNX model disagrees with PyTorch)."""


def export_run(run_dir: str | Path, output: str | Path, sample_data: str | None = None, sample_rows: int = 4096,
               plugins: list[str] = (), disabled: list[str] = (), checkpoint: str = PER_TASK,
               say: Callable[[str], None] | None = None, calibration: bool = True,
               fuse: str | None = None, precision: str = "fp32",
               calibration_data: str | None = None) -> dict[str, dict[str, float]]:
    """Write ``output`` atomically after the parity check; returns its per-task differences (``parity``), and for
    ``precision`` int8 / fp16 under ``"quality"`` the per-task quality check (``recmtl.export.precision.quality``).
    ``checkpoint`` as in ``load_run``: by default each task is scored by the model of its own best epoch; when
    those epochs differ the graph holds one copy of the network per distinct epoch (``say`` is told the cost).
    ``calibration_data``: Parquet whose first ``CALIBRATION_ROWS`` rows calibrate an ``int8-static`` export
    (default: the run's validation data; a run without it must pass this)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision '{precision}': use one of {', '.join(PRECISIONS)}")
    run = load_run(run_dir, list(plugins), list(disabled), checkpoint, calibration)
    low = precision != "fp32"
    if precision == "int8-static" and calibration_data is None and not run.config.data.validation:
        need = "--calibration-data PARQUET (feature columns of a few thousand rows like those it will score)"
        if sample_data is None:
            need += " and --sample PARQUET (labelled rows for the quality check; it may be the same file)"
        raise ConfigError(f"--precision int8-static calibrates its activation ranges on sample rows, and the run in "
                          f"{run_dir} has no data.validation to take them from: pass {need}")
    if calibration_data is not None and precision != "int8-static":
        raise ConfigError(f"--calibration-data is for --precision int8-static (not {precision}): drop it or use "
                          "--precision int8-static")
    if low and sample_data is None and not run.config.data.validation:
        raise ConfigError(f"--precision {precision} checks the converted model's quality on labelled validation rows, "
                          f"and the run in {run_dir} has no data.validation: pass --sample PARQUET with the feature and "
                          f"label columns ({', '.join(c for t in run.config.tasks for c in t.label_columns)}) of rows "
                          "the model was not trained on")
    scalar = [t for t in run.model.task_names if run.model.heads[t].label_type not in ("class", "multi")]
    where = "--fuse"
    if fuse is None and run.config.export.fuse is not None:  # the run's config, when --fuse is not given
        fuse, where = run.config.export.fuse, "export.fuse"
    fuse = fuse or None  # --fuse '': no ranking score, whatever the config says
    if fuse is not None and FUSED_OUTPUT in run.model.task_names:
        raise ConfigError(f"{where} adds the output '{FUSED_OUTPUT}', which is also a task's name; rename the task")
    fusion = fuse_expression(fuse, scalar, where) if fuse is not None else None
    if say is not None and run.scores:
        parts = [f"{t}: negatives kept at {r:g}" for t, r in run.scores.rates.items() if r != 1.0]
        parts += [f"{t}: {c.method} calibrator" for t, c in run.scores.calibrators.items()]
        say("score map in the graph: " + "; ".join(parts))
    if say is not None and run.epochs:
        distinct = sorted(set(run.epochs.values()))
        epochs = ", ".join(f"{t}: {e}" for t, e in run.epochs.items())
        if len(distinct) > 1:
            say(f"each task from its own best epoch ({epochs}): the model holds {len(distinct)} copies of the network, "
                f"so it is {len(distinct)}x the size and scores about {len(distinct)}x slower; `--checkpoint best` "
                "exports one network (best.pt)")
        else:
            say(f"epoch {distinct[0]} for every task ({epochs})")
    inputs = model_inputs(run)
    model = build_onnx(run, fusion)
    props = {**metadata(run, inputs, fusion), "recmtl.precision": precision}
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    spec = sample_data or run.config.resolve(run.config.data.validation or run.config.data.train)
    labels = [c for t in run.config.tasks for c in t.label_columns]
    columns = run.schema.feature_columns
    calibration = None
    if precision == "int8-static":
        from recmtl.serving.score import to_feeds
        cal_spec = calibration_data or run.config.resolve(run.config.data.validation)
        cal = _first_rows(ParquetSource(cal_spec, run.schema.feature_columns), CALIBRATION_ROWS)
        if not len(cal):
            raise DataError(f"--precision int8-static: the calibration data {cal_spec} has no rows; pass "
                            "--calibration-data PARQUET with a few thousand rows")
        feeds = to_feeds(cal, inputs)
        calibration = [{k: v[i:i + 256] for k, v in feeds.items()} for i in range(0, len(cal), 256)]
        if say is not None:
            say(f"int8-static: activation ranges calibrated on {len(cal):,} rows of {cal_spec}")
    if low:
        probe = ParquetSource(spec)
        missing = [c for c in labels if c not in probe.schema.names]
        if missing:
            raise ConfigError(f"--precision {precision} checks quality on labelled rows, but {spec} has no label "
                              f"column(s) {', '.join(missing)}: pass --sample PARQUET with the label columns")
        columns = list(dict.fromkeys(columns + labels + ([run.schema.group_column] if run.schema.group_column
                                                         and run.schema.group_column in probe.schema.names else [])))
    sample = _first_rows(ParquetSource(spec, columns), sample_rows)
    with atomic_path(output) as tmp:
        onnx.save_model(model, str(tmp))
        diffs = parity(run, tmp, sample, fusion)
        bad = parity_failures(diffs)
        if bad:
            worst = ", ".join(f"{t}: max abs {d['max_abs']:.3g}, max rel {d['max_rel']:.3g}" for t, d in bad.items())
            raise ExportError(f"ONNX scores differ from PyTorch by more than {PARITY_ATOL:g} + {PARITY_RTOL:g} x |score| "
                              f"on {len(sample)} rows of {spec} ({worst}); no file written")
        if low:
            converted = convert(model, precision, calibration)
            del converted.metadata_props[:]
            for key, value in props.items():
                entry = converted.metadata_props.add()
                entry.key, entry.value = key, value
            with tempfile.TemporaryDirectory() as work:  # the fp32 graph (checked above) is the reference
                reference = Path(work) / "fp32.onnx"
                shutil.move(tmp, reference)
                onnx.save_model(converted, str(tmp))
                checked = quality(run, reference, tmp, sample)
            failed = {t: q for t, q in checked.items() if not q["ok"]}
            if failed:
                worst = ", ".join(f"task '{t}': {q['metric']} {q['fp32']:.5f} -> {q['value']:.5f} "
                                  f"(difference {q['delta']:+.5f}, bound {q['bound']:.3g})" for t, q in failed.items())
                raise ExportError(f"the {precision} model's quality on {len(sample)} rows of {spec} is outside the "
                                  f"bound |difference| <= {QUALITY_BOUND:g} against fp32 ({worst}); no file written; "
                                  "export --precision fp32 (or the other low precision) instead")
            diffs = {**diffs, "quality": checked}
    return diffs


def _first_rows(source: ParquetSource, rows: int) -> pa.Table:
    """The first ``rows`` rows of ``source`` (fewer when it has fewer)."""
    batches, n = [], 0
    for batch in source.batches(read_rows=min(rows, 65_536)):
        batches.append(batch)
        n += batch.num_rows
        if n >= rows:
            break
    return pa.Table.from_batches(batches).slice(0, rows) if batches else source.schema.empty_table()


__all__ = ["PARITY_ATOL", "PARITY_RTOL", "PRECISIONS", "QUALITY_BOUND", "ExportError",
           "build_onnx", "export_run", "metadata", "model_inputs", "parity"]
