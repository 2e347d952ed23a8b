"""Score a Parquet folder with an exported recmtl model inside Spark: ``DataFrame.mapInArrow`` over
``recmtl.serving.score.score_batches``, a Parquet folder in, a Parquet folder out (one part file per task).

    python examples/cluster/spark_score.py MODEL.onnx INPUT OUTPUT [--keep COL ...] [--master local[2]]
        [--batch-size N] [--threads N]

Every executor needs the packages recmtl scores with (``pip install recmtl``: onnxruntime, pyarrow, numpy);
the model file is sent to the executors with ``SparkContext.addFile`` (see ``ship``), so it only has to exist on
the driver.
The output has the ``--keep`` columns and one float score column per task (an array of K floats for a
multiclass or multilabel task), as ``recmtl score`` writes, in no particular row order: keep an id to join on.
Tested in tests/test_cluster_recipes.py (``pytest -m cluster``).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from recmtl.errors import DataError, RecmtlError
from recmtl.serving.score import DEFAULT_BATCH_SIZE, Scorer, check_job_paths, kept_names, score_batches, staged_output


def ship(spark, model: str | os.PathLike) -> str:
    """Send ``model`` to the executors (``SparkContext.addFile``) under a name made from its content, so that two
    models both called ``model.onnx`` can be scored in one session; returns the name for ``SparkFiles.get``.
    The copy stays in the temporary folder (``$TMPDIR/recmtl-spark-models/``) for the next job."""
    digest = hashlib.sha256(Path(model).read_bytes()).hexdigest()[:16]
    name = f"{digest}-{Path(model).name}"
    copy = Path(tempfile.gettempdir()) / "recmtl-spark-models" / name  # one path per content: Spark adds it once
    if not copy.is_file():
        copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = copy.with_name(f".{name}.{os.getpid()}.tmp")
        shutil.copyfile(model, tmp)
        os.replace(tmp, copy)
    spark.sparkContext.addFile(str(copy))
    return name


def score_spark(spark, model: str | os.PathLike, input_path: str, output: str, keep: Sequence[str] = (),
                batch_size: int = DEFAULT_BATCH_SIZE, threads: int = 1) -> None:
    """Score the Parquet ``input_path`` (file, folder or URL) with ``model`` on ``spark`` (a SparkSession) and
    write the Parquet folder ``output`` (all or nothing for a local path). ``threads``: onnxruntime threads per
    Spark task (Spark runs one task per core already)."""
    from pyspark import SparkFiles
    from pyspark.sql.pandas.types import to_arrow_schema
    from pyspark.sql.types import ArrayType, FloatType, StructField, StructType

    check_job_paths(model, input_path, output)
    keep = list(dict.fromkeys(keep))
    scorer = Scorer(model)  # on the driver: the tasks and score types for the output schema, and the column checks
    df = spark.read.parquet(str(input_path))
    try:  # the model's input columns, by name and kind, with recmtl score's messages
        scorer.check_columns(to_arrow_schema(df.schema))
    except DataError as exc:
        raise DataError(f"{input_path}: {exc}") from None
    missing = [k for k in keep if k not in df.columns]
    if missing:
        raise DataError(f"--keep column '{missing[0]}' not found in {input_path}; it has: {', '.join(df.columns)}")
    schema = StructType(
        [StructField(name, df.schema[k].dataType, df.schema[k].nullable) for k, name in zip(keep, kept_names(keep, scorer.tasks))]
        + [StructField(t, ArrayType(FloatType(), False) if scorer.widths[t] else FloatType(), False) for t in scorer.tasks])
    needed = list(dict.fromkeys([*[i.name for i in scorer.inputs], *keep]))
    name = ship(spark, model)
    lists = [t for t in scorer.tasks if scorer.widths[t]]

    # defined here, not at module level: cloudpickle then sends the function itself to the executors, which
    # need not be able to import this file
    def score_partition(batches):
        import pyarrow as pa
        for scored in score_batches(SparkFiles.get(name), batches, keep=keep, batch_size=batch_size, threads=threads):
            for t in lists:  # Spark's arrays are Arrow lists, not fixed-size lists
                i = scored.schema.get_field_index(t)
                scored = scored.set_column(i, t, scored.column(i).cast(pa.list_(pa.float32())))
            yield scored

    with staged_output(output) as target:
        df.select(*needed).mapInArrow(score_partition, schema).write.parquet(target)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the exported model (recmtl export)")
    parser.add_argument("input", help="a Parquet file or folder (or a URL Spark reads)")
    parser.add_argument("output", help="the Parquet folder to write (must not exist)")
    parser.add_argument("--keep", action="append", default=[], help="a column to copy beside the scores (repeatable)")
    parser.add_argument("--master", default="local[2]", help="Spark master URL (default: local[2])")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per onnxruntime call")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per Spark task (default: 1)")
    args = parser.parse_args(argv)
    try:
        check_job_paths(args.model, args.input, args.output)  # before the JVM starts
        # the executors' Python: this one (with recmtl installed), unless PYSPARK_PYTHON says otherwise
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        from pyspark.sql import SparkSession
        spark = (SparkSession.builder.master(args.master).appName("recmtl-score")
                 .config("spark.ui.enabled", "false").getOrCreate())
        try:
            score_spark(spark, args.model, args.input, args.output, args.keep, args.batch_size, args.threads)
        finally:
            spark.stop()
    except RecmtlError as exc:
        print(f"spark_score: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
