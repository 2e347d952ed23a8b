"""docs/plugins.md cannot drift from the code: its hook table matches hookspecs, its tutorial runs."""
from __future__ import annotations

import re
from pathlib import Path

from recmtl import hookspecs
from recmtl.registry import load_registry
from recmtl.testing import check_tower

DOC = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_hook_table_matches_hookspecs():
    documented = set(re.findall(r"^\| `(recmtl_\w+)\(", DOC, flags=re.M))
    declared = {n for n in dir(hookspecs) if n.startswith("recmtl_")}
    assert documented == declared


def test_tutorial_tower_registers_and_passes_contract(tmp_path):
    code = re.search(r"```python\n# my_tower.py\n(.*?)```", DOC, flags=re.S).group(1)
    path = tmp_path / "my_tower.py"
    path.write_text(code)
    reg = load_registry([str(path)])
    check_tower(reg.get("tower", "per_task_linear"), width=8)


def test_readme_starts_with_the_two_commands():
    head = README[:600]
    assert "make demo" in head and "make test" in head
    assert "docs/plugins.md" in README
