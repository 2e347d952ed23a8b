"""Parquet input: a file, a folder or a glob, read in record batches with bounded memory."""
from __future__ import annotations

import glob
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
    """A set of Parquet files read as one table, in row groups."""

    def __init__(self, spec: str, columns: Sequence[str] | None = None, read_dictionary: Sequence[str] = ()) -> None:
        self.spec = spec
        self.files = [open_parquet(p, read_dictionary) for p in resolve_paths(spec)]
        self.paths = resolve_paths(spec)
        self.schema = self.files[0].schema_arrow
        for path, pf in zip(self.paths, self.files):
            if columns is not None:
                self.require(columns, pf.schema_arrow, path)
        self.columns = list(columns) if columns is not None else self.schema.names
        self.num_rows = sum(pf.metadata.num_rows for pf in self.files)
        self.units = [(i, rg) for i, pf in enumerate(self.files) for rg in range(pf.num_row_groups)]
        self.unit_rows = [self.files[i].metadata.row_group(rg).num_rows for i, rg in self.units]

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
        cols = list(columns) if columns is not None else self.columns
        for u in order:
            if mine is not None and u not in mine and u not in shared:
                continue
            file_index, row_group = self.units[u]
            pf = self.files[file_index]
            try:
                for batch in pf.iter_batches(batch_size=read_rows, row_groups=[row_group], columns=cols):
                    if u in shared:  # rank r keeps rows r, r + world, ...
                        batch = batch.take(pa.array(np.arange(shard[0], batch.num_rows, shard[1])))
                    yield batch
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"failed reading {self.paths[file_index]} (row group {row_group}): {exc}") from None


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
