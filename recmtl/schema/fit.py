"""The fit pass: one streaming pass over the training data for vocabularies, dense statistics and label
checks, then the leak check."""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recmtl.config import Config, FeatureConfig, TaskConfig
from recmtl.data.arrow import plain_array
from recmtl.data.parquet import ParquetSource, shard_units
from recmtl.errors import DataError, RecmtlError
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

    def summary(self) -> tuple[pa.StructArray | None, int, int]:
        """The counts so far, merged (values, counts), the values counted and the decrement: what a rank sends."""
        return (self._merge() if self.parts else None), self.total, self.decrement

    def absorb(self, summary: tuple[pa.StructArray | None, int, int]) -> None:
        """Add another counter's :meth:`summary` (another rank's rows). Exact counts add exactly; two sketches
        merge as Misra-Gries summaries do: the decrements add up, and the next merge prunes to ``cap`` again,
        so every count stays at most N / (cap + 1) below the true one, N the values counted by all."""
        counts, total, decrement = summary
        if counts is not None:
            self.parts.append(counts)
            self.pending += len(counts)
        self.total += total
        self.decrement += decrement

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
    """Count, sum and sum of squares of a dense column's finite values after its clip and transform, for one
    row group (the fit pass combines them in row-group order: :func:`_dense_mean_std`)."""

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

    def partial(self) -> tuple[int, float, float]:
        return self.n, self.s, self.ss


def _dense_mean_std(parts: list[tuple[int, float, float]]) -> tuple[float, float]:
    """Mean and std from per-row-group ``(n, sum, sum of squares)`` in row-group order; the sums are correctly
    rounded (``math.fsum``), so the result is the same whichever processes counted the row groups."""
    n = sum(p[0] for p in parts)
    if n == 0:
        return 0.0, 1.0
    mean = math.fsum(p[1] for p in parts) / n
    var = max(math.fsum(p[2] for p in parts) / n - mean * mean, 0.0)
    std = math.sqrt(var)
    return mean, (std if std > 1e-12 else 1.0)


def check_types(config: Config, source: ParquetSource) -> dict[str, str]:
    """Validate every configured column's type before reading rows; return the value type per feature."""
    types = {}
    for f in config.features:
        types[f.name] = _value_type(f.name, source.field(f.name).type, f.kind)
    return types


class Collective(Protocol):
    """What the sharded fit pass needs of a process group: :class:`recmtl.training.distributed.Context`."""

    rank: int
    world: int

    def all_gather_object(self, obj: Any) -> list[Any]: ...

    def gather_object(self, obj: Any) -> list[Any] | None: ...

    def broadcast_object(self, obj: Any) -> Any: ...


class _Alone:
    """One process: every collective is the identity."""

    rank, world = 0, 1

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def gather_object(self, obj: Any) -> list[Any] | None:
        return [obj]

    def broadcast_object(self, obj: Any) -> Any:
        return obj


def fit_units(source: ParquetSource, rank: int, world: int) -> list[int]:
    """The row groups (units of ``source``) rank ``rank`` of ``world`` counts in the fit pass: training's deal
    (:func:`recmtl.data.parquet.shard_units`, in file order) for the row groups it deals whole, and the ones
    training shares row-wise dealt whole round-robin too (a row group's statistics are one partial)."""
    if world == 1:
        return list(range(len(source.units)))
    whole, shared = shard_units(range(len(source.units)), source.unit_rows, world)
    return sorted(whole[rank] + sorted(shared)[rank::world])


def data_fingerprint(source: ParquetSource) -> dict[str, Any]:
    """What every rank must see alike: the files, their row groups' sizes and the columns' (unified) types."""
    return {"spec": source.spec, "files": [str(p) for p in source.paths],
            "row_groups": [[pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)] for pf in source.files],
            "types": {c: str(source.schema.field(c).type) for c in source.columns if c in source.schema.names}}


