"""Cost of the dead-unit count in validation: ``predict`` over a trained run's validation split with and without
watching the heads' inputs (``predict(units=True)``, what training's validation pass does), interleaved rounds,
medians; the ratio is the validation pass's slowdown (training steps are not touched).

Usage: python benchmarks/speed/bench_dead_units.py RUN_DIR [--rounds 7] [--threads 1] [--batch-size EVAL_BATCH]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_timing import interleaved_times  # noqa: E402

from recmtl.data.parquet import ParquetSource  # noqa: E402
from recmtl.training.evaluate import load_run, predict  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the run's train.eval_batch_size")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = load_run(args.run_dir, checkpoint="best")
    src = ParquetSource(run.config.resolve(run.config.data.validation), run.config.columns())
    batch = args.batch_size or run.config.train.eval_batch_size
    out = {}

    def once(units: bool) -> None:
        out[units] = predict(run.model, run.schema, src, batch, run.config.data.read_rows, units=units)

    times = interleaved_times({"plain": lambda: once(False), "dead units": lambda: once(True)}, args.rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    same = all(torch.equal(torch.from_numpy(out[False].scores[t]), torch.from_numpy(out[True].scores[t]))
               for t in out[False].scores)
    print(f"{src.num_rows:,} validation rows, batch {batch}, {args.threads} thread(s), {args.rounds} rounds; "
          f"scores identical: {same}; dead units: {out[True].units.dead_units()}")
    print("| validation pass | median (s) | min (s) | vs plain |\n|---|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.3f} | {min(v):.3f} | {med[k] / med['plain']:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
