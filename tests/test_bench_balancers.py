"""benchmarks/quality/balancers.py: the paired differences and relative step times it reports, and a tiny run."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "balancers.py"
_spec = importlib.util.spec_from_file_location("balancers_bench", BENCH)
bench = importlib.util.module_from_spec(_spec)
sys.path.insert(0, str(BENCH.parent))
_spec.loader.exec_module(bench)


def run(balancer: str, seed: int, y1: float, y2: float, ms: float) -> dict:
    return {"dataset": "synthetic", "tower": "mmoe", "seed": seed, "balancer": balancer, "ms_per_step": ms,
            "test": {"y1": {"rmse": y1}, "y2": {"rmse": y2}}}


def test_paired_differences_and_relative_times():
    results = [run("fixed", 1, 0.30, 0.40, 10.0), run("pcgrad", 1, 0.28, 0.41, 15.0),
               run("fixed", 2, 0.50, 0.60, 20.0), run("pcgrad", 2, 0.46, 0.61, 40.0),
               {"timing": True, "dataset": "synthetic", "tower": "mmoe", "ms": {"fixed": 4.0, "pcgrad": 7.0}}]
    s = bench.summarise(results)[("synthetic", "mmoe", "pcgrad")]
    assert s["delta"]["y1"] == pytest.approx([-0.02, -0.04]) and s["delta"]["y2"] == pytest.approx([0.01, 0.01])
    assert s["rel"] == pytest.approx([1.5, 2.0]) and s["step"] == pytest.approx(1.75)
    row = next(line for line in bench.table(results, "synthetic").splitlines() if line.startswith("| pcgrad"))
    assert "-0.0300 ± 0.0141" in row and "+0.0100 ± 0.0000" in row and "1.75×" in row and "1.75 ± 0.35×" in row


def test_a_failed_run_is_reported_not_dropped():
    results = [run("fixed", 1, 0.3, 0.4, 10.0),
               {"dataset": "synthetic", "tower": "mmoe", "seed": 1, "balancer": "broken", "error": "ValueError: x"}]
    assert "| broken | mmoe | failed: ValueError: x |" in bench.table(results, "synthetic")


@pytest.mark.slow
def test_tiny_run(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--datasets", "synthetic", "--towers", "mmoe", "--seeds", "1",
                           "--balancers", "fixed,mgda", "--synthetic-rows", "2000", "--synthetic-epochs", "1",
                           "--timing-steps", "1", "--timing-rounds", "2", "--work-dir", str(tmp_path / "w"),
                           "--json", str(out), "--plot", str(tmp_path / "p.png")],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert {r["balancer"] for r in rows if not r.get("timing")} == {"fixed", "mgda"}
    assert [set(r["ms"]) for r in rows if r.get("timing")] == [{"fixed", "mgda"}]
    assert "| mgda | mmoe |" in proc.stdout and (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.slow
def test_unlabelled_batches_tiny_run(tmp_path):
    script = BENCH.with_name("unlabelled_batches.py")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(script), "--balancers", "fixed,imtl", "--rows", "2000", "--epochs", "1",
                           "--labelled", "0.05", "--batch-size", "16", "--work-dir", str(tmp_path / "w"),
                           "--json", str(out)], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["balancer"] for r in rows] == ["fixed", "imtl"]
    assert all(0 < r["auc"]["conversion"] < 1 for r in rows) and "| imtl | 1 |" in proc.stdout
    assert "44% of the training batches are expected to hold no conversion label" in proc.stdout
