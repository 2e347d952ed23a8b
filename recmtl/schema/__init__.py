"""The fitted feature schema: vocabularies and dense statistics learnt in one pass over the training
data, and the batch-wise Arrow -> numpy transform used by training, evaluation and export."""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sklearn.utils import murmurhash3_32

from recmtl.config import Config, FeatureConfig, TaskConfig
from recmtl.contracts import FeatureInfo
from recmtl.data.parquet import ParquetSource
from recmtl.errors import DataError
from recmtl.data.images import decode_images, is_image_type
from recmtl.files import atomic_path, write_json
from recmtl.rundir import SCHEMA, VOCAB, RunDir
from recmtl.data.arrow import plain_array
from recmtl.data.sequences import item_type, last_items

SCHEMA_VERSION = 1
LEAK_SAMPLE_ROWS = 200_000
LEAK_MAX_DISTINCT = 64


def _value_type(name: str, typ: pa.DataType, kind: str) -> str:
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if kind == "sequence":
        found = item_type(typ)
        if found is None:
            raise DataError(f"feature '{name}' is sequence but its column has type {typ}; expected a list of "
                            "integers or strings")
        return found
    if kind == "image":
        found = is_image_type(typ)
        if found is None:
            raise DataError(f"feature '{name}' is image but its column has type {typ}; expected encoded image "
                            "bytes (binary: PNG, JPEG) or fixed-shape number lists")
        return found
    if pa.types.is_integer(typ) or pa.types.is_boolean(typ):
        return "int"
    if kind == "categorical" and (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        return "string"
    if kind == "dense" and (pa.types.is_floating(typ) or pa.types.is_decimal(typ)):
        return "float"
    want = "integers or strings (floats belong in kind: dense)" if kind == "categorical" else "numbers"
    raise DataError(f"feature '{name}' is {kind} but its column has type {typ}; expected {want}")


@dataclass
class CategoricalColumn:
    """Maps raw values to ids: 0 is the bucket for nulls (and empty strings), unseen and rare values;
    1..V the vocabulary (or 1..hash_buckets)."""

    name: str
    value_type: str  # "int" | "string"
    vocab: np.ndarray | None = None  # values in id order (id = position + 1)
    hash_buckets: int | None = None
    embedding_dim: int | None = None
    _index: pd.Index | None = field(default=None, repr=False)
    _table: Any = field(default=None, repr=False, compare=False)  # int vocab over a narrow range: see _int_ids

    @property
    def cardinality(self) -> int:
        return (self.hash_buckets if self.hash_buckets else len(self.vocab)) + 1

    def _normalise(self, arr: pa.Array) -> pa.Array:
        arr = plain_array(arr)
        if self.value_type == "int":
            if not (pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type)):
                raise DataError(f"feature '{self.name}': expected integer values, got {arr.type}")
            return arr.cast(pa.int64())
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            raise DataError(f"feature '{self.name}': expected string values, got {arr.type}")
        return arr

    def ids(self, arr: pa.Array) -> np.ndarray:
        arr = self._normalise(arr)
        valid = None if arr.null_count == 0 else arr.is_valid().to_numpy(zero_copy_only=False)
        if self.hash_buckets:
            out = self._hash(arr)
        elif self.value_type == "int":
            out = self._int_ids(arr.fill_null(0).to_numpy())
        else:
            # look up each distinct value of the batch once, not every row
            encoded = pc.dictionary_encode(arr)
            if len(encoded.dictionary) == 0:
                out = np.zeros(len(arr), dtype=np.int64)
            else:
                codes = self._lookup(encoded.dictionary.to_numpy(zero_copy_only=False))
                indices = encoded.indices if encoded.indices.null_count == 0 else encoded.indices.fill_null(0)
                out = codes[indices.to_numpy()]
        if valid is not None:
            out[~valid] = 0
        return out

    def _lookup(self, values: np.ndarray) -> np.ndarray:
        if self._index is None:
            self._index = pd.Index(self.vocab, dtype=object if self.value_type == "string" else np.int64)
        return self._index.get_indexer(values).astype(np.int64) + 1  # unknown (-1) -> 0

    def _int_ids(self, values: np.ndarray) -> np.ndarray:
        """Integer values -> ids. When the vocabulary spans a narrow range of values (ids, codes), an array
        indexed by value - (low - 1) maps them, with 0 at both ends for values outside the range; else a hash
        lookup."""
        if self._table is None:
            self._table = False
            vocab = np.asarray(self.vocab, dtype=np.int64)
            if len(vocab):
                low, high = int(vocab.min()), int(vocab.max())
                if high - low < 4 * len(vocab) + 65_536 and low > np.iinfo(np.int64).min and high < np.iinfo(np.int64).max:
                    table = np.zeros(high - low + 3, dtype=np.int64)
                    table[vocab - (low - 1)] = np.arange(1, len(vocab) + 1)
                    self._table = (low - 1, high + 1, table)
        if self._table is False:
            return self._lookup(values)
        below, above, table = self._table
        pos = np.clip(values, below, above)
        pos -= below
        return table[pos]

    def _hash(self, arr: pa.Array) -> np.ndarray:
        buckets = self.hash_buckets
        if self.value_type == "int":
            return np.mod(arr.fill_null(0).to_numpy(), buckets) + 1
        encoded = pc.dictionary_encode(arr.fill_null(""))
        uniques = encoded.dictionary.to_pylist()
        hashed = np.fromiter((murmurhash3_32(u, seed=0, positive=True) % buckets if u else -1 for u in uniques),
                             dtype=np.int64, count=len(uniques))
        return hashed[encoded.indices.to_numpy()] + 1  # the empty string is missing, like null: id 0


