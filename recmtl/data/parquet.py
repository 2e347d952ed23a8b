"""Parquet input: a file, a folder or a glob, read in record batches with bounded memory."""
from __future__ import annotations

import glob
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recmtl.errors import DataError, close_matches


def resolve_paths(spec: str) -> list[Path]:
    """Expand a Parquet file, a folder (all ``*.parquet`` below it) or a glob into sorted files."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise DataError(f"folder {spec} holds no *.parquet files")
        return files
    if path.is_file():
        return [path]
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"no files match {spec}")
        return files
    raise DataError(f"no such file or folder: {spec}")


def open_parquet(path: Path, read_dictionary: Sequence[str] = ()) -> pq.ParquetFile:
    """``read_dictionary``: string columns to read dictionary-encoded (each distinct value decoded once);
    names that are not string columns of this file are ignored."""
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        strings = [c for c in read_dictionary if c in schema.names
                   and (pa.types.is_string(schema.field(c).type) or pa.types.is_large_string(schema.field(c).type))]
        return pq.ParquetFile(path, metadata=pf.metadata, read_dictionary=strings) if strings else pf
    except (pa.ArrowException, OSError) as exc:  # ArrowInvalid, ArrowNotImplementedError (a type it cannot read), ...
        raise DataError(f"{path} is not a readable Parquet file (corrupt or another format): {exc}") from None


class ParquetSource:
    """A set of Parquet files read as one table, in row groups.

    Files may differ in the width of a column's type (``int32`` in one, ``int64`` in another; ``float`` and
    ``double``; ``string`` and ``large_string``): ``schema`` holds the type they all widen to (pyarrow's
    permissive schema unification) and every batch comes in that type. String columns are checked to hold
    valid UTF-8 as they are read (a :class:`DataError` naming the column and file otherwise)."""

    def __init__(self, spec: str, columns: Sequence[str] | None = None, read_dictionary: Sequence[str] = ()) -> None:
        self.spec = spec
        columns = list(dict.fromkeys(columns)) if columns is not None else None  # several tasks may share a label
        self.paths = resolve_paths(spec)
        self.files = [open_parquet(p, read_dictionary) for p in self.paths]
        for path, pf in zip(self.paths, self.files):
            if columns is not None:
                self.require(columns, pf.schema_arrow, path)
        self.schema = unified_schema([pf.schema_arrow for pf in self.files], self.paths, columns)
        self.columns = list(columns) if columns is not None else self.schema.names
        self.num_rows = sum(pf.metadata.num_rows for pf in self.files)
        self.units = [(i, rg) for i, pf in enumerate(self.files) for rg in range(pf.num_row_groups)]
        self.unit_rows = [self.files[i].metadata.row_group(rg).num_rows for i, rg in self.units]
        #: the row of its file at which each unit (row group) starts
        self.unit_start = [0] * len(self.units)
        for u in range(1, len(self.units)):
            same_file = self.units[u][0] == self.units[u - 1][0]
            self.unit_start[u] = self.unit_start[u - 1] + self.unit_rows[u - 1] if same_file else 0

    @staticmethod
    def require(columns: Sequence[str], schema: pa.Schema, path: Path | str) -> None:
        names = schema.names
        for col in columns:
            if col not in names:
                raise DataError(f"column '{col}' not found in {path}{close_matches(col, names)}")

    def field(self, name: str) -> pa.Field:
        return self.schema.field(name)

    def batches(self, read_rows: int = 65_536, rng: np.random.Generator | None = None,
                columns: Sequence[str] | None = None, shard: tuple[int, int] | None = None) -> Iterator[pa.RecordBatch]:
        """Record batches of at most ``read_rows`` rows; row groups in random order when ``rng`` is given.

        ``shard=(rank, world)``: only this rank's share (:func:`shard_units`); every rank must pass the same
        ``rng`` state so that they agree on the order."""
        order = list(range(len(self.units)))
        if rng is not None:
            order = [order[i] for i in rng.permutation(len(order))]
        mine: set[int] | None = None
        shared: set[int] = set()
        if shard is not None and shard[1] > 1:
            rank, world = shard
            whole, shared = shard_units(order, [self.unit_rows[i] for i in order], world)
            mine = set(whole[rank])
        for u in order:
            if mine is not None and u not in mine and u not in shared:
                continue
            for batch in self.unit_batches(u, read_rows, columns):
                if u in shared:  # rank r keeps rows r, r + world, ...
                    batch = batch.take(pa.array(np.arange(shard[0], batch.num_rows, shard[1])))
                yield batch

    def unit_batches(self, u: int, read_rows: int = 65_536,
                     columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The record batches of unit (row group) ``u``, in the unified types, UTF-8 checked."""
        cols = list(dict.fromkeys(columns if columns is not None else self.columns))  # pyarrow reads a name once
        target = pa.schema([self.schema.field(c) for c in cols if c in self.schema.names])
        strings = [i for i, f in enumerate(target) if _is_text(f.type)]
        file_index, row_group = self.units[u]
        pf = self.files[file_index]
        path = self.paths[file_index]
        row = self.unit_start[u]
        try:
            for batch in pf.iter_batches(batch_size=read_rows, row_groups=[row_group], columns=cols):
                if strings:
                    check_utf8(batch, strings, path, row)
                row += batch.num_rows
                if batch.schema.types != target.types:  # a file whose types are narrower than the others'
                    batch = batch.cast(target)
                yield batch
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"failed reading {path} (row group {row_group}): {exc}") from None


