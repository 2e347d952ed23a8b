"""The fit pass: one streaming pass over the training data for vocabularies, dense statistics and label
checks, then the leak check."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recmtl.config import Config, FeatureConfig, TaskConfig
from recmtl.data.arrow import plain_array
from recmtl.data.parquet import ParquetSource
from recmtl.errors import DataError
from recmtl.schema.columns import CategoricalColumn, DenseColumn, ImageColumn, SequenceColumn, _value_type
from recmtl.schema.fitted import FittedSchema
from recmtl.schema.labels import LabelColumn
from recmtl.schema.leaks import LEAK_SAMPLE_ROWS, check_leaks


class _VocabCounter:
    """Streaming value counts with memory bounded by the number of distinct values."""

    def __init__(self) -> None:
        self.parts: list[pa.StructArray] = []
        self.pending = 0

    def add(self, arr: pa.Array) -> None:
        counts = pc.value_counts(arr.drop_null())
        self.parts.append(counts)
        self.pending += len(counts)
        if self.pending > 2_000_000 and len(self.parts) > 1:
            self.parts = [self._merge()]
            self.pending = len(self.parts[0])

    def _merge(self) -> pa.StructArray:
        values = pa.concat_arrays([p.field("values") for p in self.parts])
        counts = pa.concat_arrays([p.field("counts") for p in self.parts])
        grouped = pa.table({"values": values, "counts": counts}).group_by("values").aggregate([("counts", "sum")])
        return pa.StructArray.from_arrays([grouped.column("values").combine_chunks(),
                                           grouped.column("counts_sum").combine_chunks()], ["values", "counts"])

    def vocabulary(self, min_count: int, max_size: int | None) -> np.ndarray:
        if not self.parts:
            return np.array([], dtype=np.int64)
        merged = self._merge()
        table = pa.table({"v": merged.field("values"), "c": merged.field("counts")})
        table = table.filter(pc.greater_equal(table["c"], min_count))
        table = table.sort_by([("c", "descending"), ("v", "ascending")])
        if max_size is not None:
            table = table.slice(0, max_size)
        return table["v"].to_numpy()


class _DenseStats:
    """Count, sum and sum of squares of a dense column's finite values after its clip and transform."""

    def __init__(self, column: DenseColumn) -> None:
        self.column = column
        self.n = 0
        self.s = 0.0
        self.ss = 0.0

    def add(self, arr: pa.Array) -> None:
        x = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
        x = self.column.transformed(x[np.isfinite(x)])
        self.n += len(x)
        self.s += float(x.sum())
        self.ss += float(np.square(x).sum())

    def mean_std(self) -> tuple[float, float]:
        if self.n == 0:
            return 0.0, 1.0
        mean = self.s / self.n
        var = max(self.ss / self.n - mean * mean, 0.0)
        std = math.sqrt(var)
        return mean, (std if std > 1e-12 else 1.0)


class _LabelStats:
    MAX_CLASSES = 100_000

    def __init__(self, all_values: bool = False) -> None:
        self.labelled = 0
        self.distinct: set[Any] = set()
        self.all_values = all_values  # class labels: every distinct value is a class

    def add(self, y: np.ndarray, mask: np.ndarray) -> None:
        self.labelled += int(mask.sum())
        if len(self.distinct) <= 16:
            self.distinct.update(np.unique(y[mask]).tolist())

    def add_classes(self, arr: pa.Array) -> None:
        if not (pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type)
                or pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            raise DataError(f"a class label column must hold int class ids or strings, got {arr.type}")
        self.labelled += len(arr) - arr.null_count
        values = pc.unique(arr.drop_null())
        self.distinct.update(values.cast(pa.int64()).to_pylist() if not pa.types.is_string(values.type)
                             and not pa.types.is_large_string(values.type) else values.to_pylist())
        if len(self.distinct) > self.MAX_CLASSES:
            raise DataError(f"more than {self.MAX_CLASSES} distinct class labels")

    def classes(self, num_classes: int | None) -> list[Any]:
        """Strings: sorted distinct values; ints: 0..max (or 0..num_classes-1 when that is larger)."""
        if all(isinstance(v, str) for v in self.distinct):
            return sorted(self.distinct)
        k = max(int(max(self.distinct)) + 1, int(num_classes or 0))
        return list(range(k))


def check_types(config: Config, source: ParquetSource) -> dict[str, str]:
    """Validate every configured column's type before reading rows; return the value type per feature."""
    types = {}
    for f in config.features:
        types[f.name] = _value_type(f.name, source.field(f.name).type, f.kind)
    return types


