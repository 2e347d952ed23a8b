"""Scoring throughput inside Spark (local[N], mapInArrow) and Ray Data (num_cpus=N) with the recipes in
examples/cluster/, against `recmtl score`, on the same rows and the same cores.

Prepares once (in --work-dir): `recmtl datagen funnel` (200k train rows, --rows test rows), `recmtl init` (MMoE,
conversion=esmm), `recmtl train` with 1 epoch, `recmtl export`; the test split is rewritten as a folder of
--files Parquet files so every engine can read it in parallel. Then --rounds interleaved rounds, each running
every engine once in a fresh process: `recmtl score FOLDER` (default threads), the Spark recipe in local[N]
(one onnxruntime thread per task) and the Ray recipe on a local cluster of N CPUs (one actor per CPU, one
thread each). Reported per engine: the median rows/s of the scoring job (read + score + write, the engine
already started) and the median engine start-up time; all are checked to write every row.

    python benchmarks/speed/bench_cluster_score.py --rows 2000000 --rounds 2 --work-dir /tmp/bcluster
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]  # benchmarks/speed/ -> the repository
RECMTL = str(Path(sys.executable).with_name("recmtl"))
ENGINES = ("recmtl score", "spark", "ray")


def sh(*args: str) -> None:
    subprocess.run([RECMTL, *args], check=True, stdout=subprocess.DEVNULL)


def prepare(work: Path, rows: int, files: int) -> tuple[Path, Path]:
    """The model and the folder of test files (made once, reused by later runs on the same --work-dir)."""
    data, run, model, folder = work / "data", work / "run", work / "model.onnx", work / "impressions"
    if not (data / "test.parquet").exists():
        n_train = 200_000
        total = n_train + rows + 20_000
        sh("datagen", "funnel", str(data), "--rows", str(total), "--valid-fraction", str(20_000 / total),
           "--test-fraction", str(rows / total))
    if not (run / "metrics.json").exists():
        sh("init", str(data / "train.parquet"), "--task", "click", "--task", "conversion", "--head", "conversion=esmm",
           "--validation", str(data / "valid.parquet"), "--tower", "mmoe", "-o", str(work / "config.yaml"))
        sh("train", str(work / "config.yaml"), "--out", str(run), "--set", "train.epochs=1", "--set", "train.progress=false")
    if not model.exists():
        sh("export", str(run), "-o", str(model))
    if not folder.exists():
        table = pq.read_table(data / "test.parquet")
        tmp = work / ".impressions.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        step = -(-table.num_rows // files)
        for i in range(files):
            pq.write_table(table.slice(i * step, step), tmp / f"part-{i:03d}.parquet")
        tmp.rename(folder)
    return model, folder


def child(engine: str, model: str, folder: str, out: str, cores: int) -> dict:
    """One measurement in this (fresh) process: start the engine, then time the scoring job."""
    sys.path.insert(0, str(REPO / "examples" / "cluster"))
    t0 = time.perf_counter()
    if engine == "spark":
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        from pyspark.sql import SparkSession
        from spark_score import score_spark
        spark = (SparkSession.builder.master(f"local[{cores}]").appName("bench")
                 .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
                 .config("spark.driver.memory", "2g").getOrCreate())
        spark.sparkContext.setLogLevel("ERROR")
        start = time.perf_counter() - t0
        t = time.perf_counter()
        score_spark(spark, model, folder, out, keep=["user_id"])
        job = time.perf_counter() - t
        spark.stop()
    elif engine == "ray":
        import ray
        from ray_score import score_ray
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        start = time.perf_counter() - t0
        t = time.perf_counter()
        score_ray(model, folder, out, keep=["user_id"])
        job = time.perf_counter() - t
        ray.shutdown()
    else:
        start = 0.0
        t = time.perf_counter()
        subprocess.run([RECMTL, "score", model, folder, "-o", out, "--keep", "user_id", "--no-progress"], check=True)
        job = time.perf_counter() - t
    return {"engine": engine, "start_s": start, "job_s": job, "rows": pq.read_metadata(out).num_rows
            if Path(out).is_file() else pq.read_table(out, columns=["user_id"]).num_rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--files", type=int, default=8, help="Parquet files the test rows are written as")
    ap.add_argument("--cores", type=int, default=2, help="local[N] / Ray num_cpus=N")
    ap.add_argument("--work-dir", type=Path)
    ap.add_argument("--child", nargs=4, metavar=("ENGINE", "MODEL", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args.cores)), flush=True)
        return
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="recmtl-bench-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    model, folder = prepare(work, args.rows, args.files)
    expected = pq.ParquetDataset(folder).read(columns=["user_id"]).num_rows
    results: dict[str, list[dict]] = {e: [] for e in ENGINES}
    for r in range(args.rounds):
        for engine in ENGINES:
            target = work / ("out_score.parquet" if engine == "recmtl score" else f"out_{engine}")
            shutil.rmtree(target, ignore_errors=True)  # the recipes refuse an existing output
            target.unlink(missing_ok=True)
            proc = subprocess.run([sys.executable, __file__, "--cores", str(args.cores), "--child", engine, str(model),
                                   str(folder), str(target)], capture_output=True, text=True)
            line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{engine} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            res = json.loads(line[-1][7:])
            assert res["rows"] == expected, (engine, res["rows"], expected)
            res["load"] = os.getloadavg()[0]
            results[engine].append(res)
            print(f"round {r + 1} {engine:>12}: {expected / res['job_s']:>10,.0f} rows/s  job {res['job_s']:.1f} s  "
                  f"start {res['start_s']:.1f} s  load {res['load']:.1f}", flush=True)
    print(f"\n{expected:,} rows, {args.files} files, {args.cores} cores, rounds {args.rounds} (medians)")
    print("| engine | rows/s (job) | job s | start-up s | runs (rows/s) |\n|---|---|---|---|---|")
    for engine, runs in results.items():
        rates = [expected / x["job_s"] for x in runs]
        print(f"| {engine} | {statistics.median(rates):,.0f} | {statistics.median(x['job_s'] for x in runs):.1f} | "
              f"{statistics.median(x['start_s'] for x in runs):.1f} | {', '.join(f'{v:,.0f}' for v in rates)} |")


if __name__ == "__main__":
    main()
