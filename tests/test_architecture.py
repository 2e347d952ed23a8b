"""The import rules of docs/architecture.md: each wing imported in a fresh interpreter, plugins parsed for what
they import, and every plugin module registered by an entry point."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "recmtl_plugins"

WINGS_OF_RECMTL = ("recmtl.data", "recmtl.schema", "recmtl.training", "recmtl.export", "recmtl.serving")
HEAVY = ("torch", "pandas", "pydantic", "yaml", "sklearn", "scipy", "onnx", "matplotlib")

# modules imported -> (third-party packages and recmtl modules they must not pull in)
RULES = {
    "serving": (["recmtl.serving.app", "recmtl.serving.score", "recmtl.serving.triton", "recmtl.serving.wire",
                 "recmtl.serving.decoders", "recmtl.serving.batcher"],
                ["torch", "pandas", "pydantic", "yaml", "sklearn", "scipy", "onnx", "PIL", "tqdm",
                 "recmtl.config", "recmtl.schema", "recmtl.training", "recmtl.export", "recmtl.contracts",
                 "recmtl.registry", "recmtl.report"]),
    "data used by serving": (["recmtl.data.parquet", "recmtl.data.arrow", "recmtl.data.images", "recmtl.data.sequences"],
                             ["torch", "pandas", "pydantic", "yaml", "sklearn", *WINGS_OF_RECMTL[1:], "recmtl.config"]),
    "data": (["recmtl.data.convert", "recmtl.data.synthetic", "recmtl.data.starter"],
             ["torch", *WINGS_OF_RECMTL[1:]]),
    "schema": (["recmtl.schema"], ["recmtl.training", "recmtl.export", "recmtl.serving"]),
    "training": (["recmtl.training.loop", "recmtl.training.evaluate", "recmtl.training.distributed"],
                 ["recmtl.export", "recmtl.serving", "recmtl.report"]),
    "sdk": (["recmtl", "recmtl.hookspecs", "recmtl.contracts", "recmtl.layers", "recmtl.gradients", "recmtl.metrics",
             "recmtl.testing", "recmtl.errors", "recmtl.registry", "recmtl.rundir", "recmtl.files", "recmtl.scaffold",
             "recmtl.config", "recmtl.report"],
            [*WINGS_OF_RECMTL, "recmtl_plugins"]),
    "cli": (["recmtl.cli"], ["torch", "pandas", "sklearn", *WINGS_OF_RECMTL, "recmtl_plugins"]),
}


def imported_by(modules: list[str]) -> set[str]:
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout))


def offending(loaded: set[str], forbidden: list[str]) -> list[str]:
    return sorted(f for f in forbidden if any(m == f or m.startswith(f + ".") for m in loaded))


@pytest.mark.parametrize("wing", sorted(RULES))
def test_wing_imports_only_what_its_rule_allows(wing):
    modules, forbidden = RULES[wing]
    bad = offending(imported_by(modules), forbidden)
    assert not bad, f"importing {modules} loads {bad} (docs/architecture.md: the {wing} rule)"


def test_rules_catch_a_violation():
    """The check itself works: the training wing does load torch and the schema."""
    loaded = imported_by(["recmtl.training.loop"])
    assert offending(loaded, ["torch", "recmtl.schema"]) == ["recmtl.schema", "torch"]


def plugin_modules() -> list[Path]:
    return sorted(p for p in PLUGINS.rglob("*.py") if p.name != "__init__.py")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "recmtl":  # `from recmtl import metrics` imports a module
                names |= {f"recmtl.{a.name}" for a in node.names if a.name.islower() and a.name != "hookimpl"}
    return names


SDK = {"recmtl", "recmtl.contracts", "recmtl.layers", "recmtl.gradients", "recmtl.metrics", "recmtl.errors"}


@pytest.mark.parametrize("path", plugin_modules(), ids=lambda p: module_name(p))
def test_plugin_imports_only_the_sdk(path):
    own = {i for i in imports_of(path) if i.split(".")[0] in ("recmtl", "recmtl_plugins")}
    assert own <= SDK, f"{module_name(path)} imports {sorted(own - SDK)}; plugins may import only {sorted(SDK)}"


def defines_hook(path: Path) -> bool:
    return any(isinstance(n, ast.FunctionDef) and n.name.startswith("recmtl_register_")
               for n in ast.parse(path.read_text()).body)


def test_every_plugin_module_has_an_entry_point_and_back():
    entry_points = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["recmtl"]
    registered = set(entry_points.values())
    with_hooks = {module_name(p) for p in plugin_modules() if defines_hook(p)}
    assert with_hooks, "no plugin module found"
    assert with_hooks - registered == set(), f"plugin modules without an entry point: {sorted(with_hooks - registered)}"
    assert registered - with_hooks == set(), f"entry points naming no plugin module: {sorted(registered - with_hooks)}"


def test_examples_package_registers_its_plugins_by_entry_point():
    root = REPO / "examples" / "recmtl-independent"
    entry_points = tomllib.loads((root / "pyproject.toml").read_text())["project"]["entry-points"]["recmtl"]
    for module in entry_points.values():
        path = root / Path(*module.split(".")).with_suffix(".py")
        path = path if path.is_file() else root / Path(*module.split(".")) / "__init__.py"
        assert path.is_file() and defines_hook(path), module
        own = {i for i in imports_of(path) if i.split(".")[0] == "recmtl"}
        assert own <= SDK, f"the example plugin imports {sorted(own - SDK)}"


def test_the_training_loops_run_is_a_training_run():
    from pathlib import Path as P

    from recmtl.contracts import TrainingRun
    from recmtl.training.loop import TrainRun
    assert isinstance(TrainRun(None, None, None, None, P(".")), TrainingRun)
