"""The fit pass: one streaming pass over the training data for vocabularies, dense statistics and label
checks, then the leak check."""
from __future__ import annotations

import math
import os
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recmtl.config import Config, FeatureConfig, TaskConfig
from recmtl.data.arrow import plain_array
from recmtl.data.parquet import ParquetSource
from recmtl.errors import DataError
from recmtl.schema.columns import CategoricalColumn, DenseColumn, ImageColumn, SequenceColumn, TextColumn, _value_type
from recmtl.schema.fitted import FittedSchema
from recmtl.schema.labels import LabelColumn
from recmtl.schema.leaks import LEAK_SAMPLE_ROWS, check_leaks
from recmtl.schema.summary import LabelStats, Moments, check_labels


class _VocabCounter:
    """Streaming value counts. Without ``cap``, memory grows with the number of distinct values (exact).

    With ``cap``, at most ``2 * cap`` distinct values are held between merges (plus one block's value counts):
    exact while the column has at most ``cap`` distinct values; above, a mergeable Misra-Gries summary
    (Agarwal et al., 2012) over each block's Arrow ``value_counts``: whenever more than ``cap`` values are
    held, the (cap+1)-th largest count is subtracted from every count and values left at zero are dropped.
    Every kept count then underestimates the true one by at most ``decrement`` <= N / (cap + 1) (N: values
    counted), so the top ``k`` are exactly the true top ``k`` when the k-th true count exceeds the
    (k+1)-th by more than that bound."""

    def __init__(self, cap: int | None = None) -> None:
        self.parts: list[pa.StructArray] = []
        self.pending = 0
        self.merged = 0  # values held by the last merge
        self.cap = cap
        self.total = 0  # values counted (N)
        self.decrement = 0  # the sum of the subtracted counts: the error bound of every kept count

    @property
    def sketched(self) -> bool:
        """True once the column had more than ``cap`` distinct values (the counts are estimates)."""
        return self.decrement > 0

    def add(self, arr: pa.Array) -> None:
        counts = pc.value_counts(arr.drop_null())
        self.parts.append(counts)
        self.pending += len(counts)
        self.total += len(arr) - arr.null_count
        # merged (and pruned) at twice the cap; without one, once the merged counts doubled (not after every
        # block once more than 2M values are held: that made the pass quadratic in the distinct values)
        limit = 2 * self.cap if self.cap is not None else max(2_000_000, 2 * self.merged)
        if self.pending > limit and len(self.parts) > 1:
            self.parts = [self._merge()]
            self.pending = self.merged = len(self.parts[0])

    def _merge(self) -> pa.StructArray:
        values = pa.concat_arrays([p.field("values") for p in self.parts])
        counts = pa.concat_arrays([p.field("counts") for p in self.parts])
        grouped = pa.table({"values": values, "counts": counts}).group_by("values").aggregate([("counts", "sum")])
        merged = pa.StructArray.from_arrays([grouped.column("values").combine_chunks(),
                                             grouped.column("counts_sum").combine_chunks()], ["values", "counts"])
        if self.cap is not None and len(merged) > self.cap:
            c = merged.field("counts").to_numpy()
            t = int(-np.partition(-c, self.cap)[self.cap])  # the (cap+1)-th largest count
            keep = c > t
            merged = pa.StructArray.from_arrays([merged.field("values").filter(pa.array(keep)),
                                                 pa.array(c[keep] - t, pa.int64())], ["values", "counts"])
            self.decrement += t
        return merged

    def vocabulary(self, min_count: int, max_size: int | None) -> np.ndarray:
        """The values seen at least ``min_count`` times (estimated counts when sketched), most frequent first,
        ties by value, at most ``max_size``."""
        if not self.parts:
            return np.array([], dtype=np.int64)
        merged = self._merge()
        self.parts, self.pending = [merged], len(merged)
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


def check_types(config: Config, source: ParquetSource) -> dict[str, str]:
    """Validate every configured column's type before reading rows; return the value type per feature."""
    types = {}
    for f in config.features:
        types[f.name] = _value_type(f.name, source.field(f.name).type, f.kind)
    return types


