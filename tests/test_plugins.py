"""Plugin discovery: entry points (built-ins included), --plugin modules, duplicates, unknown names."""
from __future__ import annotations

import json
import textwrap

import pytest
from conftest import write_config

from recmtl.errors import PluginError
from recmtl.registry import load_registry

NEW_TOWER = textwrap.dedent('''
    import torch
    from torch import nn
    from recmtl import Tower, hookimpl

    class Linear(Tower):
        """One linear layer per task, no sharing; its first ``dead`` units get a bias far below any
        pre-activation, so they are 0 on every row (and get no gradient: they stay dead)."""
        dead_units_hint = "for per_task_linear, fewer dead units"

        def __init__(self, input_dim, task_names, width: int = 8, dead: int = 0):
            super().__init__(input_dim, task_names)
            self.layers = nn.ModuleDict({t: nn.Linear(input_dim, width) for t in task_names})
            with torch.no_grad():
                for layer in self.layers.values():
                    layer.bias[:dead] = -1e4
            self.width = width
        @property
        def output_dims(self):
            return {t: self.width for t in self.task_names}
        def forward(self, x):
            return {t: torch.relu(self.layers[t](x)) for t in self.task_names}

    @hookimpl
    def recmtl_register_towers():
        return {"per_task_linear": Linear}
''')


def test_builtins_come_from_entry_points():
    reg = load_registry()
    for e in reg.rows():
        assert e.origin.startswith("recmtl=="), e
        assert e.factory.__module__.startswith("recmtl_plugins."), e


def test_plugins_command_lists_kind_name_origin(cli):
    r = cli("plugins")
    assert r.code == 0
    lines = r.out.splitlines()
    assert lines[0].split() == ["kind", "name", "plugin", "origin"]
    assert any(line.split()[:2] == ["tower", "mmoe"] and "recmtl==" in line for line in lines)
    assert any(line.split()[:2] == ["balancer", "uncertainty"] for line in lines)


def test_user_module_plugin_is_listed_and_trains(cli, funnel_dir, tmp_path):
    mod = tmp_path / "my_towers.py"
    mod.write_text(NEW_TOWER)
    r = cli("--plugin", mod, "plugins")
    assert r.code == 0 and "per_task_linear" in r.out
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, tower={"name": "per_task_linear", "width": 4})
    r = cli("--plugin", mod, "train", cfg, "--out", tmp_path / "run")
    assert r.code == 0, r
    # plugins named in the config load too, .py paths relative to the config
    cfg2 = write_config(tmp_path / "c2.yaml", funnel_dir, tower={"name": "per_task_linear"}, plugins=["my_towers.py"])
    assert cli("train", cfg2, "--out", tmp_path / "run2").code == 0
    # ... but a run directory is code: its saved plugins load only when named again
    for args in (("evaluate", tmp_path / "run2", funnel_dir / "test.parquet"),
                 ("train", cfg2, "--out", tmp_path / "run2", "--resume")):
        r = cli(*args)
        assert r.code == 2 and "names plugin code to import" in r.err and f"--plugin {mod}" in r.err, r
    r = cli("--plugin", mod, "evaluate", tmp_path / "run2", funnel_dir / "test.parquet", "--json")
    assert r.code == 0 and json.loads(r.out)["metrics"]["click"]["auc"] > 0.5


def test_duplicate_name_names_both_plugins(tmp_path, monkeypatch):
    mod = tmp_path / "dup_mmoe.py"
    mod.write_text(NEW_TOWER.replace('"per_task_linear"', '"mmoe"'))
    with pytest.raises(PluginError, match=r"duplicate tower name 'mmoe': registered by ") as info:
        load_registry([str(mod)])
    assert "mmoe (recmtl==" in str(info.value) and "dup_mmoe.py (module)" in str(info.value)
    # disabling the built-in resolves it
    reg = load_registry([str(mod)], disabled=["mmoe"])
    assert reg.get("tower", "mmoe").__name__ == "Linear"


def test_unknown_name_lists_available_with_origin():
    with pytest.raises(PluginError) as info:
        load_registry().get("balancer", "uncertanty")
    msg = str(info.value)
    assert "did you mean: uncertainty" in msg and "fixed [fixed]" in msg


def test_broken_plugin_import_is_named(cli, tmp_path):
    bad = tmp_path / "broken_plugin.py"
    bad.write_text("import not_a_real_module_xyz\n")
    r = cli("--plugin", bad, "plugins")
    assert r.code == 2 and "broken_plugin" in r.err and "failed to import" in r.err
    r = cli("--plugin", "no.such.module", "plugins")
    assert r.code == 2 and "plugin module 'no.such.module' not found" in r.err


def test_tower_missing_a_task_is_a_clear_error(cli, funnel_dir, tmp_path):
    mod = tmp_path / "lazy_tower.py"
    mod.write_text(NEW_TOWER.replace("return {t: self.width for t in self.task_names}",
                                     "return {self.task_names[0]: self.width}"))
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, tower={"name": "per_task_linear"})
    r = cli("--plugin", mod, "train", cfg, "--out", tmp_path / "run")
    assert r.code == 2 and "declares no output for task(s) ['conversion']" in r.err