def check_same_data(fingerprints: list[dict[str, Any]]) -> None:
    """A :class:`DataError` (the same on every rank) when a rank's :func:`data_fingerprint` differs from rank 0's."""
    first = fingerprints[0]
    for r, fp in enumerate(fingerprints[1:], 1):
        if {**fp, "spec": first["spec"]} == first:
            continue
        if fp["files"] != first["files"]:
            a, b = set(first["files"]), set(fp["files"])
            only = sorted(a ^ b)
            what = (f"{only[0]} is seen by rank {0 if only[0] in a else r} only" if only
                    else "the files are in another order")
            detail = f"rank 0 sees {len(a)} file(s), rank {r} {len(b)}: {what}"
        elif fp["row_groups"] != first["row_groups"]:
            i = next(i for i, (x, y) in enumerate(zip(first["row_groups"], fp["row_groups"])) if x != y)
            x, y = first["row_groups"][i], fp["row_groups"][i]
            detail = (f"{first['files'][i]} has {len(x)} row group(s) ({sum(x):,} rows) on rank 0 but {len(y)} "
                      f"({sum(y):,} rows) on rank {r}")
        else:
            c = next(c for c in first["types"] if first["types"][c] != fp["types"].get(c))
            detail = f"column '{c}' is {first['types'][c]} on rank 0 but {fp['types'].get(c)} on rank {r}"
        raise DataError(f"the ranks see different training data in {first['spec']}: {detail}; did a file change during the "
                        "fit pass? Every rank must read the same files, unchanged while the run lasts")


@dataclass
class _UnitPart:
    """What one row group contributes: its rows, dense partials, label statistics, target moments and, for the
    first rows of the data, the leak check's sample batches (with their first row's position in the data)."""

    unit: int
    rows: int = 0
    dense: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    labels: dict[str, LabelStats] = field(default_factory=dict)
    targets: dict[str, Moments] = field(default_factory=dict)
    sample: list[tuple[int, pa.RecordBatch]] = field(default_factory=list)


@dataclass
class _Partial:
    """One rank's counts: its row groups' parts and each vocabulary counter's summary (values, counts, N,
    decrement); or ``failure`` (the exception's class when a RecmtlError, its message) if counting failed."""

    parts: list[_UnitPart] = field(default_factory=list)
    vocab: dict[str, tuple[pa.StructArray | None, int, int]] = field(default_factory=dict)
    failure: tuple[type | None, str] | None = None
    rank: int = 0


def _failure(exc: BaseException, rank: int) -> _Partial:
    kind = type(exc) if isinstance(exc, RecmtlError) else None
    return _Partial(failure=(kind, str(exc) if kind else f"{type(exc).__name__}: {exc}"), rank=rank)


def _raise(outcome: _Partial, mine: BaseException | None) -> None:
    if mine is not None:  # the rank that failed raises its own exception (with its traceback)
        raise mine
    kind, message = outcome.failure  # type: ignore[misc]
    if kind is not None:
        raise kind(message)
    raise RuntimeError(f"the fit pass failed on rank {outcome.rank}: {message}")


def fit_schema(config: Config, source: ParquetSource, head_classes: dict[str, Any],
               progress: Any = None, ctx: Collective | None = None) -> FittedSchema:
    """One pass over the training data: vocabularies, dense statistics, label checks and summary (the schema's
    ``label_summary``), the heads' target statistics (``LabelColumn.target``), leak check.

    ``ctx`` (a process group, e.g. under torchrun): every rank must call this; each counts its share of the
    row groups (:func:`fit_units`), rank 0 merges the counts and fits, every rank returns the same schema, and
    a failure on any rank is raised on every rank. Value counts merge exactly and the statistics are combined
    per row group in row-group order, so any number of processes fits the schema one process does (except a
    vocabulary over ``max_distinct`` distinct values: the merged sketch keeps its error bound, not its values)."""
    ctx = ctx if ctx is not None else _Alone()
    if ctx.world > 1:
        check_same_data(ctx.all_gather_object(data_fingerprint(source)))
    plan = _Plan(config, source, head_classes)
    mine: BaseException | None = None
    try:
        partial = plan.count(source, fit_units(source, ctx.rank, ctx.world), config.data.read_rows, progress)
        partial.rank = ctx.rank
    except Exception as exc:
        if ctx.world == 1:
            raise
        mine, partial = exc, _failure(exc, ctx.rank)
    parts = ctx.gather_object(partial)
    outcome: FittedSchema | _Partial | None = None
    if parts is not None:  # rank 0
        outcome = next((p for p in parts if p.failure is not None), None)
        if outcome is None:
            try:
                outcome = plan.finish(parts)
            except Exception as exc:
                if ctx.world == 1:
                    raise
                mine, outcome = exc, _failure(exc, ctx.rank)
    outcome = ctx.broadcast_object(outcome)
    if isinstance(outcome, _Partial):
        _raise(outcome, mine)
    return outcome  # type: ignore[return-value]


