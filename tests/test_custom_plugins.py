"""A user's plugin has the full power of a built-in one: scaffold or third-party package -> pip install ->
listed -> trained -> exported to ONNX -> scored; contract violations are named."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import RECMTL, REPO, write_config
from test_plugins import NEW_TOWER

THIRD_PARTY = REPO / "examples" / "recmtl-independent"


def pip_install_target(package: Path, target: Path) -> dict[str, str]:
    """Install ``package`` (no deps) into ``target``; return an environment that sees it."""
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(package)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return {**os.environ, "PYTHONPATH": str(target)}


def recmtl(env: dict[str, str], *args) -> subprocess.CompletedProcess:
    return subprocess.run([RECMTL, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def train_export_score(env, tmp_path, data_dir, tower: dict) -> None:
    cfg = write_config(tmp_path / "c.yaml", data_dir, tower=tower)
    r = recmtl(env, "train", cfg, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["validation"]["click"]["auc"] > 0.6
    r = recmtl(env, "export", tmp_path / "run", "-o", tmp_path / "m.onnx")
    assert r.returncode == 0 and "parity" in r.stdout, r.stderr[-2000:]
    r = recmtl(env, "score", tmp_path / "m.onnx", data_dir / "test.parquet", "-o", tmp_path / "s.parquet", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert pq.read_metadata(tmp_path / "s.parquet").num_rows == pq.read_metadata(data_dir / "test.parquet").num_rows


@pytest.mark.slow
def test_third_party_package_trains_exports_scores(funnel_dir, tmp_path):
    env = pip_install_target(THIRD_PARTY, tmp_path / "site")
    listed = recmtl(env, "plugins").stdout
    line = next(row for row in listed.splitlines() if row.split()[:2] == ["tower", "independent"])
    assert "recmtl-independent==0.1.0" in line  # registered by its distribution's entry point
    assert "independent" not in recmtl({**os.environ}, "plugins").stdout  # not without the install
    train_export_score(env, tmp_path, funnel_dir, {"name": "independent", "units": [16]})


@pytest.mark.slow
def test_scaffolded_plugin_works_immediately(cli, funnel_dir, tmp_path):
    r = cli("new-plugin", "acme-tower", "--kind", "tower", "--dir", tmp_path)
    assert r.code == 0, r
    pkg = tmp_path / "acme-tower"
    assert (pkg / "pyproject.toml").is_file() and (pkg / "acme_tower" / "plugin.py").is_file()
    env = pip_install_target(pkg, tmp_path / "site")
    assert "acme-tower==0.1.0" in recmtl(env, "plugins").stdout
    # its generated test uses recmtl.testing and passes as written
    t = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg / "tests")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert t.returncode == 0, t.stdout[-2000:]
    train_export_score(env, tmp_path, funnel_dir, {"name": "acme_tower", "hidden": 16})


@pytest.mark.parametrize("kind", ["head", "balancer", "encoder", "interaction", "logger"])
def test_scaffold_kinds_pass_their_contracts(cli, tmp_path, kind):
    assert cli("new-plugin", f"my-{kind}", "--kind", kind, "--dir", tmp_path).code == 0
    t = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / f"my-{kind}" / "tests")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / f"my-{kind}")})
    assert t.returncode == 0, t.stdout[-2000:]


def test_scaffold_errors(cli, tmp_path):
    assert cli("new-plugin", "x", "--kind", "loss", "--dir", tmp_path).err.startswith("recmtl: error: --kind must be one of")
    assert cli("new-plugin", "ok-name", "--dir", tmp_path).code == 0
    assert "already exists" in cli("new-plugin", "ok-name", "--dir", tmp_path).err
    assert "must start with a letter" in cli("new-plugin", "9bad", "--dir", tmp_path).err


@pytest.mark.parametrize("change,needle", [
    ("return {t: torch.relu(self.layers[t](x)) for t in self.task_names}",
     "returned shape (2, 8) for task 'click', but declares output_dims['click'] = 9"),
    ("raise RuntimeError('boom')", "tower 'per_task_linear' failed on a 2-row dry run: RuntimeError('boom')"),
])
def test_contract_violations_are_named(cli, funnel_dir, tmp_path, change, needle):
    code = NEW_TOWER.replace("return {t: self.width for t in self.task_names}", "return {t: self.width + 1 for t in self.task_names}") \
        if "relu" in change else NEW_TOWER.replace("return {t: torch.relu(self.layers[t](x)) for t in self.task_names}", change)
    mod = tmp_path / "bad_tower.py"
    mod.write_text(code)
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, tower={"name": "per_task_linear"})
    r = cli("--plugin", mod, "train", cfg, "--out", tmp_path / "run")
    assert r.code == 2 and needle in r.err, r
