"""``recmtl init``: a starter config written by reading the data: per column a proposal with its reason
(``recmtl.data.profile``), tasks with their heads and positives, and defaults sized by the training row count
(:func:`sized_defaults`)."""
from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from recmtl.data import profile as prof
from recmtl.data.arrow import plain_array
from recmtl.data.images import is_image_type
from recmtl.data.parquet import ParquetSource
from recmtl.data.sequences import item_type
from recmtl.errors import ConfigError, close_matches

HEADER = """\
# recmtl config written by `recmtl init`. Reference: docs/config.md.
# features: categorical (ints/strings -> vocabulary with min_count, or hash_buckets), dense
#           (numbers: clip, transform log1p for heavy tails, nulls filled, standardised) and image (PNG/JPEG
#           bytes or number lists: height, width, channels), sequence (lists of ints/strings, e.g. recent item
#           ids: the last max_length items, embedded and mean-pooled), text (free text: hashed words and
#           bigrams, mean-pooled). Each line says why init chose it; the
#           columns that are not features are listed below them. Move a column between kinds as you see fit.
# tasks:    label column, head (binary | esmm | regression | multiclass | multilabel | any registered head), weight.
# train:    batch size, epochs, patience, log_every and regularisation are sized by the training rows
#           (docs/training.md, "Defaults sized by the data"). Paths are relative to this file's folder.
"""


def _kind(typ: pa.DataType) -> str | None:
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if pa.types.is_integer(typ) or pa.types.is_boolean(typ) or pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "categorical"
    if pa.types.is_floating(typ) or pa.types.is_decimal(typ):
        return "dense"
    return None


def _is_sequence(source: ParquetSource, column: str) -> bool:
    """A list of strings, or a variable-length list of integers (not uint8 pixels): a sequence feature.
    Integer lists of one length in the first rows stay candidates for a number-list image."""
    typ = source.field(column).type
    found = item_type(typ)
    if found == "string":
        return True
    if found != "int" or pa.types.is_fixed_size_list(typ) or pa.types.is_uint8(typ.value_type):
        return False
    batch = next(source.batches(read_rows=1024, columns=[column]), None)
    if batch is None:
        return False
    lengths = pc.unique(pc.list_value_length(plain_array(batch.column(0))).drop_null())
    return len(lengths) > 1 or _image_shape(source, column) is None


def _image_shape(source: ParquetSource, column: str) -> dict[str, int] | None:
    """Height, width and channels of an image column, from its first non-null value: encoded bytes are
    opened with Pillow; a number list of length L is a square grey image (L = h*w) or RGB (L = 3*h*w)."""
    batch = next(source.batches(read_rows=64, columns=[column]), None)
    values = [] if batch is None else [v for v in batch.column(0).to_pylist() if v is not None]
    if not values:
        return None
    first = values[0]
    if isinstance(first, (bytes, bytearray)):
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(io.BytesIO(first)) as img:
                width, height = img.size
                channels = {"L": 1, "1": 1, "I": 1, "F": 1, "RGBA": 4, "LA": 4}.get(img.mode, 3)
        except (UnidentifiedImageError, OSError):
            return None
        return {"height": height, "width": width, "channels": channels}
    length = len(first)
    for channels in (1, 3):
        side = math.isqrt(length // channels)
        if side * side * channels == length:
            return {"height": side, "width": side, "channels": channels}
    return None


#: a threshold positive: "OP NUMBER" with OP one of >, >=, <, <=, ==, != (passed through to the config)
THRESHOLD = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def _parse_task(spec: str) -> tuple[str, str]:
    name, _, column = spec.partition("=")
    return name.strip(), (column.strip() or name.strip())


def parse_positives(items: list[str], tasks: list[tuple[str, str]]) -> dict[str, list[str] | str]:
    """``--positive KEY=SPEC`` -> task name -> its raw positive values (a list) or one threshold string. KEY is a
    task name, or else the label column of exactly one task (a task name wins when both match); SPEC is a value
    or a threshold "OP NUMBER" (``>0``, ``>=4``)."""
    names = [n for n, _ in tasks]
    by_column: dict[str, list[str]] = {}
    for name, column in tasks:
        by_column.setdefault(column, []).append(name)
    out: dict[str, list[str] | str] = {}
    for item in items:
        key, sep, spec = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--positive '{item}' must look like TASK=VALUE, TASK=\">=NUMBER\" or COLUMN=VALUE")
        if key in names:
            task = key
        elif len(by_column.get(key, [])) == 1:
            task = by_column[key][0]
        elif key in by_column:
            raise ConfigError(f"--positive '{item}': column '{key}' is the label of tasks {', '.join(by_column[key])}; "
                              f"key it by task, e.g. --positive {by_column[key][0]}={spec}")
        else:
            raise ConfigError(f"--positive '{item}': '{key}' is neither a task ({', '.join(names)}) nor the label column "
                              f"of one{close_matches(key, names + list(by_column))}")
        threshold = THRESHOLD.match(spec)
        before = out.get(task)
        if threshold:
            if before is not None:
                raise ConfigError(f"--positive '{item}': task '{task}' already has positives {before!r}; a threshold "
                                  "stands alone")
            out[task] = threshold.group(1) + threshold.group(2)
        elif isinstance(before, str):
            raise ConfigError(f"--positive '{item}': task '{task}' already has the threshold {before!r}")
        else:
            out.setdefault(task, []).append(spec)
    return out


