"""The package layout survives a wheel: built from the source tree, installed without -e, every built-in plugin
is found through its entry point and imported from the installed copy, not from the checkout."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_lists_every_builtin(tmp_path):
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                        str(REPO)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = dist.glob("recmtl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("recmtl/serving/wire.py", "recmtl/schema/fit.py", "recmtl/training/loop.py", "recmtl/export/graph.py",
                   "recmtl/data/parquet.py", "recmtl_plugins/towers/mmoe.py", "recmtl_plugins/balancers/pcgrad.py"):
        assert module in names, f"{module} is missing from {wheel.name}"
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/")) for n in names)

    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import recmtl, recmtl_plugins.towers.mmoe as m; print(recmtl.__file__); print(m.__file__); "
            "print(recmtl.__version__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    recmtl_file, plugin_file, version = r.stdout.split()
    assert Path(recmtl_file).is_relative_to(site) and Path(plugin_file).is_relative_to(site), r.stdout
    assert version == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]

    r = subprocess.run([sys.executable, "-m", "recmtl.cli", "plugins"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    listed = {tuple(line.split()[:2]) for line in r.stdout.splitlines()[1:] if line.strip()}
    builtins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["recmtl"]
    names = {name for _, name in listed}
    missing = set(builtins) - names
    assert not missing, f"`recmtl plugins` from the wheel does not list {sorted(missing)}:\n{r.stdout}"
    assert ("tower", "cgc") in listed  # registered by the ple module
