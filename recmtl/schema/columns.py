"""Column transforms, Arrow -> numpy: categorical ids (vocabulary or hashing), sequences of ids, hashed text
n-grams, dense values (filled, standardised), images. Each has an in-graph twin in ``recmtl.export.graph``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.utils import murmurhash3_32

from recmtl.data.arrow import plain_array
from recmtl.data.images import decode_images, is_image_type
from recmtl.data.sequences import item_type, last_items
from recmtl.errors import DataError


def _value_type(name: str, typ: pa.DataType, kind: str) -> str:
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if kind == "sequence":
        found = item_type(typ)
        if found is None:
            raise DataError(f"feature '{name}' is sequence but its column has type {typ}; expected a list of "
                            "integers or strings")
        return found
    if kind == "text":
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise DataError(f"feature '{name}' is text but its column has type {typ}; expected strings")
        return "string"
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
    vocabulary: str | None = None  # the categorical feature whose vocabulary (and ids) this one shares
    target: str | None = None  # the candidate categorical feature of din/transformer

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


#: a text's words: maximal runs of letters, digits and "_" (RE2, as in the exported graph's Tokenizer)
TEXT_SEPARATOR = r"[^\pL\pN_]+"
#: a bigram's hash: (h(first word) * BIGRAM_MULTIPLIER + h(second word)), h = MurmurHash3_32 (seed 0, unsigned)
BIGRAM_MULTIPLIER = 1_000_003


@dataclass
class TextColumn:
    """A free-text column: lowercased (Unicode), split into words on runs of non-word characters (anything but
    letters, digits and ``_``), each word hashed with MurmurHash3_32 (seed 0, unsigned) to ``h``; a unigram's id
    is ``h mod hash_buckets + 1``, a bigram's ``(h1 * BIGRAM_MULTIPLIER + h2) mod hash_buckets + 1``. A row keeps
    the first ``max_tokens`` of its unigrams (in order) followed by its bigrams (``ngrams: 2``), left-aligned in
    ``[n, max_tokens]``; the rest is the padding id ``cardinality``. A null or empty text has no tokens."""

    name: str
    hash_buckets: int = 100_000
    ngrams: int = 2
    max_tokens: int = 64
    embedding_dim: int | None = None
    value_type: str = "string"

    @property
    def cardinality(self) -> int:
        return self.hash_buckets + 1

    @property
    def padding_id(self) -> int:
        return self.cardinality

    def token_ids(self, arr: pa.Array) -> np.ndarray:
        """``[n, max_tokens]`` int64 n-gram ids."""
        arr = plain_array(arr)
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            raise DataError(f"text feature '{self.name}': expected string values, got {arr.type}")
        n = len(arr)
        words = pc.split_pattern_regex(pc.utf8_lower(arr.fill_null("")), TEXT_SEPARATOR)
        flat = pc.list_flatten(words)
        rows = np.repeat(np.arange(n, dtype=np.int64), pc.list_value_length(words).to_numpy(zero_copy_only=False))
        keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
        tokens, rows = flat.filter(pa.array(keep)), rows[keep]
        encoded = pc.dictionary_encode(tokens)
        uniques = encoded.dictionary.to_pylist()
        hashed = np.fromiter((murmurhash3_32(u, seed=0, positive=True) for u in uniques), dtype=np.int64,
                             count=len(uniques))
        h = hashed[encoded.indices.to_numpy()] if len(tokens) else np.zeros(0, dtype=np.int64)
        counts = np.bincount(rows, minlength=n)
        pos = np.arange(len(h), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        ids, id_rows, id_cols = [h % self.hash_buckets + 1], [rows], [pos]
        if self.ngrams >= 2 and len(h) > 1:
            same = rows[1:] == rows[:-1]
            ids.append((h[:-1][same] * BIGRAM_MULTIPLIER + h[1:][same]) % self.hash_buckets + 1)
            id_rows.append(rows[:-1][same])
            id_cols.append(counts[rows[:-1][same]] + pos[:-1][same])
        ids_all, r, c = np.concatenate(ids), np.concatenate(id_rows), np.concatenate(id_cols)
        kept = c < self.max_tokens
        out = np.full((n, self.max_tokens), self.padding_id, dtype=np.int64)
        out[r[kept], c[kept]] = ids_all[kept]
        return out


@dataclass
class DenseColumn:
    """A number: clipped to ``[clip_low, clip_high]`` (when set), transformed (``log1p``: sign(x) * log1p(|x|)),
    nulls/NaN/inf replaced by ``fill`` (in the transformed unit), then standardised with the fitted mean and std
    (those of the transformed values)."""

    name: str
    mean: float = 0.0
    std: float = 1.0
    fill: float = 0.0
    transform: str = "none"  # "none" | "log1p"
    clip_low: float | None = None
    clip_high: float | None = None

    def transformed(self, x: np.ndarray) -> np.ndarray:
        """Raw float64 values -> clipped and transformed values (non-finite inputs stay non-finite, except
        that an infinite value is clipped when a bound is set: callers mark missing values first)."""
        if self.clip_low is not None or self.clip_high is not None:
            x = np.clip(x, self.clip_low, self.clip_high)
        if self.transform == "log1p":
            x = np.sign(x) * np.log1p(np.abs(x))
        return x

    def values(self, arr: pa.Array) -> np.ndarray:
        arr = plain_array(arr)
        if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)
                or pa.types.is_boolean(arr.type) or pa.types.is_decimal(arr.type)):
            raise DataError(f"feature '{self.name}': expected numbers, got {arr.type}")
        x = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
        missing = ~np.isfinite(x)
        x = self.transformed(x)
        x = np.where(missing, self.fill, x)
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
