"""The docs cannot drift from the code.

- docs/plugins.md: its hook table matches recmtl/hookspecs.py, each hook with its argument list; its
  tutorial tower runs and passes the contract checks.
- docs/config.md: every key of the pydantic config models has a row with its default.
- the CLI: every command has a synopsis in the docs naming each of its options.
- docs/builtin-plugins.md: every registered built-in has a row naming each constructor parameter with its
  default (the arguments the core passes itself excluded), and names no parameter it does not take.
- docs/export-and-serving.md quotes the export's parity tolerance as recmtl.export defines it.
- README: starts with the two commands, counts the built-ins right, links every reference topic.
- every relative link (and its #anchor), every repository path and every ``recmtl.*`` name the docs
  mention exists.
"""
from __future__ import annotations

import importlib
import inspect
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from recmtl import config as config_module
from recmtl import contracts, hookspecs
from recmtl.cli import app
from recmtl.registry import load_registry
from recmtl.testing import check_tower

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
PLUGINS_DOC = (DOCS / "plugins.md").read_text()
CONFIG_DOC = (DOCS / "config.md").read_text()
BUILTIN_DOC = (DOCS / "builtin-plugins.md").read_text()
PAGES = {p: p.read_text() for p in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]}
ALL_DOCS = "\n".join(PAGES.values())
TOPICS = ["config.md", "training.md", "export-and-serving.md", "plugins.md", "builtin-plugins.md", "architecture.md"]


# ---- shared helpers ----------------------------------------------------------------------------------------
def yaml_value(value: Any) -> str:
    """A default as the docs write it: YAML flow style (``[256, 128]``, ``true``, ``null``, ``mean``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def strip_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def inline_code(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", strip_fences(text))


def table_rows(text: str) -> list[list[str]]:
    """Cells of every Markdown table row (escaped pipes kept inside cells), header and rule rows left out."""
    rows = []
    for line in strip_fences(text).splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[\s|:-]+\|", line):
            rows.append([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def section(text: str, heading: str) -> str:
    """The text under ``## heading`` up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"no '## {heading}' section"
    return match.group(1)


# ---- (a) hooks ---------------------------------------------------------------------------------------------
HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("recmtl_") and hasattr(getattr(hookspecs, n), "recmtl_spec"))


def hook_signature(name: str) -> str:
    return f"{name}({', '.join(inspect.signature(getattr(hookspecs, name)).parameters)})"


def test_hook_table_matches_hookspecs():
    documented = set(re.findall(r"^\| `(recmtl_\w+)\(", PLUGINS_DOC, flags=re.M))
    assert documented == set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_documented_with_its_arguments(hook):
    assert f"`{hook_signature(hook)}`" in PLUGINS_DOC, f"docs/plugins.md lacks `{hook_signature(hook)}`"


def test_tutorial_tower_registers_and_passes_contract(tmp_path):
    code = re.search(r"```python\n# my_tower.py\n(.*?)```", PLUGINS_DOC, flags=re.S).group(1)
    path = tmp_path / "my_tower.py"
    path.write_text(code)
    reg = load_registry([str(path)])
    check_tower(reg.get("tower", "per_task_linear"), width=8)


