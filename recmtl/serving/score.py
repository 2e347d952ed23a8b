"""Scoring with an exported ONNX model only (no torch): Arrow record batches in, scored batches out.

``score_batches`` is a pure function over ``pyarrow.RecordBatch`` iterators, so the same code runs in
``recmtl score``, in a process pool, and inside Spark ``mapInArrow``, Ray Data ``map_batches`` or Dask.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recmtl.data.arrow import arrow_scalar, arrow_view, numpy_dtype, numpy_view, plain_array
from recmtl.data.images import decode_images
from recmtl.data.sequences import last_items
from recmtl.errors import DataError, close_matches
from recmtl.serving.modelfile import check_self_contained
from recmtl.serving.wire import INT_NULL, PAD_INT, PAD_STRING, ModelInput, schema_from_metadata

#: rows per onnxruntime call: 1024 scored 24% faster than 2048 end to end on 2 cores (benchmarks/RESULTS.md)
DEFAULT_BATCH_SIZE = 1024
#: appended to a kept column's name when an output column already has it (a task named like its label column)
KEPT_SUFFIX = "__kept"


def kept_names(keep: Sequence[str], taken: Sequence[str]) -> list[str]:
    """Output names of the ``keep`` columns written beside the columns ``taken`` (the task scores; for
    ``recmtl evaluate`` also ``TASK__label``): a kept column named like one of those is written as
    ``NAME__kept`` (e.g. ``--keep recommend`` beside the scores of task ``recommend``), so every output
    column has its own name and the file stays readable by pandas and pyarrow. ``keep`` must hold no
    duplicates."""
    used = set(taken)
    names = []
    for k in keep:
        name = k
        while name in used or name in keep[len(names) + 1:]:
            name += KEPT_SUFFIX
        used.add(name)
        names.append(name)
    return names


def to_feeds(batch: pa.RecordBatch | pa.Table, inputs: Sequence[ModelInput]) -> dict[str, np.ndarray]:
    """Raw Arrow columns -> the ONNX model's inputs: int64 ids (null -> a value outside every
    vocabulary), strings (null -> empty string, which means missing), float32 (null -> NaN); image columns
    (encoded bytes or number lists) -> float32 ``[n, C, H, W]`` in [0, 1] (recmtl.data.images; null -> zeros);
    sequence (list) columns -> ``[n, max_length]`` int64 or strings: each row's last ``max_length`` items,
    padded with ``recmtl.serving.wire.PAD_INT`` / ``PAD_STRING`` (null list: all padding; null item: missing)."""
    names = batch.schema.names
    feeds = {}
    for inp in inputs:
        if inp.name not in names:
            raise DataError(f"input column '{inp.name}' is missing{close_matches(inp.name, names)}; "
                            f"the model needs: {', '.join(i.name for i in inputs)}")
        # a string column read dictionary-encoded stays so: _strings converts each distinct value once
        col = plain_array(batch.column(inp.name), decode_dictionary=inp.dtype != "string" or inp.is_sequence)
        if pa.types.is_null(col.type):  # an all-null column (Arrow type null): every value missing
            col = pa.nulls(len(col), inp.arrow_type())
        typ = col.type
        if inp.is_image:
            feeds[inp.name] = decode_images(col, inp.name, *inp.shape)
        elif inp.is_sequence:
            if not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)):
                raise DataError(f"column '{inp.name}' has type {typ}; the model expects lists of "
                                + ("integers" if inp.dtype == "int64" else "strings"))
            feeds[inp.name] = padded(col, inp.shape[0], inp.name, inp.dtype)
        elif inp.dtype == "int64":
            if not (pa.types.is_integer(typ) or pa.types.is_boolean(typ)):
                raise DataError(f"column '{inp.name}' has type {typ}; the model expects integers")
            if col.null_count or typ != pa.int64():
                col = col.cast(pa.int64()).fill_null(arrow_scalar(INT_NULL, np.int64))
            feeds[inp.name] = numpy_view(col)
        elif inp.dtype == "string":
            feeds[inp.name] = _strings(col, inp.name)
        else:
            if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)
                    or pa.types.is_decimal(typ)):
                raise DataError(f"column '{inp.name}' has type {typ}; the model expects numbers")
            col = col if typ == pa.float32() else pc.cast(col, pa.float32())
            feeds[inp.name] = numpy_view(col.fill_null(arrow_scalar(np.nan, np.float32)) if col.null_count else col)
    return feeds


def padded(arr: pa.Array | pa.ChunkedArray, max_length: int, name: str, value_type: str) -> np.ndarray:
    """A list column -> the ONNX input ``[n, max_length]``: int64 (null item -> INT64_MIN, padding
    ``PAD_INT``) or object strings (null item -> "", padding ``PAD_STRING``)."""
    values, rows, cols = last_items(arr, max_length, name)
    n = len(arr)
    if value_type == "int64":
        if not (pa.types.is_integer(values.type) or pa.types.is_boolean(values.type)):
            raise DataError(f"column '{name}' holds lists of {values.type}; the model expects lists of integers")
        out = np.full((n, max_length), PAD_INT, dtype=np.int64)
        out[rows, cols] = values.cast(pa.int64()).fill_null(INT_NULL).to_numpy(zero_copy_only=False)
        return out
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise DataError(f"column '{name}' holds lists of {values.type}; the model expects lists of strings")
    out = np.full((n, max_length), PAD_STRING, dtype=object)
    out[rows, cols] = values.fill_null("").to_numpy(zero_copy_only=False)
    return out


def _strings(col: pa.Array, name: str) -> np.ndarray:
    """A string column as the object array onnxruntime takes (null -> ""), each distinct value turned into a
    Python string once (``recmtl score`` reads string inputs dictionary-encoded; others are encoded here)."""
    typ = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise DataError(f"column '{name}' has type {typ}; the model expects strings")
    if not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(col)  # then each distinct value is converted once here too
    values = np.array([v or "" for v in col.dictionary.to_pylist()] + [""], dtype=object)  # the last: for nulls
    indices = col.indices
    if indices.null_count:
        indices = indices.fill_null(arrow_scalar(len(values) - 1, numpy_dtype(indices.type)))
    try:
        return values[numpy_view(indices)]
    except IndexError:  # damaged dictionary indices (a corrupt file): numpy checks the bounds
        raise DataError(f"column '{name}' is damaged: its dictionary-encoded values point outside their "
                        f"dictionary of {len(values) - 1} strings") from None


#: onnxruntime's StringNormalizer when the C library cannot construct the locale the graph names
LOCALE_FAILURE = re.compile(r"Failed to construct locale with name:\s*([^\s:]+)")


def missing_locale_message(path: Path, name: str) -> str:
    """The one error for a text model on a machine without its lowercasing locale (``kind: text`` inputs)."""
    return (f"{path}: its text inputs are lowercased in the graph with the locale '{name}', which this machine's C "
            f"library does not have (the process's LANG/LC_ALL do not matter: the locale must be installed). Install "
            f"it where the model is scored: glibc 2.35 or later has C.UTF-8 built in (Debian 12, Ubuntu 22.04 and "
            f"later); older Debian/Ubuntu: apt-get install locales; RHEL/Fedora: glibc-minimal-langpack; Alpine: "
            f"musl-locales; or set LOCPATH to a directory holding the compiled locale (e.g. a copy of "
            f"/usr/lib/locale/C.utf8 from such a system, as {name})")


class Scorer:
    """An onnxruntime session over a recmtl ONNX export."""

    def __init__(self, model_path: str | Path, threads: int | None = None, spin: bool = False) -> None:
        """``spin``: onnxruntime's worker threads busy-wait between the operators of one run (they stop when the
        run ends): a few per cent faster on cores nobody else uses, much slower when other processes compete
        for them, hence off by default."""
        import onnxruntime as ort
        path = Path(model_path)
        if not path.is_file():
            raise DataError(f"no such model file: {path}")
        check_self_contained(path)  # before onnxruntime could read another file the model names
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        opts.add_session_config_entry("session.force_spinning_stop", "1")  # no spinning between runs
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises InvalidProtobuf, Fail, ... for files it cannot load
            missing = LOCALE_FAILURE.search(str(exc))
            if missing:
                raise DataError(missing_locale_message(path, missing.group(1))) from None
            raise DataError(f"{path} is not an ONNX model onnxruntime can load: {exc}") from None
        # the metadata through onnxruntime: scoring needs neither the onnx package nor a second parse
        self.meta = schema_from_metadata(self.session.get_modelmeta().custom_metadata_map, path)
        self.inputs = [ModelInput.from_metadata(i) for i in self.meta["inputs"]]
        self.tasks = [t["name"] for t in self.meta["tasks"]]
        #: string inputs (one value per row), read dictionary-encoded from Parquet
        self.string_columns = [i.name for i in self.inputs if i.dtype == "string" and not i.is_sequence and not i.is_image
                               and i.kind != "text"]  # free text: few repeated values, read as plain strings
        #: K for tasks scored as K probabilities (multiclass, multilabel), None for one score per row
        self.widths: dict[str, int | None] = {t["name"]: t.get("width") for t in self.meta["tasks"]}

    def shrink_arena_options(self) -> Any:
        """onnxruntime run options that give the CPU arena's unused memory back after the run (for the last
        call of a large request: the arena otherwise keeps the peak of every burst)."""
        import onnxruntime as ort
        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        return options

    def check_columns(self, schema: pa.Schema) -> None:
        """Fail before any output when a needed column is missing or of the wrong kind."""
        empty = pa.Table.from_batches([], schema=schema) if len(schema) else pa.table({})
        to_feeds(empty, self.inputs)

    def score(self, batch: pa.RecordBatch | pa.Table, keep: Sequence[str] = (), batch_size: int = DEFAULT_BATCH_SIZE,
              feeds: dict[str, np.ndarray] | None = None) -> pa.RecordBatch:
        """Scores for every row of ``batch`` (converted once, run in slices of ``batch_size`` rows)."""
        feeds = to_feeds(batch, self.inputs) if feeds is None else feeds
        return self.assemble(batch, self.run(feeds, batch.num_rows, batch_size), keep)

    def run(self, feeds: dict[str, np.ndarray], n: int, batch_size: int = DEFAULT_BATCH_SIZE) -> list[list[np.ndarray]]:
        """onnxruntime on ``n`` rows of ``feeds`` in slices of ``batch_size``: per task, the slices' outputs."""
        parts: list[list[np.ndarray]] = [[] for _ in self.tasks]
        for start in range(0, n, batch_size):
            chunk = {k: v[start:start + batch_size] for k, v in feeds.items()}
            for i, out in enumerate(self.session.run(self.tasks, chunk)):
                parts[i].append(out.reshape(len(out), -1) if self.widths[self.tasks[i]] else out.reshape(-1))
        return parts

    def assemble(self, batch: pa.RecordBatch | pa.Table, parts: list[list[np.ndarray]],
                 keep: Sequence[str] = ()) -> pa.RecordBatch:
        """The scored batch: the ``keep`` columns of ``batch``, then one column per task from :meth:`run`'s ``parts``."""
        columns = []
        keep = list(dict.fromkeys(keep))
        for k in keep:
            if k not in batch.schema.names:
                raise DataError(f"--keep column '{k}' not found{close_matches(k, batch.schema.names)}")
            col = batch.column(k)
            columns.append(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
        for t, p in zip(self.tasks, parts):
            width = self.widths[t]
            values = np.concatenate(p) if p else np.zeros((0, width) if width else 0, np.float32)
            columns.append(pa.FixedSizeListArray.from_arrays(arrow_view(values.reshape(-1)), width) if width
                           else arrow_view(values))
        return pa.RecordBatch.from_arrays(columns, names=[*kept_names(keep, self.tasks), *self.tasks])

    def output_type(self, task: str) -> pa.DataType:
        """float32, or ``fixed_size_list<float32>[K]`` for a task scored as K probabilities."""
        width = self.widths[task]
        return pa.list_(pa.float32(), width) if width else pa.float32()


# ---- for scoring jobs in other engines (examples/cluster: Spark, Ray) ----
def check_job_paths(model: str | os.PathLike, input_path: str, output: str) -> None:
    """One clear error, before any engine starts, for a missing model file or input folder or an existing
    output (local paths only: a URL such as ``s3://`` is the engine's to check)."""
    if not Path(model).is_file():
        raise DataError(f"no such model file: {model} (export one with `recmtl export RUN_DIR -o model.onnx`)")
    if "://" not in str(input_path) and not Path(input_path).exists():
        raise DataError(f"no such input file or folder: {input_path} (a Parquet file or a folder of them)")
    if "://" not in str(output) and Path(output).exists():
        raise DataError(f"output {output} already exists: remove it or name another folder")


@contextlib.contextmanager
def staged_output(output: str) -> Iterator[str]:
    """Where to write ``output``: for a local path, a new folder beside it, renamed to ``output`` once the
    engine has written everything (deleted on an error), so a failed job leaves no partial output."""
    if "://" in str(output):
        yield str(output)
        return
    target = Path(output).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield str(tmp / "out")
        os.replace(tmp / "out", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def score_batches(model_path: str | Path, batches: Iterable[pa.RecordBatch], keep: Sequence[str] = (),
                  batch_size: int = DEFAULT_BATCH_SIZE, threads: int | None = None,
                  spin: bool = False) -> Iterator[pa.RecordBatch]:
    """Score Arrow record batches with an exported model; yields one scored batch per input batch, in
    input order, with the ``keep`` columns first (named as :func:`kept_names` says) and one column per task:
    float32, or a ``fixed_size_list<float32>[K]`` of class/attribute probabilities for multiclass/multilabel
    tasks.
    ``threads`` and ``spin``: see ``Scorer``."""
    scorer = Scorer(model_path, threads, spin)
    for batch in batches:
        yield scorer.score(batch, keep, batch_size)


# ---- Parquet -> Parquet -----------------------------------------------------------------------------
def _prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``items`` in a background thread, ``depth`` items ahead (pyarrow and onnxruntime release the GIL)."""
    import queue
    import threading
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as exc:  # re-raised in the consumer
            q.put(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


_WORKER: dict[str, Any] = {}


def _worker_init(model_path: str, threads: int | None, spin: bool, parent: int | None = None) -> None:
    if parent is not None:
        _exit_with(parent)
    _WORKER["scorer"] = Scorer(model_path, threads, spin)


def _exit_with(parent: int) -> None:
    """End this worker process when ``parent`` is gone (``kill -9`` of ``recmtl score`` must not leave workers)."""
    import os
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="recmtl-parent-watch").start()


def _worker_score(path: str, row_group: int, keep: Sequence[str], batch_size: int, read_rows: int) -> pa.Table:
    from recmtl.data.parquet import open_parquet
    scorer: Scorer = _WORKER["scorer"]
    pf = open_parquet(Path(path), scorer.string_columns)
    cols = list(dict.fromkeys([*[i.name for i in scorer.inputs], *keep]))
    try:
        batches = [scorer.score(b, keep, batch_size) for b in pf.iter_batches(read_rows, row_groups=[row_group], columns=cols)]
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"failed reading {path} (row group {row_group}): {exc}") from None
    return pa.Table.from_batches(batches) if batches else None


def _widens_to(typ: pa.DataType, target: pa.DataType) -> bool:
    """Whether a column of ``typ`` is read as ``target`` by a ParquetSource over several files (int32 -> int64)."""
    try:
        return pa.unify_schemas([pa.schema([("c", target)]), pa.schema([("c", typ)])],
                                promote_options="permissive").field("c").type == target
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False


def score_parquet(model_path: str | Path, input_spec: str, output: str | Path, keep: Sequence[str] = (),
                  batch_size: int = DEFAULT_BATCH_SIZE, threads: int | None = None, workers: int = 1,
                  read_rows: int = 65_536, progress: bool = True, spin: bool = False) -> int:
    """Score a Parquet file/folder/glob into one Parquet file (atomic, input row order); returns rows."""
    import pyarrow.parquet as pq

    from recmtl.data.parquet import ParquetSource
    from recmtl.files import atomic_path
    from recmtl.progress import progress as progress_bar

    scorer = Scorer(model_path, threads if workers <= 1 else 1, spin)
    keep = list(dict.fromkeys(keep))
    source = ParquetSource(input_spec, read_dictionary=scorer.string_columns)
    for path, pf in zip(source.paths, source.files):  # every file, before anything is written
        schema = pf.schema_arrow
        try:
            scorer.check_columns(schema)
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None
        ParquetSource.require(keep, schema, path)
        for k in keep:
            first, this = source.schema.field(k).type, schema.field(k).type
            if this != first and not _widens_to(this, first):  # ParquetSource reads int32 files as int64, ...
                raise DataError(f"--keep column '{k}' is {this} in {path} but {first} in {source.paths[0]}: "
                                "a kept column must have one type in every file")

    def kept(field: pa.Field) -> pa.Field:  # a string input read dictionary-encoded is written back as strings
        read_as_dictionary = field.name in scorer.string_columns and pa.types.is_dictionary(field.type)
        return field.with_type(field.type.value_type) if read_as_dictionary else field
    names = kept_names(keep, scorer.tasks)
    for k, name in zip(keep, names):
        if name != k:
            print(f"note: --keep column '{k}' is written as '{name}' (the scores of task '{k}' are named '{k}')",
                  file=sys.stderr)
    out_schema = pa.schema([kept(source.schema.field(k)).with_name(name) for k, name in zip(keep, names)]
                           + [pa.field(t, scorer.output_type(t)) for t in scorer.tasks])
    cols = list(dict.fromkeys([*[i.name for i in scorer.inputs], *keep]))
    rows = 0
    expected = source.num_rows
    # scores are all distinct: no dictionary encoding (building one and giving up cost more than the write)
    with atomic_path(output) as tmp, pq.ParquetWriter(tmp, out_schema, use_dictionary=names) as writer, \
            progress_bar(source.num_rows, "score", progress) as bar:
        def write(table: pa.Table | pa.RecordBatch | None) -> None:
            nonlocal rows
            if table is None or table.num_rows == 0:
                return
            table = table if isinstance(table, pa.Table) else pa.Table.from_batches([table])
            writer.write_table(table.cast(out_schema))
            rows += table.num_rows
            bar.update(table.num_rows)

        if workers <= 1:
            # reading and Arrow -> numpy conversion of the next batch overlap onnxruntime's run, unless its threads
            # spin: a reader thread beside spinning workers slows them more than reading in turn costs. Building and
            # writing the output stay here: under 1 % of the time, and a writer thread measured slower (RESULTS.md)
            converted = ((b, to_feeds(b, scorer.inputs)) for b in source.batches(read_rows=read_rows, columns=cols))
            for batch, feeds in (converted if spin else _prefetch(converted)):
                write(scorer.score(batch, keep, batch_size, feeds))
        else:
            import concurrent.futures as cf
            import multiprocessing as mp
            import os
            units = [(str(source.paths[i]), rg) for i, rg in source.units]
            ctx = mp.get_context("spawn")
            with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                        initargs=(str(model_path), threads or 1, spin, os.getpid())) as pool:
                pending: list[cf.Future] = []
                for unit in units:  # a bounded window of row groups in flight, written in order
                    pending.append(pool.submit(_worker_score, *unit, list(keep), batch_size, read_rows))
                    if len(pending) >= 2 * workers:
                        write(pending.pop(0).result())
                for fut in pending:
                    write(fut.result())
        if rows != expected:  # pyarrow reads a damaged column chunk short without a word
            raise DataError(f"read {rows:,} rows from {input_spec} but its Parquet footers declare {expected:,}: "
                            "a damaged file (nothing was written)")
    return rows
