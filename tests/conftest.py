from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recmtl.cli import main
from recmtl.data.synthetic import funnel

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
RECMTL = str(Path(sys.executable).with_name("recmtl"))


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"exit {self.code}\nstdout:\n{self.out}\nstderr:\n{self.err}"


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: cli("train", ...) -> CliResult(code, stdout, stderr)."""
    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)
    return run


def run_subprocess(*args: str, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([RECMTL, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, **kw)


@pytest.fixture(scope="session")
def funnel_dir(tmp_path_factory) -> Path:
    """A small funnel data set (20k rows) shared by the tests; treat as read-only."""
    out = tmp_path_factory.mktemp("funnel")
    funnel(out, rows=20000, seed=3, categorical=6, dense=4, cardinality=50)
    return out


def write_config(path: Path, data_dir: Path, **overrides) -> Path:
    """A small, fast config over ``data_dir`` (funnel layout); ``overrides`` replace top-level sections."""
    cfg = {
        "seed": 1,
        "data": {"train": str(data_dir / "train.parquet"), "validation": str(data_dir / "valid.parquet"),
                 "shuffle_buffer": 4096, "read_rows": 2048},
        "features": [{"name": n, "kind": "categorical"} for n in ["user_id", "item_id", "c03", "c04", "c05", "c06"]]
        + [{"name": f"d0{i}", "kind": "dense"} for i in range(1, 5)],
        "tasks": [{"name": "click", "head": "binary"},
                  {"name": "conversion", "head": "esmm", "params": {"ctr_task": "click"}}],
        "encoders": {"categorical": {"name": "embedding", "dim": 8}},
        "tower": {"name": "mmoe", "num_experts": 2, "expert_units": [32], "task_units": [16]},
        "optimizer": {"lr": 0.005},
        "train": {"batch_size": 512, "epochs": 2, "progress": False},
    }
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg))
    return path


#: small widths for every built-in tower (tests/test_towers.py and tests/test_precision.py
#: fail for a new tower until it is added here)
SMALL_TOWERS = {
    "shared_bottom": {"bottom_units": [16], "task_units": [8]},
    "mmoe": {"num_experts": 2, "expert_units": [16], "task_units": [8]},
    "omoe": {"num_experts": 2, "expert_units": [16], "task_units": [8]},
    "cgc": {"expert_units": [16], "task_units": [8]},
    "ple": {"num_levels": 2, "expert_units": [16], "task_units": [8]},
    "hmoe": {"num_groups": 2, "experts_per_group": 2, "expert_units": [16], "task_units": [8]},
    "dselect_k": {"num_experts": 4, "k": 2, "entropy_reg": 0.01, "expert_units": [16], "task_units": [8]},
    "stem": {"embedding_dim": 4, "expert_units": [16], "task_units": [8]},
    "cross_stitch": {"units": [16, 8]},
    "soft_sharing": {"units": [16, 8], "penalty": 0.01},
    "aitm": {"units": [16, 8], "calibrator_weight": 0.1},
    "pepnet": {"gate_features": ["user_id", "item_id"], "task_units": [16, 8]},
}