@dataclass
class SequenceColumn(CategoricalColumn):
    """A list column: each row's last ``max_length`` items mapped to ids as a categorical column maps values
    (0: null items, unseen and rare values; 1..V the vocabulary or hash buckets), left-aligned in
    ``[n, max_length]``; the positions past a row's items hold the padding id ``cardinality``."""

    max_length: int = 50

    @property
    def padding_id(self) -> int:
        return self.cardinality

    def sequence_ids(self, arr: pa.Array, width: int | None = None) -> np.ndarray:
        """``[n, width]`` int64 ids (``width`` >= max_length; the extra positions are padding)."""
        values, rows, cols = last_items(arr, self.max_length, self.name)
        out = np.full((len(arr), width or self.max_length), self.padding_id, dtype=np.int64)
        if len(values):
            out[rows, cols] = self.ids(values)
        return out


@dataclass
class DenseColumn:
    """Fills nulls/NaN with ``fill`` then standardises with the fitted mean and std."""

    name: str
    mean: float = 0.0
    std: float = 1.0
    fill: float = 0.0

    def values(self, arr: pa.Array) -> np.ndarray:
        arr = plain_array(arr)
        if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)
                or pa.types.is_boolean(arr.type) or pa.types.is_decimal(arr.type)):
            raise DataError(f"feature '{self.name}': expected numbers, got {arr.type}")
        x = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
        x = np.where(np.isfinite(x), x, self.fill)
        return ((x - self.mean) / self.std).astype(np.float32)


@dataclass
class ImageColumn:
    """An image feature: decoded/converted to float32 ``[n, channels, height, width]`` in [0, 1]."""

    name: str
    channels: int
    height: int
    width: int

    def values(self, arr: pa.Array) -> np.ndarray:
        return decode_images(arr, self.name, self.channels, self.height, self.width)