def _typed_positive(task: str, column: str, typ: pa.DataType, positive: list[str] | str | None) -> list[Any] | str | None:
    """Positive values in the label column's type (ints for an int column); a threshold needs a numeric column."""
    if positive is None:
        return None
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    numeric = pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_decimal(typ)
    if isinstance(positive, str):
        if not numeric:
            raise ConfigError(f"--positive for task '{task}': the threshold {positive!r} needs a numeric label column; "
                              f"'{column}' holds {typ}")
        return positive
    if pa.types.is_integer(typ):
        try:
            return [int(v) for v in positive]
        except ValueError:
            raise ConfigError(f"--positive for task '{task}': label column '{column}' holds integers, got "
                              f"{', '.join(positive)}") from None
    if pa.types.is_floating(typ):
        try:
            return [float(v) for v in positive]
        except ValueError:
            raise ConfigError(f"--positive for task '{task}': label column '{column}' holds numbers, got "
                              f"{', '.join(positive)}") from None
    return list(positive)


def _head_for(name: str, column: str, sample: pa.Array, positive: list[Any] | str | None) -> str:
    if positive is not None:
        return "binary"
    sample = plain_array(sample)
    typ = sample.type
    if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)):
        values = pc.unique(sample.drop_null()).to_pylist()[:5]
        raise ConfigError(
            f"task '{name}': label column '{column}' holds {typ} values such as {values}; say which count as 1 "
            f"with --positive {name}=VALUE (or a threshold: --positive '{name}=>0')"
        )
    values = sample.drop_null().cast(pa.float64()).to_numpy()
    if len(values) and np.isin(np.unique(values), [0.0, 1.0]).all():
        return "binary"
    return "regression"


@dataclass
class Sized:
    """The defaults sized by the training row count, with one line of why per value (YAML comments, docs)."""

    train: dict[str, Any]
    dropout: float
    notes: list[str] = field(default_factory=list)


#: about this many optimizer steps per epoch: the batch is the power of two nearest rows / STEPS_PER_EPOCH
STEPS_PER_EPOCH = 256
MIN_BATCH, MAX_BATCH = 64, 2048
#: epochs give at least this many steps in all (early stopping ends the run sooner), within [MIN_EPOCHS, MAX_EPOCHS]
TOTAL_STEPS = 4000
MIN_EPOCHS, MAX_EPOCHS = 10, 100
#: balance-log lines (report points) aimed at over the first MIN_EPOCHS epochs
LOG_POINTS = 100
#: below this many training rows the tower gets dropout SMALL_DROPOUT
SMALL_DATA = 1_000_000
SMALL_DROPOUT = 0.1


