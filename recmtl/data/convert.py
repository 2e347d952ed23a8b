"""CSV -> Parquet (streaming, pyarrow's CSV reader) and random splitting of Parquet files."""
from __future__ import annotations

import codecs
import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from recmtl.data.arrow import plain_array
from recmtl.data.parquet import ParquetSource
from recmtl.errors import ConfigError, DataError
from recmtl.files import atomic_path

ROW_GROUP_ROWS = 65_536


def csv_to_parquet(src: str | Path, out: str | Path, names: Sequence[str] | None = None, header: bool = True,
                   delimiter: str = ",", null_values: Sequence[str] | None = None, strip: bool = True,
                   column_types: dict[str, str] | None = None, block_mb: int = 16, encoding: str = "utf-8") -> int:
    """Stream ``src`` (``.csv`` or ``.csv.gz``) into ``out``; return the number of rows written.

    ``null_values``: the strings read as null in every column, strings included (default: empty field
    only, so strings such as ``NA`` stay values). ``strip`` trims spaces around values (``a, b``).
    ``names`` gives column names (needed without a header; with a header they replace it). ``encoding``:
    the file's text encoding (any Python codec name: ``latin-1``, ``cp1252``, ...); text that does not decode
    is a :class:`DataError` suggesting ``--encoding``.
    """
    src = Path(src)
    if not src.is_file():
        raise DataError(f"no such file: {src}")
    if len(delimiter) != 1:
        raise ConfigError(f"--delimiter must be one character, got {delimiter!r}")
    try:
        encoding = codecs.lookup(encoding).name
    except LookupError:
        raise ConfigError(f"--encoding {encoding}: unknown encoding (e.g. utf-8, latin-1, cp1252)") from None
    nulls = list(null_values) if null_values else [""]
    types = {}
    for col, typ in (column_types or {}).items():
        try:
            types[col] = pa.type_for_alias(typ)
        except ValueError:
            raise ConfigError(f"--type {col}={typ}: unknown type (try int64, float64, string, bool)") from None
    read_opts = pcsv.ReadOptions(block_size=block_mb << 20, column_names=list(names) if names else None,
                                 skip_rows=1 if (header and names) else 0, autogenerate_column_names=False,
                                 encoding=encoding)
    if not header and not names:
        read_opts.autogenerate_column_names = True
    parse_opts = pcsv.ParseOptions(delimiter=delimiter)
    rows = 0
    try:
        if strip:
            # pyarrow has no skipinitialspace: read every column as text, trim, then type it
            with pcsv.open_csv(src, read_options=read_opts, parse_options=parse_opts) as probe:
                column_names = probe.schema.names
            convert_opts = pcsv.ConvertOptions(column_types={c: pa.string() for c in column_names},
                                               null_values=[], strings_can_be_null=False)
        else:
            convert_opts = pcsv.ConvertOptions(null_values=nulls, strings_can_be_null=True, column_types=types)
        reader = pcsv.open_csv(src, read_options=read_opts, parse_options=parse_opts, convert_options=convert_opts)
        schema = None
        with atomic_path(out) as tmp:
            writer = None
            first_types: dict[str, pa.DataType] = {}
            for batch in reader:
                table = pa.Table.from_batches([batch])
                _require_text(table, src, encoding)
                if strip:
                    table = _strip_and_type(table, nulls, types, first_types)
                if writer is None:
                    schema = table.schema
                    writer = pq.ParquetWriter(tmp, schema)
                writer.write_table(table.cast(schema), row_group_size=ROW_GROUP_ROWS)
                rows += table.num_rows
            if writer is None:
                raise DataError(f"{src} holds no rows")
            writer.close()
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        if "invalid UTF8" in str(exc) or "UTF-8" in str(exc):
            raise DataError(f"cannot convert {src}: {exc}. {_ENCODING_HINT.format(encoding=encoding)}") from None
        raise DataError(f"cannot convert {src}: {exc}. If a column's type changes past the first block, "
                        "give it with --type COLUMN=TYPE") from None
    except UnicodeError as exc:  # from the transcoding of --encoding
        raise DataError(f"cannot convert {src}: it does not decode as {encoding} ({exc}); give the file's "
                        "encoding with --encoding") from None
    return rows


_ENCODING_HINT = ("The file is not {encoding} text: give its encoding with --encoding (e.g. --encoding latin-1 or "
                  "--encoding cp1252)")


def _require_text(table: pa.Table, src: Path, encoding: str) -> None:
    """pyarrow reads a CSV column whose bytes are not valid UTF-8 as binary: that is a wrong encoding."""
    for name, col in zip(table.column_names, table.columns):
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            raise DataError(f"cannot convert {src}: column '{name}' holds text that is not valid "
                            f"{encoding}. " + _ENCODING_HINT.format(encoding=encoding))