class _Plan:
    """The fit pass's columns, checked against the source's metadata (the same on every rank)."""

    def __init__(self, config: Config, source: ParquetSource, head_classes: dict[str, Any]) -> None:
        self.config, self.head_classes, self.spec = config, head_classes, source.spec
        self.types = types = check_types(config, source)
        self.cat_cfg = [f for f in config.features if f.kind == "categorical"]
        self.seq_cfg = seq_cfg = [f for f in config.features if f.kind == "sequence"]
        self.dense_cfg = [f for f in config.features if f.kind == "dense"]
        self.image_cfg = image_cfg = [f for f in config.features if f.kind == "image"]
        shapes = {(f.channels or 1, f.height, f.width) for f in image_cfg}
        if len(shapes) > 1:
            raise DataError("all image features must share one shape (channels, height, width); found "
                            + ", ".join(f"{f.name}: {f.channels or 1}x{f.height}x{f.width}" for f in image_cfg))
        kinds = {t.name: getattr(head_classes[t.name], "label_type", "value") for t in config.tasks}
        self.labels = [_label_column(t, kinds[t.name], source) for t in config.tasks]
        self.text_cfg = [f for f in config.features if f.kind == "text"]
        self.by_name = {f.name: f for f in config.features}
        for f in seq_cfg:  # a shared vocabulary: the categorical feature's options and value type
            if f.vocabulary and types[f.vocabulary] != types[f.name]:
                raise DataError(f"sequence feature '{f.name}' shares the vocabulary of '{f.vocabulary}', but its items "
                                f"are {types[f.name]}s and '{f.vocabulary}' holds {types[f.vocabulary]}s; expected the "
                                "same type")
        #: the features with a counter of their own; a sequence sharing one counts into its owner's
        self.owners = [f for f in self.cat_cfg + seq_cfg if not f.hash_buckets and not f.vocabulary]
        self.unit_first_row = np.concatenate([[0], np.cumsum(source.unit_rows)]).tolist()

    def counters(self, make: Any) -> dict[str, _VocabCounter]:
        counters = {f.name: make(f) for f in self.owners}
        return counters | {f.name: counters[f.vocabulary] for f in self.seq_cfg if f.vocabulary and f.vocabulary in counters}

    def count(self, source: ParquetSource, units: list[int], read_rows: int, progress: Any) -> _Partial:
        """Count the row groups ``units``: one :class:`_UnitPart` each, and one counter per vocabulary."""
        types = self.types
        counters = self.counters(lambda f: _VocabCounter(f.max_distinct))
        target_params = {t.name: t.params for t in self.config.tasks}
        out = _Partial()
        for u in units:
            part = _UnitPart(u)
            dense = {f.name: _DenseStats(_dense_column(f)) for f in self.dense_cfg}
            part.labels = {lab.task: LabelStats(lab) for lab in self.labels}
            part.targets = {lab.task: Moments() for lab in self.labels if lab.kind == "value"}
            for batch in source.unit_batches(u, read_rows):
                first = self.unit_first_row[u] + part.rows
                part.rows += batch.num_rows
                for f in self.cat_cfg:
                    if f.name in counters:
                        arr = plain_array(batch.column(f.name))
                        # an empty string counts as missing (id 0), as null does
                        counters[f.name].add(_countable(arr, types[f.name]))
                for f in self.seq_cfg:  # the vocabulary of a sequence feature: every item of every list
                    if f.name in counters:
                        flat = pc.list_flatten(plain_array(batch.column(f.name)))
                        counters[f.name].add(_countable(flat.dictionary_decode() if pa.types.is_dictionary(flat.type)
                                                        else flat, types[f.name]))
                for f in self.dense_cfg:
                    dense[f.name].add(plain_array(batch.column(f.name)))
                for lab in self.labels:
                    read = part.labels[lab.task].add(batch)
                    if lab.task in part.targets:
                        y, mask = read
                        part.targets[lab.task].add(self.head_classes[lab.task].target_values(
                            y[mask[:, 0], 0], **target_params[lab.task]))
                if first < LEAK_SAMPLE_ROWS:  # the first rows of the data, whichever rank reads them
                    part.sample.append((first, batch))
                if progress is not None:
                    progress(batch.num_rows)
            part.dense = {name: st.partial() for name, st in dense.items()}
            out.parts.append(part)
        out.vocab = {f.name: counters[f.name].summary() for f in self.owners}
        return out

    def finish(self, partials: list[_Partial]) -> FittedSchema:
        """Merge the ranks' counts (row groups in order) and fit the schema."""
        config, types, by_name, source_spec = self.config, self.types, self.by_name, self.spec
        parts = sorted((p for partial in partials for p in partial.parts), key=lambda p: p.unit)
        assert [p.unit for p in parts] == list(range(len(self.unit_first_row) - 1)), "the ranks' row groups overlap"
        rows = sum(p.rows for p in parts)
        if rows == 0:
            raise DataError(f"training data {source_spec} has no rows")
        merged = {f.name: _VocabCounter(f.max_distinct) for f in self.owners}
        for partial in partials:
            for name, summary in partial.vocab.items():
                merged[name].absorb(summary)
        counters = self.counters(lambda f: merged[f.name])
        labels = self.labels
        label_stats = {lab.task: LabelStats(lab) for lab in labels}
        targets = {lab.task: Moments() for lab in labels if lab.kind == "value"}
        for p in parts:
            for lab in labels:
                label_stats[lab.task].merge(p.labels[lab.task])
                if lab.task in targets:
                    targets[lab.task].merge(p.targets[lab.task])

        label_summary = {}
        for task, lab in zip(config.tasks, labels):
            st = label_stats[task.name]
            if st.labelled:
                head_cls = self.head_classes[task.name]
                numeric = [v for v in (st.counts if lab.kind == "class" else st.distinct) if not isinstance(v, str)]
                problem = head_cls.label_problem(np.array(sorted(numeric)))
                if problem:
                    raise DataError(f"label column '{task.label}' of task '{task.name}' (head '{task.head}'): {problem}")
            if lab.kind == "class" and st.labelled:
                lab.classes = st.classes(task.params.get("num_classes"))
            label_summary[task.name] = st.summary()
            check_labels(lab, label_summary[task.name], "training", st.binary, source_spec)
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
                       for f in self.cat_cfg]
        sequence = [SequenceColumn(f.name, types[f.name], vocabulary(f),
                                   by_name[f.vocabulary].hash_buckets if f.vocabulary else f.hash_buckets,
                                   f.embedding_dim, max_length=f.max_length, vocabulary=f.vocabulary, target=f.target)
                    for f in self.seq_cfg]
        text = [TextColumn(f.name, f.hash_buckets, f.ngrams, f.max_tokens, f.embedding_dim) for f in self.text_cfg]
        dense = []
        for f in self.dense_cfg:
            col = _dense_column(f)
            fitted_mean, std = _dense_mean_std([p.dense[f.name] for p in parts])
            mean = fitted_mean if f.standardize else 0.0
            std = std if f.standardize else 1.0
            # fill: the fitted mean of the transformed values, or a raw value (zero, a number) clipped and transformed
            raw_fill = 0.0 if f.fill == "zero" else None if f.fill == "mean" else float(f.fill)
            fill = fitted_mean if raw_fill is None else float(col.transformed(np.array([raw_fill]))[0])
            dense.append(DenseColumn(f.name, mean, std, fill, col.transform, col.clip_low, col.clip_high))
        image = [ImageColumn(f.name, f.channels or 1, f.height, f.width) for f in self.image_cfg]
        sample_table = pa.Table.from_batches([b for _, b in sorted((s for p in parts for s in p.sample),
                                                                   key=lambda s: s[0])])
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
