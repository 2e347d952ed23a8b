"""Plugin manager and registries: towers, heads, balancers, encoders, interaction blocks and loggers, filled by hooks."""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy

from recmtl import hookspecs
from recmtl.errors import ConfigError, PluginError, close_matches

KINDS = {
    "tower": "recmtl_register_towers",
    "head": "recmtl_register_heads",
    "balancer": "recmtl_register_balancers",
    "encoder": "recmtl_register_encoders",
    "interaction": "recmtl_register_interactions",
    "logger": "recmtl_register_loggers",
}
ENTRY_POINT_GROUP = "recmtl"


@dataclass(frozen=True)
class Entry:
    """One registered name: its kind, the factory, and the plugin that supplied it."""

    kind: str
    name: str
    factory: Any
    plugin: str  # plugin name (entry-point name or module)
    origin: str  # distribution "name==version", or "module" for --plugin modules

    def where(self) -> str:
        return f"{self.plugin} ({self.origin})"


class Registry:
    """All registered plugins, one table per kind."""

    def __init__(self, pm: pluggy.PluginManager, origins: dict[str, str]) -> None:
        self.pm = pm
        self.tables: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        for kind, hook_name in KINDS.items():
            hook = getattr(pm.hook, hook_name)
            for impl in reversed(hook.get_hookimpls()):  # registration order
                plugin = impl.plugin_name
                try:
                    answer = impl.function()
                except Exception as exc:  # a broken plugin is named, not a bare traceback
                    raise PluginError(f"plugin '{plugin}' failed in {hook_name}: {exc!r}") from exc
                if not isinstance(answer, dict):
                    raise PluginError(f"plugin '{plugin}': {hook_name} must return a dict of name -> class")
                for name, factory in answer.items():
                    entry = Entry(kind, name, factory, plugin, origins.get(plugin, "module"))
                    previous = self.tables[kind].get(name)
                    if previous is not None:
                        raise PluginError(
                            f"duplicate {kind} name '{name}': registered by {previous.where()} and by "
                            f"{entry.where()}; disable one with --disable-plugin NAME"
                        )
                    self.tables[kind][name] = entry

    def names(self, kind: str) -> list[str]:
        return sorted(self.tables[kind])

    def entry(self, kind: str, name: str) -> Entry:
        table = self.tables[kind]
        if name not in table:
            available = ", ".join(f"{n} [{e.plugin}]" for n, e in sorted(table.items())) or "none"
            raise PluginError(
                f"unknown {kind} '{name}'{close_matches(name, table)}; available {kind}s: {available}"
            )
        return table[name]

    def get(self, kind: str, name: str) -> Any:
        return self.entry(kind, name).factory

    def check_params(self, kind: str, name: str, params: dict[str, Any], fixed: Iterable[str] = ()) -> None:
        """Fail before any data is read when ``params`` names a keyword the plugin does not take."""
        factory = self.get(kind, name)
        sig = inspect.signature(factory)
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return
        accepted = [p for p in sig.parameters if p not in set(fixed) and p != "self"]
        for key in params:
            if key not in accepted:
                hint = (f" (switching {kind}s with --set? replace the whole section: --set '{kind}={{name: {name}}}')"
                        if kind in ("tower", "balancer") else "")
                raise ConfigError(
                    f"{kind} '{name}' does not take parameter '{key}'{close_matches(key, accepted)}; "
                    f"it takes: {', '.join(accepted) or 'no parameters'}{hint}"
                )

    def create(self, kind: str, name: str, *args: Any, **params: Any) -> Any:
        """Build a plugin object; a constructor's ValueError/TypeError becomes a ConfigError naming it."""
        factory = self.get(kind, name)
        try:
            return factory(*args, **params)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{kind} '{name}': {exc}") from exc

    def rows(self) -> list[Entry]:
        return [e for kind in KINDS for _, e in sorted(self.tables[kind].items())]


def _import_module(spec: str) -> Any:
    """Import ``spec``: a dotted module name, or a path to a ``.py`` file."""
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_file():
            raise PluginError(f"plugin file not found: {spec}")
        mod_name = f"recmtl_user_plugin_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        assert module_spec and module_spec.loader
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def plugin_manager(modules: Iterable[str] = (), disabled: Iterable[str] = ()) -> tuple[pluggy.PluginManager, dict[str, str]]:
    """A plugin manager with the entry-point plugins (built-ins included) and ``modules`` registered."""
    pm = pluggy.PluginManager("recmtl")
    pm.add_hookspecs(hookspecs)
    disabled = set(disabled)
    origins: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in disabled or ep.name in origins or pm.get_plugin(ep.name) is not None:
            continue
        dist = f"{ep.dist.name}=={ep.dist.version}" if ep.dist else "entry point"
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(
                f"plugin '{ep.name}' from {dist} failed to import ({ep.value}): {exc!r}; "
                f"skip it with --disable-plugin {ep.name}"
            ) from exc
        _register(pm, plugin, ep.name)
        origins[ep.name] = dist
    for spec in modules:
        if spec in disabled or pm.get_plugin(spec) is not None:
            continue
        try:
            module = _import_module(spec)
        except ModuleNotFoundError as exc:
            if exc.name and spec.startswith(exc.name):
                raise PluginError(f"plugin module '{spec}' not found: {exc}") from exc
            raise PluginError(f"plugin module '{spec}' failed to import: {exc!r}") from exc
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin module '{spec}' failed to import: {exc!r}") from exc
        _register(pm, module, spec)
        origins[spec] = "module"
    return pm, origins


def _register(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin '{name}' is invalid: {exc}") from exc


def load_registry(modules: Iterable[str] = (), disabled: Iterable[str] = ()) -> Registry:
    """Discover plugins and build the registries."""
    pm, origins = plugin_manager(modules, disabled)
    return Registry(pm, origins)
