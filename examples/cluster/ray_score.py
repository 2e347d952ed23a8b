"""Score a Parquet folder with an exported recmtl model on Ray Data: ``read_parquet`` -> ``map_batches`` (an actor
per CPU holding one ``recmtl.serving.score.Scorer``, ``batch_format="pyarrow"``) -> ``write_parquet``.

    python examples/cluster/ray_score.py MODEL.onnx INPUT OUTPUT [--keep COL ...] [--address ADDRESS]
        [--num-cpus N] [--batch-size N] [--threads N]

Every Ray worker needs the packages recmtl scores with (``pip install recmtl``: onnxruntime, pyarrow, numpy)
and must be able to read the model file (a shared or local path on each node). The output has the ``--keep``
columns and one float score column per task (K floats per row for a multiclass or multilabel task), as
``recmtl score`` writes, in no particular row order: keep an id to join on.
Tested in tests/test_cluster_recipes.py (``pytest -m cluster``).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from recmtl.errors import DataError, RecmtlError
from recmtl.serving.score import DEFAULT_BATCH_SIZE, Scorer, check_job_paths, staged_output

#: rows per map_batches call, as `recmtl score` reads (each call is scored in slices of --batch-size rows)
ROWS_PER_CALL = 65_536


def score_ray(model: str | os.PathLike, input_path: str, output: str, keep: Sequence[str] = (),
              batch_size: int = DEFAULT_BATCH_SIZE, threads: int = 1, concurrency: int | None = None) -> None:
    """Score the Parquet ``input_path`` (file, folder or URL) with ``model`` on the running Ray cluster (``ray.init``
    first) and write the Parquet folder ``output`` (all or nothing for a local path). ``concurrency``: scoring
    actors (default: one per CPU of the cluster), each with ``threads`` onnxruntime threads."""
    import ray

    check_job_paths(model, input_path, output)
    keep = list(dict.fromkeys(keep))
    model = str(Path(model).resolve())
    ds = ray.data.read_parquet(str(input_path))
    scorer = Scorer(model)  # on the driver: the column checks, with recmtl score's messages, before any task runs
    try:
        scorer.check_columns(ds.schema(fetch_if_missing=True).base_schema)
    except DataError as exc:
        raise DataError(f"{input_path}: {exc}") from None
    names = ds.schema().names
    missing = [k for k in keep if k not in names]
    if missing:
        raise DataError(f"--keep column '{missing[0]}' not found in {input_path}; it has: {', '.join(names)}")
    needed = list(dict.fromkeys([*[i.name for i in scorer.inputs], *keep]))

    # defined here, not at module level: Ray then sends the class itself to its workers, which need not be
    # able to import this file
    class Score:
        def __init__(self) -> None:
            self.scorer = Scorer(model, threads)  # once per actor, not per batch

        def __call__(self, table):
            import pyarrow as pa
            return pa.Table.from_batches([self.scorer.score(table, keep, batch_size)])

    workers = concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)))
    # half a CPU per actor: with a whole one, N actors on N CPUs leave none to Ray Data's read and write
    # tasks and the job waits for ever (seen on 2 CPUs); the actor still runs `threads` threads
    scored = ds.select_columns(needed).map_batches(Score, batch_format="pyarrow", batch_size=ROWS_PER_CALL,
                                                   compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=0.5)
    with staged_output(output) as target:
        scored.write_parquet(target)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the exported model (recmtl export)")
    parser.add_argument("input", help="a Parquet file or folder (or a URL Ray reads)")
    parser.add_argument("output", help="the Parquet folder to write (must not exist)")
    parser.add_argument("--keep", action="append", default=[], help="a column to copy beside the scores (repeatable)")
    parser.add_argument("--address", default=None, help="a running Ray cluster (default: start a local one)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: all)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per onnxruntime call")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per scoring actor (default: 1)")
    args = parser.parse_args(argv)
    try:
        check_job_paths(args.model, args.input, args.output)  # before Ray starts
        import ray
        ray.init(args.address, num_cpus=None if args.address else args.num_cpus, include_dashboard=False)
        try:
            score_ray(args.model, args.input, args.output, args.keep, args.batch_size, args.threads)
        finally:
            ray.shutdown()
    except RecmtlError as exc:
        print(f"ray_score: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