def fit_schema(config: Config, source: ParquetSource, head_classes: dict[str, Any],
               progress: Any = None) -> FittedSchema:
    """One pass over the training data: vocabularies, dense statistics, label checks and summary (the schema's
    ``label_summary``), the heads' target statistics (``LabelColumn.target``), leak check."""
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
    text_cfg = [f for f in config.features if f.kind == "text"]
    by_name = {f.name: f for f in config.features}
    for f in seq_cfg:  # a shared vocabulary: the categorical feature's options and value type
        if f.vocabulary and types[f.vocabulary] != types[f.name]:
            raise DataError(f"sequence feature '{f.name}' shares the vocabulary of '{f.vocabulary}', but its items are "
                            f"{types[f.name]}s and '{f.vocabulary}' holds {types[f.vocabulary]}s; expected the same type")
    counters = {f.name: _VocabCounter(f.max_distinct) for f in cat_cfg + seq_cfg if not f.hash_buckets and not f.vocabulary}
    counters |= {f.name: counters[f.vocabulary] for f in seq_cfg if f.vocabulary and f.vocabulary in counters}
    stats = {f.name: _DenseStats(_dense_column(f)) for f in dense_cfg}
    label_stats = {lab.task: LabelStats(lab) for lab in labels}
    targets = {lab.task: Moments() for lab in labels if lab.kind == "value"}
    target_params = {t.name: t.params for t in config.tasks}
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
            read = label_stats[lab.task].add(batch)
            if lab.task in targets:
                y, mask = read
                targets[lab.task].add(head_classes[lab.task].target_values(y[mask[:, 0], 0], **target_params[lab.task]))
        if sampled < LEAK_SAMPLE_ROWS:
            sample.append(batch)
            sampled += batch.num_rows
        if progress is not None:
            progress(batch.num_rows)
    if rows == 0:
        raise DataError(f"training data {source.spec} has no rows")

    label_summary = {}
    for task, lab in zip(config.tasks, labels):
        st = label_stats[task.name]
        if st.labelled:
            head_cls = head_classes[task.name]
            numeric = [v for v in (st.counts if lab.kind == "class" else st.distinct) if not isinstance(v, str)]
            problem = head_cls.label_problem(np.array(sorted(numeric)))
            if problem:
                raise DataError(f"label column '{task.label}' of task '{task.name}' (head '{task.head}'): {problem}")
        if lab.kind == "class" and st.labelled:
            lab.classes = st.classes(task.params.get("num_classes"))
        label_summary[task.name] = st.summary()
        check_labels(lab, label_summary[task.name], "training", st.binary, source.spec)
        if lab.kind == "value":
            lab.target = targets[task.name].as_dict()

    fitted: dict[str, np.ndarray | None] = {}

    def vocabulary(f: FeatureConfig) -> np.ndarray | None:
        if f.vocabulary:  # the shared one: the same array (ids), fitted over both columns
            return fitted[f.vocabulary]
        if f.hash_buckets:
            fitted[f.name] = None
            return None
        counter = counters[f.name]
        vocab = counter.vocabulary(f.min_count, f.max_size)
        if counter.sketched and os.environ.get("RANK", "0") == "0":
            print(f"note: feature '{f.name}' has more than max_distinct={f.max_distinct} distinct values; its "
                  f"vocabulary ({len(vocab)} values) comes from a heavy-hitters sketch: each count is at most "
                  f"{counter.decrement} below the true one ({counter.total} values counted)", file=sys.stderr)
        fitted[f.name] = vocab.astype(object) if types[f.name] == "string" else vocab
        return fitted[f.name]

    categorical = [CategoricalColumn(f.name, types[f.name], vocabulary(f), f.hash_buckets, f.embedding_dim)
                   for f in cat_cfg]
    sequence = [SequenceColumn(f.name, types[f.name], vocabulary(f),
                               by_name[f.vocabulary].hash_buckets if f.vocabulary else f.hash_buckets, f.embedding_dim,
                               max_length=f.max_length, vocabulary=f.vocabulary, target=f.target) for f in seq_cfg]
    text = [TextColumn(f.name, f.hash_buckets, f.ngrams, f.max_tokens, f.embedding_dim) for f in text_cfg]
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
    check_leaks([f for f in config.features if f.kind not in ("image", "sequence", "text")], sample_table, labels)
    return FittedSchema(categorical, dense, labels, config.evaluation.group_column, rows, image, sequence, text,
                        label_summary=label_summary)


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
    if task.positive is not None and kind != "value":
        raise DataError(f"task '{task.name}': positive applies to heads with one value per row (binary, esmm, ...); "
                        f"head '{task.head}' reads {'classes' if kind == 'class' else 'attributes'}")
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
