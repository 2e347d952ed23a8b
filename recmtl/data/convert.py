"""CSV -> Parquet (streaming, pyarrow's CSV reader) and random splitting of Parquet files."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from recmtl.data.parquet import ParquetSource
from recmtl.errors import ConfigError, DataError
from recmtl.files import atomic_path

ROW_GROUP_ROWS = 65_536


def csv_to_parquet(src: str | Path, out: str | Path, names: Sequence[str] | None = None, header: bool = True,
                   delimiter: str = ",", null_values: Sequence[str] | None = None, strip: bool = True,
                   column_types: dict[str, str] | None = None, block_mb: int = 16) -> int:
    """Stream ``src`` (``.csv`` or ``.csv.gz``) into ``out``; return the number of rows written.

    ``null_values``: the strings read as null in every column, strings included (default: empty field
    only, so strings such as ``NA`` stay values). ``strip`` trims spaces around values (``a, b``).
    ``names`` gives column names (needed without a header; with a header they replace it).
    """
    src = Path(src)
    if not src.is_file():
        raise DataError(f"no such file: {src}")
    if len(delimiter) != 1:
        raise ConfigError(f"--delimiter must be one character, got {delimiter!r}")
    nulls = list(null_values) if null_values else [""]
    types = {}
    for col, typ in (column_types or {}).items():
        try:
            types[col] = pa.type_for_alias(typ)
        except ValueError:
            raise ConfigError(f"--type {col}={typ}: unknown type (try int64, float64, string, bool)") from None
    read_opts = pcsv.ReadOptions(block_size=block_mb << 20, column_names=list(names) if names else None,
                                 skip_rows=1 if (header and names) else 0, autogenerate_column_names=False)
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
        raise DataError(f"cannot convert {src}: {exc}. If a column's type changes past the first block, "
                        "give it with --type COLUMN=TYPE") from None
    return rows


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


def split_parquet(src: str, outs: Sequence[str | Path], fractions: Sequence[float], seed: int = 0) -> list[int]:
    """Assign the rows of ``src`` at random to ``outs`` in exactly the given ``fractions`` (streaming)."""
    if len(outs) != len(fractions):
        raise ConfigError(f"{len(outs)} outputs but {len(fractions)} fractions")
    total = float(sum(fractions))
    if any(f <= 0 for f in fractions) or abs(total - 1.0) > 1e-6:
        raise ConfigError(f"--fractions must be positive and sum to 1, got {list(fractions)}")
    source = ParquetSource(src)
    rng = np.random.default_rng(seed)
    # exact sizes: a shuffled assignment of rows to outputs (one byte per row, bounded by the row count)
    sizes = np.floor(np.array(fractions) / total * source.num_rows).astype(np.int64)
    sizes[: source.num_rows - int(sizes.sum())] += 1
    assignment = rng.permutation(np.repeat(np.arange(len(outs), dtype=np.uint8), sizes))
    counts = [0] * len(outs)
    seen = 0
    paths = [Path(o) for o in outs]
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