def fit_schema(config: Config, source: ParquetSource, head_classes: dict[str, Any],
               progress: Any = None) -> FittedSchema:
    """One pass over the training data: vocabularies, dense statistics, label checks, leak check."""
    types = check_types(config, source)
    cat_cfg = [f for f in config.features if f.kind == "categorical"]
    seq_cfg = [f for f in config.features if f.kind == "sequence"]
    dense_cfg = [f for f in config.features if f.kind == "dense"]
    image_cfg = [f for f in config.features if f.kind == "image"]
    shapes = {(f.channels or 1, f.height, f.width) for f in image_cfg}
    if len(shapes) > 1:
        raise DataError("all image features must share one shape (channels, height, width); found "
                        + ", ".join(f"{f.name}: {f.channels or 1}x{f.height}x{f.width}" for f in image_cfg))
    kinds = {t.name: getattr(head_classes[t.name], "label_type", "value") for t in config.tasks}
    labels = [_label_column(t, kinds[t.name], source) for t in config.tasks]
    counters = {f.name: _VocabCounter() for f in cat_cfg + seq_cfg if not f.hash_buckets}
    stats = {f.name: _DenseStats(_dense_column(f)) for f in dense_cfg}
    label_stats = {lab.task: _LabelStats(lab.kind == "class") for lab in labels}
    sample: list[pa.RecordBatch] = []
    sampled = 0
    rows = 0
    for batch in source.batches(read_rows=config.data.read_rows):
        rows += batch.num_rows
        for f in cat_cfg:
            if f.name in counters:
                arr = plain_array(batch.column(f.name))
                # an empty string counts as missing (id 0), as null does
                counters[f.name].add(_countable(arr, types[f.name]))
        for f in seq_cfg:  # the vocabulary of a sequence feature: every item of every list
            if f.name in counters:
                flat = pc.list_flatten(plain_array(batch.column(f.name)))
                counters[f.name].add(_countable(flat.dictionary_decode() if pa.types.is_dictionary(flat.type) else flat,
                                                types[f.name]))
        for f in dense_cfg:
            stats[f.name].add(plain_array(batch.column(f.name)))
        for lab in labels:
            if lab.kind == "class":
                label_stats[lab.task].add_classes(plain_array(batch.column(lab.column)))
            else:
                y, mask = lab.read(batch)
                label_stats[lab.task].add(y, mask)
        if sampled < LEAK_SAMPLE_ROWS:
            sample.append(batch)
            sampled += batch.num_rows
        if progress is not None:
            progress(batch.num_rows)
    if rows == 0:
        raise DataError(f"training data {source.spec} has no rows")

    for task, lab in zip(config.tasks, labels):
        st = label_stats[task.name]
        if st.labelled == 0:
            raise DataError(f"task '{task.name}' has no labelled rows: column '{task.label}' is null everywhere in {source.spec}")
        head_cls = head_classes[task.name]
        numeric = [v for v in st.distinct if not isinstance(v, str)]
        problem = head_cls.label_problem(np.array(sorted(numeric)))
        if problem:
            raise DataError(f"label column '{task.label}' of task '{task.name}' (head '{task.head}'): {problem}")
        if lab.kind == "class":
            lab.classes = st.classes(task.params.get("num_classes"))

    def vocabulary(f: FeatureConfig) -> np.ndarray | None:
        if f.hash_buckets:
            return None
        vocab = counters[f.name].vocabulary(f.min_count, f.max_size)
        return vocab.astype(object) if types[f.name] == "string" else vocab

    categorical = [CategoricalColumn(f.name, types[f.name], vocabulary(f), f.hash_buckets, f.embedding_dim)
                   for f in cat_cfg]
    sequence = [SequenceColumn(f.name, types[f.name], vocabulary(f), f.hash_buckets, f.embedding_dim,
                               max_length=f.max_length) for f in seq_cfg]
    dense = []
    for f in dense_cfg:
        col = stats[f.name].column
        fitted_mean, std = stats[f.name].mean_std()
        mean = fitted_mean if f.standardize else 0.0
        std = std if f.standardize else 1.0
        # fill: the fitted mean of the transformed values, or a raw value (zero, a number) clipped and transformed
        raw_fill = 0.0 if f.fill == "zero" else None if f.fill == "mean" else float(f.fill)
        fill = fitted_mean if raw_fill is None else float(col.transformed(np.array([raw_fill]))[0])
        dense.append(DenseColumn(f.name, mean, std, fill, col.transform, col.clip_low, col.clip_high))
    image = [ImageColumn(f.name, f.channels or 1, f.height, f.width) for f in image_cfg]
    sample_table = pa.Table.from_batches(sample)
    for col in image:  # fail before training when the images are not what the config says
        col.values(sample_table.column(col.name).slice(0, 64))

    for col in sequence:  # fail before training on lists of the wrong item type
        col.sequence_ids(sample_table.column(col.name).slice(0, 64))
    check_leaks([f for f in config.features if f.kind not in ("image", "sequence")], sample_table, labels)
    return FittedSchema(categorical, dense, labels, config.evaluation.group_column, rows, image, sequence)


def _dense_column(f: FeatureConfig) -> DenseColumn:
    """A dense feature's clip and transform, before its statistics are fitted."""
    low, high = f.clip if f.clip is not None else (None, None)
    low = None if low is None or low == -math.inf else low  # an infinite bound clips nothing
    high = None if high is None or high == math.inf else high
    return DenseColumn(f.name, transform=f.transform, clip_low=low, clip_high=high)


def _countable(arr: pa.Array, value_type: str) -> pa.Array:
    """The values a vocabulary counts: ints as int64; strings without the empty string (missing, as null)."""
    return arr.cast(pa.int64()) if value_type == "int" else arr.filter(pc.not_equal(arr, ""))


def _label_column(task: TaskConfig, kind: str, source: ParquetSource) -> LabelColumn:
    """The task's label reader for its head's ``label_type`` (classes are fitted later for ``class``)."""
    if kind != "multi":
        if isinstance(task.label, list):
            raise DataError(f"task '{task.name}': head '{task.head}' takes one label column, got a list {task.label}")
        return LabelColumn(task.name, task.label, task.positive, kind)
    if isinstance(task.label, list):
        return LabelColumn(task.name, list(task.label), None, kind, list(task.label))
    # one list column: its length, read from the first non-null row, is the number of attributes
    typ = source.field(task.label).type
    if pa.types.is_fixed_size_list(typ):
        k = typ.list_size
    else:
        k = 0
        for batch in source.batches(read_rows=4096, columns=[task.label]):
            lengths = pc.list_value_length(plain_array(batch.column(0))).drop_null()
            if len(lengths):
                k = int(lengths[0].as_py())
                break
    if k < 1:
        raise DataError(f"label column '{task.label}' of task '{task.name}': no non-empty list to count the attributes from")
    return LabelColumn(task.name, task.label, None, kind, [f"{task.name}_{j}" for j in range(k)])