def _strip_and_type(table: pa.Table, nulls: list[str], types: dict[str, pa.DataType],
                    first_types: dict[str, pa.DataType]) -> pa.Table:
    """Trim spaces, turn null markers into nulls, and type each column as the first block decided."""
    cols = []
    for name, col in zip(table.column_names, table.columns):
        if pa.types.is_string(col.type):
            col = pc.utf8_trim_whitespace(col)
            col = pc.if_else(pc.is_in(col, value_set=pa.array(nulls)), pa.scalar(None, pa.string()), col)
        if name not in first_types:
            first_types[name] = types.get(name) or _infer(col)
        cols.append(col.cast(first_types[name]) if col.type != first_types[name] else col)
    return pa.table(cols, names=table.column_names)


def _infer(col: pa.ChunkedArray) -> pa.DataType:
    if not pa.types.is_string(col.type):
        return col.type
    for typ in (pa.int64(), pa.float64()):
        try:
            col.cast(typ)
            return typ
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return pa.string()


def split_parquet(src: str, outs: Sequence[str | Path], fractions: Sequence[float], seed: int = 0,
                  order_by: str | None = None, group_by: str | None = None) -> list[int]:
    """Split the rows of ``src`` into ``outs`` in the given ``fractions`` of its rows (streaming; inside each
    output the rows keep their input order); returns the rows written to each output.

    - By default rows go to the outputs at random (``seed``), in exactly the given fractions. Holds one byte
      per row (the assignment) besides one record batch.
    - ``order_by=COL``: by the value of ``COL`` (a time, a date, a number or a string): the earliest rows to
      the first output (e.g. train), the latest to the last (e.g. test). Rows with equal values stay in one
      output, so each cut is placed at the value boundary nearest to its fraction. Holds each distinct value
      of ``COL`` with its row count (two passes: count, then write). Nulls (and NaN) in ``COL`` are refused.
    - ``group_by=COL``: every row of a group (e.g. a user id; nulls form one group) goes to the same output;
      groups are shuffled (``seed``), then cut at the group boundaries nearest to the fractions of rows, so
      the fractions hold up to about half a group's rows at each cut. Holds one 64-bit hash and one row count
      per distinct group.

    An output that would get no rows is a :class:`DataError`."""
    if len(outs) != len(fractions):
        raise ConfigError(f"{len(outs)} outputs but {len(fractions)} fractions")
    total = float(sum(fractions))
    if any(f <= 0 for f in fractions) or abs(total - 1.0) > 1e-6:
        raise ConfigError(f"--fractions must be positive and sum to 1, got {list(fractions)}")
    if order_by is not None and group_by is not None:
        raise ConfigError("--order-by and --group-by cannot be combined: choose a time split or a group split")
    source = ParquetSource(src)
    paths = [Path(o) for o in outs]
    if order_by is None and group_by is None:
        return _random_split(source, paths, fractions, seed)
    column = order_by or group_by
    ParquetSource.require([column], source.schema, src)
    key = _order_key(source, column) if order_by else _group_key(column, seed)
    values, counts = _value_counts(source, column, key)
    cuts = np.cumsum(np.array(fractions[:-1], dtype=np.float64) / total) * int(counts.sum())
    ends = np.concatenate([[0], np.cumsum(counts)])  # row position after each block of equal keys
    bounds = []
    for cut in cuts:  # the block boundary nearest to each cut, never before the previous one
        right = int(np.clip(np.searchsorted(ends, cut), 1, len(ends) - 1))
        b = right if ends[right] - cut < cut - ends[right - 1] else right - 1
        bounds.append(max(b, bounds[-1] if bounds else 0))
    sizes = np.diff(ends[[0, *bounds, -1]])
    if (sizes == 0).any():
        empty = paths[int(np.flatnonzero(sizes == 0)[0])]
        why = (f"too many rows share one value of '{column}'" if order_by
               else f"'{column}' has too few groups, or one group holds too many of the rows")
        raise DataError(f"--{'order-by' if order_by else 'group-by'} {column}: output {empty} would get no rows "
                        f"({why}; {len(values):,} distinct value(s) over {int(counts.sum()):,} rows)")
    thresholds = [values[b] for b in bounds]  # the first key of each output after the first
    writers_counts = [0] * len(paths)
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(p)) for p in paths]
        writers = [stack.enter_context(pq.ParquetWriter(t, source.schema)) for t in tmps]
        for batch in source.batches():
            k = key(batch.column(column), batch.num_rows)
            which = np.zeros(batch.num_rows, np.uint8)
            for t in thresholds:
                which += pc.greater_equal(k, t).to_numpy(zero_copy_only=False).astype(np.uint8)
            for i, w in enumerate(writers):
                part = batch.filter(pa.array(which == i))
                if part.num_rows:
                    w.write_batch(part, row_group_size=ROW_GROUP_ROWS)
                    writers_counts[i] += part.num_rows
    return writers_counts