def sized_defaults(rows: int) -> Sized:
    """``train.batch_size``, ``train.epochs``, ``train.early_stopping.patience``, ``train.log_every`` and the tower's
    dropout for ``rows`` training rows (the rules of docs/training.md). The embedding weight decay stays 0: on the
    long-tail data it did not help, ``min_count`` did (benchmarks/RESULTS.md)."""
    rows = max(rows, 1)
    batch = int(min(MAX_BATCH, max(MIN_BATCH, 2 ** round(math.log2(max(rows / STEPS_PER_EPOCH, 1))))))
    steps = math.ceil(rows / batch)
    epochs = int(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TOTAL_STEPS / steps))))
    patience = 5 if rows < 10_000 else 3 if rows < SMALL_DATA else 2
    log_every = int(min(200, max(1, steps * MIN_EPOCHS // LOG_POINTS)))
    dropout = SMALL_DROPOUT if rows < SMALL_DATA else 0.0
    train = {"batch_size": batch, "epochs": epochs, "log_every": log_every,
             "early_stopping": {"monitor": "auto", "patience": patience}}
    notes = [f"sized for {rows:,} training rows: batch {batch} ({steps:,} steps an epoch), at most {epochs} epochs "
             f"(>= {TOTAL_STEPS:,} steps in all; early stopping after {patience} without improvement), a balance-log "
             f"line every {log_every} steps"]
    if dropout:
        notes.append(f"fewer than {SMALL_DATA:,} rows: dropout {dropout} in the tower")
    return Sized(train, dropout, notes)


#: tower widths: below SMALL_DATA rows the narrow ones (as good on census-income and the long-tail set, 3-5x faster)
WIDE = {"mmoe": {"num_experts": 4, "expert_units": [256, 128], "task_units": [64]},
        "shared_bottom": {"bottom_units": [256, 128], "task_units": [64]}}
NARROW = {"mmoe": {"num_experts": 4, "expert_units": [64], "task_units": [32]},
          "shared_bottom": {"bottom_units": [128], "task_units": [32]}}


def _tower(name: str | None, n_tasks: int, rows: int, dropout: float) -> tuple[dict[str, Any], str]:
    """The tower section and why: one task gets shared_bottom (a mixture of experts needs several tasks to share),
    several mmoe; narrow layers below :data:`SMALL_DATA` rows."""
    if name is None:
        name = "shared_bottom" if n_tasks == 1 else "mmoe"
        why = "one task: a plain MLP (experts and gates have no tasks to share)" if n_tasks == 1 else \
            f"{n_tasks} tasks: a mixture of experts with one gate per task"
    else:
        why = "--tower"
    sizes = NARROW if rows < SMALL_DATA else WIDE
    params: dict[str, Any] = dict(sizes.get(name, {}))
    if params:
        why += f"; {'narrow' if rows < SMALL_DATA else 'wide'} layers for {rows:,} rows"
    if dropout and name in sizes:
        params["dropout"] = dropout
    return {"name": name} | params, why


@dataclass
class Starter:
    """What ``recmtl init`` writes and prints: the config, one proposal per column, warnings, notes."""

    config: dict[str, Any]
    proposals: list[prof.Proposal]
    warnings: list[str]
    notes: dict[str, str]  # YAML section -> comment
    rows: int
    sampled: int

    @property
    def skipped(self) -> list[str]:
        return [f"{p.name} ({p.type})" for p in self.proposals if p.decision == "unsupported"]

    def __getitem__(self, key: str) -> Any:  # the dict this used to be: ["config"], ["skipped"]
        return {"config": self.config, "skipped": self.skipped}[key]


def starter_config(data: str, tasks: list[str], config_path: str | Path, positives: list[str] = (),
                   exclude: list[str] = (), dense: list[str] = (), categorical: list[str] = (),
                   validation: str | None = None, test: str | None = None, tower: str | None = None,
                   group_column: str | None = None, heads: list[str] = (), labels: list[str] = (),
                   features: list[str] = ()) -> Starter:
    """Read ``data`` (a sample of :data:`recmtl.data.profile.SAMPLE_ROWS` rows) and propose a config.

    ``labels``: other outcome columns of the file (never features); ``features``: columns to use even when a
    rule would leave them out; ``exclude``: columns to leave out; ``dense``/``categorical``: a kind to force."""
    if not tasks:
        raise ConfigError("name at least one task: --task COLUMN (or --task NAME=COLUMN)")
    source = ParquetSource(data)
    names = source.schema.names
    parsed = [_parse_task(t) for t in tasks]
    task_names = [n for n, _ in parsed]
    if len(set(task_names)) < len(task_names):
        raise ConfigError(f"two tasks share a name: {', '.join(task_names)}; use --task NAME=COLUMN")
    pos = parse_positives(list(positives), parsed)
    chosen: dict[str, str] = {}
    for item in heads:
        name, sep, head_name = item.partition("=")
        if not sep or name not in task_names:
            raise ConfigError(f"--head '{item}' must be TASK=HEAD with TASK one of {', '.join(task_names)}")
        chosen[name] = head_name
    options = {"--exclude": exclude, "--dense": dense, "--categorical": categorical, "--label": labels,
               "--feature": features, "--group-column": [group_column] if group_column else []}
    for option, cols in options.items():
        for col in cols:
            if col not in names:
                raise ConfigError(f"{option} {col}: column '{col}' not found in {data}{close_matches(col, names)}")
    for _, col in parsed:
        if col not in names:
            raise ConfigError(f"--task: column '{col}' not found in {data}{close_matches(col, names)}")
    label_cols = {c for _, c in parsed}
    flat = [c for c in names if _flat_type(source.field(c).type) or c in label_cols]
    sample = prof.read_sample(source, flat)
    if sample.num_rows == 0:
        raise ConfigError(f"{data} has no rows")
    task_cfg: list[dict[str, Any]] = []
    binary_labels: dict[str, np.ndarray] = {}
    value_labels: dict[str, np.ndarray] = {}
    for name, column in parsed:
        positive = _typed_positive(name, column, source.field(column).type, pos.get(name))
        head = chosen.get(name) or _head_for(name, column, sample.column(column), positive)
        entry: dict[str, Any] = {"name": name, "label": column, "head": head, "weight": 1.0}
        if positive is not None:
            entry["positive"] = positive
        task_cfg.append(entry)
        if head in ("binary", "esmm"):
            y = prof.binary_label_sample(sample.column(column), positive)
            if y is not None:
                binary_labels[name] = y
        elif head == "regression" and _numeric(source.field(column).type):
            value_labels[name] = plain_array(sample.column(column)).cast(pa.float64()).fill_null(np.nan).to_numpy(
                zero_copy_only=False)
    value_labels.update(binary_labels)
    index_cols = prof.pandas_index_columns(source.schema)
    proposals, warnings = [], []
    for col in names:
        proposals.append(_propose_column(source, sample, col, label_cols, parsed, set(exclude), set(labels), set(dense),
                                         set(categorical), set(features), index_cols, binary_labels, value_labels))
        if proposals[-1].warning:
            warnings.append(proposals[-1].warning)
    feature_cfg = [p.feature for p in proposals if p.feature is not None]
    if not feature_cfg:
        raise ConfigError(f"{data} has no usable feature columns besides the labels (see the table: every column's reason)")
    base = Path(config_path).resolve().parent

    def rel(p: str | None) -> str | None:
        return None if p is None else os.path.relpath(Path(p).resolve(), base)

    data_cfg = {"train": rel(data)}
    if validation:
        data_cfg["validation"] = rel(validation)
    if test:
        data_cfg["test"] = rel(test)
    sized = sized_defaults(source.num_rows)
    tower_cfg, tower_why = _tower(tower, len(task_cfg), source.num_rows, sized.dropout)
    optimizer: dict[str, Any] = {"name": "adam", "lr": 0.001}
    cfg: dict[str, Any] = {
        "seed": 42,
        "data": data_cfg,
        "features": feature_cfg,
        "tasks": task_cfg,
        "encoders": {"categorical": {"name": "embedding", "dim": 16}}
        | ({"image": {"name": "cnn"}} if any(f["kind"] == "image" for f in feature_cfg) else {})
        | ({"sequence": {"name": "sequence_pool", "dim": 16, "pooling": "mean"}}
           if any(f["kind"] == "sequence" for f in feature_cfg) else {})
        | ({"text": {"name": "text_bag", "dim": 16}} if any(f["kind"] == "text" for f in feature_cfg) else {}),
        "tower": tower_cfg,
        "balancer": {"name": "fixed"},
        "optimizer": optimizer,
        "train": sized.train,
    }
    if group_column:
        cfg["evaluation"] = {"group_column": group_column}
    notes = {"tower": tower_why, "train": "; ".join(sized.notes)}
    if not validation:
        warnings.append("no --validation: early stopping and the best checkpoint then follow the training loss, which "
                        "keeps falling as the model over-fits; hold out rows (recmtl split) and pass --validation")
    return Starter(cfg, proposals, warnings, notes, source.num_rows, sample.num_rows)


def _flat_type(typ: pa.DataType) -> bool:
    """A column profiled from the sample (not lists, binary images, structs)."""
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    return not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)
                or pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_fixed_size_binary(typ)
                or pa.types.is_struct(typ) or pa.types.is_map(typ))


def _propose_column(source: ParquetSource, sample: pa.Table, col: str, label_cols: set[str],
                    tasks: list[tuple[str, str]], exclude: set[str], labels: set[str], dense: set[str],
                    categorical: set[str], features: set[str], index_cols: set[str],
                    binary_labels: dict[str, np.ndarray], value_labels: dict[str, np.ndarray]) -> prof.Proposal:
    typ = source.field(col).type
    if col not in sample.column_names:  # lists, binary: sequence / image / unsupported, as before
        p = prof.Proposal(col, str(typ), 0, 0, 0.0)
        if col in label_cols:
            p.decision, p.reason = "task label", "the label of task " + ", ".join(n for n, c in tasks if c == col)
        elif col in exclude or col in labels:
            p.decision, p.reason = "excluded", "--exclude" if col in exclude else "another task's label (--label)"
        elif _is_sequence(source, col):
            p.decision, p.reason = "sequence", "a list of ids: the last 50 items, embedded and pooled"
            p.feature = {"name": col, "kind": "sequence", "max_length": 50}
        elif is_image_type(typ) and (shape := _image_shape(source, col)) is not None:
            p.decision, p.reason = "image", "image {height}x{width}, {channels} channel(s)".format(**shape)
            p.feature = {"name": col, "kind": "image", **shape}
        else:
            p.decision, p.reason = "unsupported", f"type {typ} is no feature kind"
        return p
    arr = sample.column(col)
    p = prof.profile_column(col, arr, source.num_rows)
    if col in label_cols:
        p.decision, p.reason = "task label", "the label of task " + ", ".join(n for n, c in tasks if c == col)
        return p
    if col in exclude:
        p.decision, p.reason = "excluded", "--exclude"
        return p
    if col in labels:
        p.decision, p.reason = "excluded", "another task's label (--label): never a feature"
        return p
    asked = col in features or col in dense or col in categorical
    p = prof.propose(p, arr, source.num_rows, {} if asked else binary_labels, col in index_cols and not asked,
                     value_labels)
    if not asked:
        if p.feature is None and not p.decision:
            p.decision, p.reason = "unsupported", f"type {typ} is no feature kind"
        return p
    p.warning = None
    option = "--dense" if col in dense else "--categorical" if col in categorical else "--feature"
    kind = "dense" if col in dense else "categorical" if col in categorical else _forced_kind(arr.type, col, p.distinct)
    if kind == "dense":
        if not _numeric(arr.type):
            raise ConfigError(f"{option} {col}: column '{col}' holds {arr.type}, not numbers")
        prof._dense(p, prof._numbers(plain_array(arr)), option)
    elif kind == "categorical":
        if not _categorisable(arr.type):
            raise ConfigError(f"{option} {col}: column '{col}' holds {arr.type}; a categorical feature takes integers, "
                              "strings or booleans")
        prof._categorical(p, option, source.num_rows)
    else:
        raise ConfigError(f"--feature {col}: column '{col}' holds {arr.type}, which is no feature kind")
    return p


def _forced_kind(typ: pa.DataType, col: str, distinct: int) -> str | None:
    """The kind of a column asked for with --feature, by its type, name and number of values."""
    typ = typ.value_type if pa.types.is_dictionary(typ) else typ
    if pa.types.is_floating(typ) or pa.types.is_decimal(typ):
        return "dense"
    if pa.types.is_integer(typ):
        return "categorical" if prof.looks_like_id(col) or distinct <= prof.SMALL_INT else "dense"
    return "categorical" if _categorisable(typ) else None


def _numeric(typ: pa.DataType) -> bool:
    typ = typ.value_type if pa.types.is_dictionary(typ) else typ
    return pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_decimal(typ) or pa.types.is_boolean(typ)


def _categorisable(typ: pa.DataType) -> bool:
    typ = typ.value_type if pa.types.is_dictionary(typ) else typ
    return pa.types.is_integer(typ) or pa.types.is_boolean(typ) or pa.types.is_string(typ) or pa.types.is_large_string(typ)


def summary_table(starter: Starter) -> str:
    """One line per column: name, type, distinct/rows, nulls, decision, reason."""
    rows = [("column", "type", "distinct/rows", "nulls", "decision", "reason")]
    for p in starter.proposals:
        ratio = p.ratio if p.rows else "-"
        rows.append((p.name, p.type, ratio, f"{p.null_share:.1%}" if p.rows else "-", p.decision, p.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows]
    where = f"all {starter.rows:,} rows" if starter.sampled >= starter.rows else \
        f"a sample of {starter.sampled:,} of {starter.rows:,} rows"
    return f"columns of the training data ({where}):\n" + "\n".join(lines)


def render(cfg: dict[str, Any] | Starter, skipped: list[str] = ()) -> str:
    """The YAML text: the header, then each section; a feature line carries its reason as a comment, the columns
    that are not features follow as comments, and the tower and train sections say why."""
    if not isinstance(cfg, Starter):  # a plain config dict (the older call)
        text = HEADER
        if skipped:
            text += "# skipped columns of unsupported types: " + ", ".join(skipped) + "\n"
        return text + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=110)
    starter = cfg
    config = starter.config
    reasons = {p.name: p.reason for p in starter.proposals}
    out = [HEADER]

    def dump(key: str) -> None:
        value = config[key]
        style = None if isinstance(value, (dict, list)) else False  # a lone scalar in block style: "seed: 42"
        out.append(yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=style, width=110))

    for key in config:
        if key == "features":
            out.append("features:\n")
            for f in config["features"]:
                line = yaml.safe_dump([f], sort_keys=False, default_flow_style=True, width=10_000).strip()
                out.append(f"- {line[1:-1]}  # {reasons.get(f['name'], '')}\n")
            others = [p for p in starter.proposals if p.feature is None]
            if others:
                out.append("# not features:\n")
                out += [f"#   {p.name}: {p.decision}: {p.reason}\n" for p in others]
        else:
            if key in starter.notes:
                out.append(f"# {key}: {starter.notes[key]}\n")
            dump(key)
    return "".join(out)