# ---- (b) config keys ---------------------------------------------------------------------------------------
def _model_in(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """``("", M)`` for a model field, ``("[]", M)`` for ``list[M]``, ``(".*", M)`` for ``dict[str, M]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "", annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return "[]", args[0]
    if origin is dict and len(args) == 2 and isinstance(args[1], type) and issubclass(args[1], BaseModel):
        return ".*", args[1]
    return None


def config_keys(model: type[BaseModel] = config_module.Config, prefix: str = "",
                defaults: BaseModel | None = None) -> dict[str, str]:
    """Every leaf key of the config models as a dotted name -> its default as the docs write it
    (``required`` when there is none; a section's default instance supplies its keys' defaults)."""
    keys: dict[str, str] = {}
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        nested = _model_in(field.annotation)
        if nested:
            suffix, sub = nested
            instance = None
            if not suffix and not field.is_required():
                instance = field.get_default(call_default_factory=True)
            keys.update(config_keys(sub, f"{dotted}{suffix}.", instance))
            continue
        if defaults is not None:
            keys[dotted] = yaml_value(getattr(defaults, name))
        elif field.is_required():
            keys[dotted] = "required"
        else:
            default = field.get_default(call_default_factory=True)
            keys[dotted] = "required" if default is PydanticUndefined else yaml_value(default)
    return keys


CONFIG_KEYS = config_keys()
KEY_ROWS = {row[0]: row for row in table_rows(section(CONFIG_DOC, "Every key")) if row[0].startswith("`")}


def test_config_walk_finds_the_known_sections():
    assert {"seed", "data.train", "features[].kind", "tasks[].head", "encoders.*.name", "tower.name",
            "train.early_stopping.monitor", "evaluation.group_column"} <= set(CONFIG_KEYS)


@pytest.mark.parametrize("key", sorted(CONFIG_KEYS))
def test_config_key_documented_with_its_default(key):
    row = KEY_ROWS.get(f"`{key}`")
    assert row, f"docs/config.md, 'Every key': no row for `{key}`"
    expected = CONFIG_KEYS[key]
    expected = expected if expected == "required" else f"`{expected}`"
    assert row[1] == expected, f"`{key}`: the docs say {row[1]}, the config model {expected}"
    assert len(row) > 2 and len(row[2]) > 10, f"`{key}` needs an explanation"


def test_config_doc_names_no_unknown_key():
    unknown = [k for k in KEY_ROWS if k.strip("`") not in CONFIG_KEYS]
    assert not unknown, f"docs/config.md documents keys the config does not have: {unknown}"


# ---- (c) CLI commands --------------------------------------------------------------------------------------
def cli_commands() -> dict[str, list[list[str]]]:
    """Command path ("" for the top level, "datagen funnel", ...) -> the names of each of its options."""
    found: dict[str, list[list[str]]] = {}

    def walk(cmd: Any, path: str) -> None:
        found[path] = [list(p.opts) + list(p.secondary_opts) for p in cmd.params if p.param_type_name == "option"]
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    return found


COMMANDS = cli_commands()
SPANS = [s for s in inline_code(ALL_DOCS) if s.startswith("recmtl")]


def _names_option(span: str, names: list[str]) -> bool:
    return any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", span) for n in names)


def test_cli_walk_finds_the_commands():
    assert {"", "train", "serve", "datagen", "datagen funnel"} <= set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_has_a_synopsis_with_every_option(command):
    prefix = f"recmtl {command}".strip()
    spans = [s for s in SPANS if s == prefix or s.startswith(prefix + " ")]
    assert spans, f"the docs never show `{prefix} ...`"
    options = COMMANDS[command]
    if not options:
        return
    best = max(spans, key=lambda s: sum(_names_option(s, names) for names in options))
    missing = [names[0] for names in options if not _names_option(best, names)]
    assert not missing, f"no synopsis `{prefix} ...` in the docs names all its options; closest lacks {missing}: `{best}`"


# ---- (d) built-in plugins ----------------------------------------------------------------------------------
REGISTRY = load_registry()
BASES = {"tower": contracts.Tower, "head": contracts.Head, "balancer": contracts.Balancer, "encoder": contracts.Encoder,
         "interaction": contracts.Interaction,
         "logger": contracts.Logger}
BUILTINS = [(kind, name) for kind in BASES for name, entry in sorted(REGISTRY.tables[kind].items())
            if entry.factory.__module__.startswith("recmtl_plugins.")]


def plugin_parameters(kind: str, name: str) -> dict[str, str]:
    """The config parameters of a plugin (``name -> default``): its constructor's keywords minus what the
    core passes itself, i.e. the contract base class's constructor arguments (and ``features`` for a tower
    with ``uses_inputs``, ``field_columns`` for an interaction with ``uses_field_columns``)."""
    factory = REGISTRY.get(kind, name)
    fixed = set(inspect.signature(BASES[kind].__init__).parameters) - {"self"}
    if kind == "tower" and getattr(factory, "uses_inputs", False):
        fixed.add("features")
    if kind == "interaction" and getattr(factory, "uses_field_columns", False):
        fixed.add("field_columns")
    params = {}
    for p in inspect.signature(factory).parameters.values():
        if p.name in fixed or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        params[p.name] = "" if p.default is p.empty else yaml_value(p.default)
    return params


def plugin_row(kind: str, name: str) -> list[str] | None:
    rows = [r for r in table_rows(section(BUILTIN_DOC, f"{kind.capitalize()}s")) if r and r[0] == f"`{name}`"]
    return rows[0] if rows else None


def test_every_kind_has_builtins():
    assert {k for k, _ in BUILTINS} == set(BASES)


@pytest.mark.parametrize("kind,name", BUILTINS)
def test_builtin_plugin_documented_with_its_parameters(kind, name):
    row = plugin_row(kind, name)
    assert row, f"docs/builtin-plugins.md, '{kind.capitalize()}s': no row for `{name}`"
    assert len(row) == 3 and len(row[1]) > 10, f"`{name}`: expected | name | what | parameters |"
    params = plugin_parameters(kind, name)
    for param, default in params.items():
        expected = f"`{param}: {default}`" if default else f"`{param}`"
        assert expected in row[2], f"{kind} `{name}`: parameter {expected} missing from its row"
    if not params:
        assert row[2] == "none", f"{kind} `{name}` takes no parameters: its cell should say none"
    documented = {m.group(1) for s in re.findall(r"`([^`]+)`", row[2]) if (m := re.fullmatch(r"(\w+): .*", s))}
    assert documented <= set(params), f"{kind} `{name}` does not take {sorted(documented - set(params))}"


def test_builtin_tables_name_only_registered_plugins():
    for kind in BASES:
        rows = table_rows(section(BUILTIN_DOC, f"{kind.capitalize()}s"))
        names = {r[0].strip("`") for r in rows if r and r[0].startswith("`")}
        assert names == {n for k, n in BUILTINS if k == kind}, kind


# ---- numbers the docs quote ---------------------------------------------------------------------------------
def test_export_parity_tolerance_documented():
    from recmtl.export import PARITY_ATOL, PARITY_RTOL
    def short(x: float) -> str:  # 1e-4, as the docs write it
        mantissa, exponent = f"{x:.1e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    quoted = f"{short(PARITY_ATOL)} + {short(PARITY_RTOL)} × |score|"
    page = PAGES[DOCS / "export-and-serving.md"]
    assert f"`{quoted}`" in page, f"docs/export-and-serving.md should quote the parity tolerance `{quoted}`"


# ---- README ------------------------------------------------------------------------------------------------
def test_readme_starts_with_the_two_commands():
    head = README[:800]
    assert "make demo" in head and "make test" in head
    assert "docs/plugins.md" in README


def test_readme_counts_the_builtins():
    for kind, word in [("tower", "towers"), ("balancer", "loss balancers"), ("encoder", "encoders")]:
        count = sum(k == kind for k, _ in BUILTINS)
        assert re.search(rf"\b{count} {word}\b", README[:800]), f"README should say {count} {word}"


@pytest.mark.parametrize("topic", TOPICS)
def test_readme_links_every_reference_topic(topic):
    assert f"](docs/{topic})" in README


# ---- links, paths and names --------------------------------------------------------------------------------
def github_anchors(text: str) -> set[str]:
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", strip_fences(text), flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


LINKS = [(page, target) for page, text in PAGES.items()
         for target in re.findall(r"\]\(([^)\s]+)\)", strip_fences(text)) if not re.match(r"\w+://", target)]


@pytest.mark.parametrize("page,target", LINKS, ids=[f"{p.name}->{t}" for p, t in LINKS])
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    rel = file.relative_to(ROOT).as_posix()
    assert file.exists(), f"{page.name}: link to {target} points nowhere"
    if anchor:
        assert anchor in github_anchors(file.read_text()), f"{page.name}: no heading #{anchor} in {rel}"


PATHS = sorted({s.rstrip("/") for s in inline_code(ALL_DOCS)
                if re.fullmatch(r"(recmtl|recmtl_plugins|tests|benchmarks|examples|docs)(/[\w.-]+)*/?", s)}
               | {"Dockerfile", "Makefile"})


@pytest.mark.parametrize("path", PATHS)
def test_named_path_exists(path):
    assert (ROOT / path).exists(), f"the docs name {path}, which does not exist"


FILE_SUFFIXES = {"yaml", "yml", "toml", "json", "jsonl", "md", "py", "onnx", "parquet", "pt"}


def _dotted_names() -> list[str]:
    names = set()
    for span in inline_code(ALL_DOCS):
        m = re.match(r"(recmtl(?:_plugins)?(?:\.[A-Za-z_]\w*)+)", span)
        if m and m.group(1).rsplit(".", 1)[1] not in FILE_SUFFIXES:  # not a file name such as recmtl.yaml
            names.add(m.group(1))
    for block in re.findall(r"```python\n(.*?)```", ALL_DOCS, flags=re.S):
        for module, imported in re.findall(r"^\s*from (recmtl[\w.]*) import ([\w, ]+)$", block, flags=re.M):
            names.update(f"{module}.{n.strip()}" for n in imported.split(","))
    return sorted(names)


@pytest.mark.parametrize("dotted", _dotted_names())
def test_named_python_object_exists(dotted):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name) and exc.name.split(".")[0] in ("recmtl", "recmtl_plugins"):
                continue
            raise
        for j in range(i, len(parts)):
            assert hasattr(obj, parts[j]), f"the docs name {dotted}: {'.'.join(parts[:j])} has no {parts[j]}"
            obj = getattr(obj, parts[j])
        return
    pytest.fail(f"the docs name {dotted}, which is not importable")