def _random_split(source: ParquetSource, paths: list[Path], fractions: Sequence[float], seed: int) -> list[int]:
    """Rows at random to ``paths`` in exactly the given ``fractions``."""
    total = float(sum(fractions))
    rng = np.random.default_rng(seed)
    # exact sizes: a shuffled assignment of rows to outputs (one byte per row, bounded by the row count)
    sizes = np.floor(np.array(fractions) / total * source.num_rows).astype(np.int64)
    sizes[: source.num_rows - int(sizes.sum())] += 1
    assignment = rng.permutation(np.repeat(np.arange(len(paths), dtype=np.uint8), sizes))
    counts = [0] * len(paths)
    seen = 0
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(p)) for p in paths]
        writers = [stack.enter_context(pq.ParquetWriter(t, source.schema)) for t in tmps]
        for batch in source.batches():
            which = assignment[seen:seen + batch.num_rows]
            seen += batch.num_rows
            for i, w in enumerate(writers):
                part = batch.filter(pa.array(which == i))
                if part.num_rows:
                    w.write_batch(part, row_group_size=ROW_GROUP_ROWS)
                    counts[i] += part.num_rows
    return counts


Key = Callable[[pa.Array | pa.ChunkedArray, int], pa.Array]


def _order_key(source: ParquetSource, column: str) -> Key:
    """``--order-by``: the column's own values (refused: nulls, NaN, types without an order)."""
    typ = source.field(column).type
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_temporal(typ)
            or pa.types.is_decimal(typ) or pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise DataError(f"--order-by {column}: column '{column}' has type {typ}; a time split needs times, dates, "
                        "numbers or strings (e.g. ISO dates)")

    def key(col: pa.Array | pa.ChunkedArray, rows: int) -> pa.Array:
        arr = plain_array(col)
        if arr.null_count or (pa.types.is_floating(arr.type) and pc.any(pc.is_nan(arr)).as_py()):
            raise DataError(f"--order-by {column}: column '{column}' has null or NaN values; every row needs one "
                            "to be placed in time (fill them, or drop those rows first)")
        return arr
    return key


def _group_key(column: str, seed: int) -> Key:
    """``--group-by``: a seeded 64-bit hash of the group value (pandas' ``hash_array``), so that sorting by it
    shuffles the groups; two groups that share a hash simply stay together."""
    import pandas as pd
    mix = np.uint64(np.random.default_rng([seed, 0x5EED]).integers(1, 2**63, dtype=np.int64))

    def key(col: pa.Array | pa.ChunkedArray, rows: int) -> pa.Array:
        arr = plain_array(col)
        typ = arr.type
        if pa.types.is_integer(typ) or pa.types.is_boolean(typ):
            nulls = arr.is_null().to_numpy(zero_copy_only=False)
            ints = arr.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
            hashed = pd.util.hash_array(ints, categorize=False)
            hashed[nulls] = np.uint64(2**64 - 1)  # nulls: one group, apart from every value
        elif pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ):
            hashed = pd.util.hash_array(arr.to_numpy(zero_copy_only=False), categorize=True)
        else:
            raise DataError(f"--group-by {column}: column '{column}' has type {typ}; a group column holds ids "
                            "(integers or strings)")
        return pa.array(pd.util.hash_array(hashed ^ mix, categorize=False), pa.uint64())
    return key


def _value_counts(source: ParquetSource, column: str, key: Key) -> tuple[list[pa.Scalar], np.ndarray]:
    """The distinct keys of ``column`` in ascending order with their row counts, in one streaming pass
    (partial counts merged whenever they exceed 2M entries)."""
    parts: list[pa.Table] = []
    pending = 0

    def merge(tables: list[pa.Table]) -> pa.Table:
        grouped = pa.concat_tables(tables).group_by("values").aggregate([("counts", "sum")])
        return grouped.rename_columns(["values", "counts"])

    for batch in source.batches(columns=[column]):
        counts = pc.value_counts(key(batch.column(0), batch.num_rows))
        parts.append(pa.table({"values": counts.field("values"), "counts": counts.field("counts")}))
        pending += len(counts)
        if pending > 2_000_000 and len(parts) > 1:
            parts = [merge(parts)]
            pending = parts[0].num_rows
    if not parts:
        raise DataError(f"{source.spec} has no rows to split")
    table = merge(parts).sort_by("values")
    return list(table.column("values")), table.column("counts").to_numpy().astype(np.int64)
