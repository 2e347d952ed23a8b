"""``recmtl init``: a starter config written by inspecting a Parquet file's schema."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from recmtl.data.arrow import plain_array
from recmtl.data.images import is_image_type
from recmtl.data.parquet import ParquetSource
from recmtl.data.sequences import item_type
from recmtl.errors import ConfigError, close_matches

HEADER = """\
# recmtl config written by `recmtl init`. Reference: docs/config.md.
# features: categorical (ints/strings -> vocabulary with min_count, or hash_buckets), dense
#           (floats: nulls filled, standardised) and image (PNG/JPEG bytes or number lists: height, width,
#           channels), sequence (lists of ints/strings, e.g. recent item ids: the last max_length items,
#           embedded and mean-pooled). Move a column between kinds as you see fit.
# tasks:    label column, head (binary | esmm | regression | multiclass | multilabel | any registered head), weight.
# Paths are relative to this file's folder.
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


def _parse_task(spec: str) -> tuple[str, str]:
    name, _, column = spec.partition("=")
    return name.strip(), (column.strip() or name.strip())


def _head_for(name: str, column: str, sample: pa.Array, positive: list[Any] | None) -> str:
    if positive is not None:
        return "binary"
    typ = sample.type
    if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)):
        values = pc.unique(sample.drop_null()).to_pylist()[:5]
        raise ConfigError(
            f"task '{name}': label column '{column}' holds {typ} values such as {values}; say which count as 1 "
            f"with --positive {column}=VALUE"
        )
    values = sample.drop_null().cast(pa.float64()).to_numpy()
    if len(values) and np.isin(np.unique(values), [0.0, 1.0]).all():
        return "binary"
    return "regression"


def starter_config(data: str, tasks: list[str], config_path: str | Path, positives: list[str] = (),
                   exclude: list[str] = (), dense: list[str] = (), categorical: list[str] = (),
                   validation: str | None = None, test: str | None = None, tower: str = "mmoe",
                   group_column: str | None = None, heads: list[str] = ()) -> dict[str, Any]:
    if not tasks:
        raise ConfigError("name at least one task: --task COLUMN (or --task NAME=COLUMN)")
    source = ParquetSource(data)
    names = source.schema.names
    pos: dict[str, list[Any]] = {}
    for item in positives:
        col, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--positive '{item}' must look like COLUMN=VALUE")
        pos.setdefault(col.strip(), []).append(value)
    parsed = [_parse_task(t) for t in tasks]
    chosen: dict[str, str] = {}
    for item in heads:
        name, sep, head_name = item.partition("=")
        if not sep or name not in {n for n, _ in parsed}:
            raise ConfigError(f"--head '{item}' must be TASK=HEAD with TASK one of {', '.join(n for n, _ in parsed)}")
        chosen[name] = head_name
    for col in [c for _, c in parsed] + list(exclude) + list(dense) + list(categorical) + list(pos) + (
            [group_column] if group_column else []):
        if col not in names:
            raise ConfigError(f"column '{col}' not found in {data}{close_matches(col, names)}")
    sample = next(source.batches(read_rows=100_000, columns=[c for _, c in parsed]), None)
    if sample is None:
        raise ConfigError(f"{data} has no rows")
    labels = {c for _, c in parsed}
    task_cfg = []
    for name, column in parsed:
        positive = pos.get(column)
        if positive is not None and _kind(source.field(column).type) and pa.types.is_integer(source.field(column).type):
            positive = [int(v) for v in positive]
        head = chosen.get(name) or _head_for(name, column, sample.column(column), positive)
        entry: dict[str, Any] = {"name": name, "label": column, "head": head, "weight": 1.0}
        if positive is not None:
            entry["positive"] = positive
        task_cfg.append(entry)
    features, skipped = [], []
    for col in names:
        if col in labels or col in exclude:
            continue
        kind = "dense" if col in dense else "categorical" if col in categorical else _kind(source.field(col).type)
        if kind is None and _is_sequence(source, col):
            features.append({"name": col, "kind": "sequence", "max_length": 50})
            continue
        if kind is None and is_image_type(source.field(col).type):
            shape = _image_shape(source, col)
            if shape is not None:
                features.append({"name": col, "kind": "image", **shape})
                continue
        if kind is None:
            skipped.append(f"{col} ({source.field(col).type})")
            continue
        features.append({"name": col, "kind": kind})
    if not features:
        raise ConfigError(f"{data} has no usable feature columns besides the labels")
    base = Path(config_path).resolve().parent

    def rel(p: str | None) -> str | None:
        return None if p is None else os.path.relpath(Path(p).resolve(), base)

    data_cfg = {"train": rel(data)}
    if validation:
        data_cfg["validation"] = rel(validation)
    if test:
        data_cfg["test"] = rel(test)
    cfg: dict[str, Any] = {
        "seed": 42,
        "data": data_cfg,
        "features": features,
        "tasks": task_cfg,
        "encoders": {"categorical": {"name": "embedding", "dim": 16}}
        | ({"image": {"name": "cnn"}} if any(f["kind"] == "image" for f in features) else {})
        | ({"sequence": {"name": "sequence_pool", "dim": 16, "pooling": "mean"}}
           if any(f["kind"] == "sequence" for f in features) else {}),
        "tower": {"name": tower} | ({"num_experts": 4, "expert_units": [256, 128], "task_units": [64]} if tower == "mmoe" else {}),
        "balancer": {"name": "fixed"},
        "optimizer": {"name": "adam", "lr": 0.001},
        "train": {"batch_size": 2048, "epochs": 10, "early_stopping": {"monitor": "auto", "patience": 2}},
    }
    if group_column:
        cfg["evaluation"] = {"group_column": group_column}
    return {"config": cfg, "skipped": skipped}


def render(cfg: dict[str, Any], skipped: list[str]) -> str:
    text = HEADER
    if skipped:
        text += "# skipped columns of unsupported types: " + ", ".join(skipped) + "\n"
    return text + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=110)