@dataclass
class LabelColumn:
    """A task's label: float values plus a mask of labelled (non-null) entries.

    ``kind`` follows the head's ``label_type``: ``value`` (a number, or 1/0 through ``positive``),
    ``class`` (class ids 0..K-1: an int column as it is, or strings through the fitted ``classes``),
    ``multi`` (K 0/1 attributes: several columns, or one fixed-length list column; ``classes`` names them).
    """

    task: str
    column: str | list[str]
    positive: list[Any] | None = None
    kind: str = "value"
    classes: list[Any] | None = None
    _index: pd.Index | None = field(default=None, repr=False, compare=False)

    @property
    def columns(self) -> list[str]:
        return list(self.column) if isinstance(self.column, list) else [self.column]

    @property
    def width(self) -> int:
        return len(self.classes) if self.kind == "multi" else 1

    def read(self, batch: pa.RecordBatch | pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Labels ``[n, width]`` float32 and the mask ``[n, width]`` of labelled entries."""
        if self.kind == "class":
            y, mask = self.class_ids(batch.column(self.column))
        elif self.kind == "multi":
            return self.attributes(batch)
        else:
            y, mask = self.values(batch.column(self.column))
        return y[:, None], mask[:, None]

    def class_ids(self, arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        arr = plain_array(arr)
        mask = arr.is_valid().to_numpy(zero_copy_only=False)
        what = f"label column '{self.column}' of task '{self.task}'"
        if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
            if self._index is None:
                self._index = pd.Index([str(c) for c in self.classes], dtype=object)
            ids = self._index.get_indexer(arr.fill_null(str(self.classes[0])).to_numpy(zero_copy_only=False))
            unknown = (ids < 0) & mask
            if unknown.any():
                raise DataError(f"{what}: class '{arr[int(np.flatnonzero(unknown)[0])]}' was not in the training data "
                                f"(classes: {', '.join(map(str, self.classes[:20]))})")
            return np.where(mask, ids, 0).astype(np.float32), mask
        if not (pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type)):
            raise DataError(f"{what} has type {arr.type}; a class label is an int class id 0..K-1 or a string")
        y = arr.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        bad = mask & ((y < 0) | (y >= len(self.classes)))
        if bad.any():
            raise DataError(f"{what}: class id {y[bad][0]} is outside 0..{len(self.classes) - 1} "
                            "(the classes of the training data, or params.num_classes)")
        return y.astype(np.float32), mask

    def attributes(self, batch: pa.RecordBatch | pa.Table) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(self.column, list):
            parts = [LabelColumn(self.task, c).values(batch.column(c)) for c in self.column]
            return np.stack([p[0] for p in parts], 1), np.stack([p[1] for p in parts], 1)
        arr = plain_array(batch.column(self.column))
        n, k = len(arr), self.width
        what = f"label column '{self.column}' of task '{self.task}'"
        if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type)):
            raise DataError(f"{what} has type {arr.type}; a multilabel task takes a list of 0/1 label columns "
                            "or one fixed-length list column")
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        lengths = pc.list_value_length(arr).fill_null(k).to_numpy(zero_copy_only=False)
        if (lengths != k).any():
            raise DataError(f"{what}: every list must hold {k} attribute values, found one with "
                            f"{int(lengths[lengths != k][0])}")
        flat = pc.list_flatten(arr)
        y, m = LabelColumn(self.task, self.column).values(flat)
        y_out, m_out = np.zeros((n, k), np.float32), np.zeros((n, k), bool)
        y_out[valid], m_out[valid] = y.reshape(-1, k), m.reshape(-1, k)
        return y_out, m_out

    def values(self, arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        arr = plain_array(arr)
        mask = arr.is_valid().to_numpy(zero_copy_only=False)
        if self.positive is not None:
            value_set = pa.array([str(v) for v in self.positive]) if (
                pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)) else pa.array(self.positive).cast(arr.type)
            y = pc.is_in(arr, value_set=value_set).to_numpy(zero_copy_only=False).astype(np.float32)
        else:
            if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type)):
                raise DataError(
                    f"label column '{self.column}' of task '{self.task}' has type {arr.type}; "
                    "expected numbers, or set `positive: [values]` to mark which values count as 1"
                )
            y = arr.cast(pa.float32()).fill_null(0).to_numpy(zero_copy_only=False)
            finite = np.isfinite(y)
            mask &= finite
            y = np.where(finite, y, 0).astype(np.float32)
        return y, mask


@dataclass
class Arrays:
    """One block of preprocessed rows: what the model and the loss read."""

    inputs: dict[str, np.ndarray]  # kind -> [n, n_features]
    labels: np.ndarray | None  # [n, n_tasks] float32
    mask: np.ndarray | None  # [n, n_tasks] bool
    group: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, idx: np.ndarray | slice) -> Arrays:
        def sub(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]
        return Arrays({k: v[idx] for k, v in self.inputs.items()}, sub(self.labels), sub(self.mask), sub(self.group))

    @staticmethod
    def concat(blocks: list[Arrays]) -> Arrays:
        if len(blocks) == 1:
            return blocks[0]
        def cat(items: list[np.ndarray | None]) -> np.ndarray | None:
            return None if items[0] is None else np.concatenate(items)
        return Arrays(
            {k: np.concatenate([b.inputs[k] for b in blocks]) for k in blocks[0].inputs},
            cat([b.labels for b in blocks]), cat([b.mask for b in blocks]), cat([b.group for b in blocks]),
        )


@dataclass
class FittedSchema:
    categorical: list[CategoricalColumn]
    dense: list[DenseColumn]
    labels: list[LabelColumn]
    group_column: str | None = None
    num_rows: int = 0
    image: list[ImageColumn] = field(default_factory=list)
    sequence: list[SequenceColumn] = field(default_factory=list)

    @property
    def feature_columns(self) -> list[str]:
        return ([c.name for c in self.categorical] + [d.name for d in self.dense] + [i.name for i in self.image]
                + [s.name for s in self.sequence])

    @property
    def sequence_width(self) -> int:
        """The last axis of the ``sequence`` input: the longest ``max_length`` of the sequence features."""
        return max((s.max_length for s in self.sequence), default=0)

    def label_slices(self) -> dict[str, tuple[int, int, bool]]:
        """Per task: (first column in ``Arrays.labels``, width, True when the label is one scalar)."""
        out, start = {}, 0
        for lab in self.labels:
            out[lab.task] = (start, lab.width, lab.kind != "multi")
            start += lab.width
        return out

    def feature_infos(self) -> dict[str, list[FeatureInfo]]:
        infos: dict[str, list[FeatureInfo]] = {}
        if self.categorical:
            infos["categorical"] = [
                FeatureInfo(c.name, "categorical", c.cardinality, {"embedding_dim": c.embedding_dim} if c.embedding_dim else {})
                for c in self.categorical
            ]
        if self.dense:
            infos["dense"] = [FeatureInfo(d.name, "dense") for d in self.dense]
        if self.image:
            infos["image"] = [FeatureInfo(i.name, "image", 0, {"channels": i.channels, "height": i.height, "width": i.width})
                              for i in self.image]
        if self.sequence:
            infos["sequence"] = [
                FeatureInfo(s.name, "sequence", s.cardinality,
                            {"max_length": s.max_length, **({"embedding_dim": s.embedding_dim} if s.embedding_dim else {})})
                for s in self.sequence
            ]
        return infos

    def transform(self, batch: pa.RecordBatch | pa.Table, labels: bool = True) -> Arrays:
        """Arrow rows -> preprocessed numpy arrays, column-wise (no per-row Python)."""
        n = batch.num_rows
        inputs: dict[str, np.ndarray] = {}
        if self.categorical:
            cat = np.empty((n, len(self.categorical)), dtype=np.int64)
            for j, col in enumerate(self.categorical):
                cat[:, j] = col.ids(batch.column(col.name))
            inputs["categorical"] = cat
        if self.dense:
            dense = np.empty((n, len(self.dense)), dtype=np.float32)
            for j, col in enumerate(self.dense):
                dense[:, j] = col.values(batch.column(col.name))
            inputs["dense"] = dense
        if self.image:
            first = self.image[0]
            images = np.empty((n, len(self.image), first.channels, first.height, first.width), dtype=np.float32)
            for j, col in enumerate(self.image):
                images[:, j] = col.values(batch.column(col.name))
            inputs["image"] = images
        if self.sequence:
            width = self.sequence_width
            seq = np.empty((n, len(self.sequence), width), dtype=np.int64)
            for j, col in enumerate(self.sequence):
                seq[:, j] = col.sequence_ids(batch.column(col.name), width)
            inputs["sequence"] = seq
        y = mask = None
        if labels:
            width = sum(lab.width for lab in self.labels)
            y = np.empty((n, width), dtype=np.float32)
            mask = np.empty((n, width), dtype=bool)
            for lab, (start, w, _) in zip(self.labels, self.label_slices().values()):
                y[:, start:start + w], mask[:, start:start + w] = lab.read(batch)
        group = None
        if self.group_column and self.group_column in batch.schema.names:
            group = plain_array(batch.column(self.group_column)).to_numpy(zero_copy_only=False)
        return Arrays(inputs, y, mask, group)

    # ---- persistence -------------------------------------------------------------------------
    def save(self, run_dir: Path) -> None:
        vocab_dir = run_dir / VOCAB
        vocab_dir.mkdir(parents=True, exist_ok=True)

        def entry(c: CategoricalColumn, vocab_file: str) -> dict[str, Any]:
            out: dict[str, Any] = {"name": c.name, "value_type": c.value_type, "cardinality": c.cardinality}
            if c.hash_buckets:
                out["hash_buckets"] = c.hash_buckets
            else:
                out["vocab_file"] = vocab_file
                with atomic_path(run_dir / vocab_file) as tmp:
                    pq.write_table(pa.table({"value": pa.array(c.vocab)}), tmp)
            if c.embedding_dim:
                out["embedding_dim"] = c.embedding_dim
            return out

        cats = [entry(c, f"{VOCAB}/{j:04d}.parquet") for j, c in enumerate(self.categorical)]
        seqs = [entry(c, f"{VOCAB}/sequence_{j:04d}.parquet") | {"max_length": c.max_length}
                for j, c in enumerate(self.sequence)]
        write_json(run_dir / SCHEMA, {
            "schema_version": SCHEMA_VERSION,
            "num_rows": self.num_rows,
            "categorical": cats,
            "dense": [{"name": d.name, "mean": d.mean, "std": d.std, "fill": d.fill} for d in self.dense],
            "labels": [{"task": lab.task, "column": lab.column, "positive": lab.positive, "kind": lab.kind,
                        "classes": lab.classes} for lab in self.labels],
            "image": [{"name": i.name, "channels": i.channels, "height": i.height, "width": i.width} for i in self.image],
            "sequence": seqs,
            "group_column": self.group_column,
        })

    @classmethod
    def load(cls, run_dir: Path) -> FittedSchema:
        path = RunDir(run_dir).require(SCHEMA)
        meta = json.loads(path.read_text())
        def vocab_of(c: dict[str, Any]) -> np.ndarray | None:
            if "vocab_file" not in c:
                return None
            return pq.read_table(run_dir / c["vocab_file"]).column("value").to_numpy(zero_copy_only=False)
        cats = [CategoricalColumn(c["name"], c["value_type"], vocab_of(c), c.get("hash_buckets"), c.get("embedding_dim"))
                for c in meta["categorical"]]
        seqs = [SequenceColumn(c["name"], c["value_type"], vocab_of(c), c.get("hash_buckets"), c.get("embedding_dim"),
                               max_length=c["max_length"]) for c in meta.get("sequence", [])]
        return cls(
            categorical=cats,
            dense=[DenseColumn(**d) for d in meta["dense"]],
            labels=[LabelColumn(lab["task"], lab["column"], lab["positive"], lab.get("kind", "value"), lab.get("classes"))
                    for lab in meta["labels"]],
            group_column=meta.get("group_column"),
            num_rows=meta.get("num_rows", 0),
            image=[ImageColumn(**i) for i in meta.get("image", [])],
            sequence=seqs,
        )


# ---- the fit pass ---------------------------------------------------------------------------------
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
    def __init__(self) -> None:
        self.n = 0
        self.s = 0.0
        self.ss = 0.0

    def add(self, arr: pa.Array) -> None:
        x = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
        x = x[np.isfinite(x)]
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
    stats = {f.name: _DenseStats() for f in dense_cfg}
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
        mean, std = stats[f.name].mean_std()
        if not f.standardize:
            mean, std = 0.0, 1.0
        fill = stats[f.name].mean_std()[0] if f.fill == "mean" else (0.0 if f.fill == "zero" else float(f.fill))
        dense.append(DenseColumn(f.name, mean, std, fill))
    image = [ImageColumn(f.name, f.channels or 1, f.height, f.width) for f in image_cfg]
    sample_table = pa.Table.from_batches(sample)
    for col in image:  # fail before training when the images are not what the config says
        col.values(sample_table.column(col.name).slice(0, 64))

    for col in sequence:  # fail before training on lists of the wrong item type
        col.sequence_ids(sample_table.column(col.name).slice(0, 64))
    check_leaks([f for f in config.features if f.kind not in ("image", "sequence")], sample_table, labels)
    return FittedSchema(categorical, dense, labels, config.evaluation.group_column, rows, image, sequence)


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


def check_leaks(features: Iterable[FeatureConfig], sample: pa.Table, labels: list[LabelColumn]) -> None:
    """Refuse a feature that is a copy of a label or determines it exactly (a derived column)."""
    checks = []  # (task, label column, label values, mask): multilabel tasks per attribute column
    for lab in labels:
        if lab.kind == "class":
            checks.append((lab.task, lab.column, *lab.class_ids(sample.column(lab.column))))
        elif lab.kind == "multi" and isinstance(lab.column, list):
            checks += [(lab.task, c, *LabelColumn(lab.task, c).values(sample.column(c))) for c in lab.column]
        elif lab.kind == "value":
            checks.append((lab.task, lab.column, *lab.values(sample.column(lab.column))))
    for task_name, label, y, mask in checks:
        if mask.sum() < 100 or len(np.unique(y[mask])) < 2:
            continue
        y_l = y[mask]
        for f in features:
            col = plain_array(sample.column(f.name)).filter(pa.array(mask))
            if col.null_count == len(col):
                continue
            codes = pc.dictionary_encode(col).indices.to_numpy(zero_copy_only=False)
            n_codes = int(np.nanmax(codes)) + 1 if len(codes) else 0
            leak = False
            if n_codes <= LEAK_MAX_DISTINCT:
                frame = pd.DataFrame({"f": codes, "y": y_l})
                leak = int(frame.groupby("f", dropna=False)["y"].nunique().max()) == 1
            elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
                x = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
                leak = bool(np.allclose(x, y_l, equal_nan=False))
            if leak:
                raise DataError(
                    f"feature '{f.name}' determines the label of task '{task_name}' (column '{label}') "
                    "exactly on the training data: it is a copy of the label or derived from it, so the model "
                    f"would learn nothing usable; remove '{f.name}' from features"
                )