def _is_text(typ: pa.DataType) -> bool:
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    return pa.types.is_string(typ) or pa.types.is_large_string(typ)


def check_utf8(batch: pa.RecordBatch, columns: Sequence[int], path: Path | str, first_row: int = 0) -> None:
    """Raise a :class:`DataError` naming the column and file when a string column of ``batch`` (its rows
    starting at row ``first_row`` of ``path``) holds bytes that are not valid UTF-8. Parquet readers do not
    check this; without it the first conversion to Python strings fails with a raw Arrow error."""
    for i in columns:
        col = batch.column(i)
        try:
            (col.dictionary if pa.types.is_dictionary(col.type) else col).validate(full=True)
        except pa.ArrowInvalid as exc:
            where = ""
            found = re.search(r"string index (\d+)", str(exc))
            if found and not pa.types.is_dictionary(col.type):
                where = f" (row {first_row + int(found.group(1)):,} of the file)"
            raise DataError(f"column '{batch.schema.field(i).name}' of {path} holds text that is not valid UTF-8"
                            f"{where}; re-encode the file as UTF-8 (e.g. `recmtl convert --encoding latin-1` "
                            "from CSV), or store the column as binary") from None


def unified_schema(schemas: Sequence[pa.Schema], paths: Sequence[Path | str],
                   columns: Sequence[str] | None = None) -> pa.Schema:
    """The first schema with each column's type (of ``columns``; default all) widened to what every file's
    type widens to (``int32`` and ``int64`` -> ``int64``); a :class:`DataError` naming the column and two
    files whose types do not unify (e.g. ``int64`` and ``string``)."""
    first = schemas[0]
    if all(s.types == first.types and s.names == first.names for s in schemas[1:]):
        return first
    fields = []
    wanted = set(first.names if columns is None else columns)
    for field in first:
        typ = field.type
        for schema, path in zip(schemas[1:], paths[1:]):
            if field.name not in wanted or field.name not in schema.names or schema.field(field.name).type == typ:
                continue
            other = schema.field(field.name).type
            try:
                typ = pa.unify_schemas([pa.schema([field.with_type(typ)]), pa.schema([field.with_type(other)])],
                                       promote_options="permissive").field(field.name).type
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                raise DataError(f"column '{field.name}' has type {first.field(field.name).type} in {paths[0]} but "
                                f"{other} in {path}; every file must hold the same type, or types that widen to "
                                "one (such as int32 and int64)") from None
        fields.append(field.with_type(typ))
    return pa.schema(fields, metadata=first.metadata)


def shard_units(order: Sequence[int], rows: Sequence[int], world: int) -> tuple[list[list[int]], set[int]]:
    """Share row groups (``order``, with ``rows`` rows each) among ``world`` ranks so that every rank gets
    the same number of rows. Row groups of equal size are dealt whole, round-robin in ``order`` (rank ``r``
    gets the ``r``-th, ``r + world``-th, ... of each size), so a rank decodes only its own; the at most
    ``world - 1`` left over of each size (e.g. the last, shorter group of each file) are shared: every rank
    decodes them and keeps rows ``r, r + world, ...``. Returns (whole row groups per rank, shared ones); the
    ranks' row counts differ by at most one row per record batch read from a shared group."""
    by_size: dict[int, list[int]] = {}
    for unit, n in zip(order, rows):
        by_size.setdefault(n, []).append(unit)
    whole: list[list[int]] = [[] for _ in range(world)]
    shared: set[int] = set()
    for units in by_size.values():
        dealt = len(units) // world * world
        for i, unit in enumerate(units[:dealt]):
            whole[i % world].append(unit)
        shared.update(units[dealt:])
    return whole, shared
