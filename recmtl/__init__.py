"""recmtl: multi-task learning for recommenders, built on pluggy."""
from __future__ import annotations

from importlib import metadata
from typing import Any

import pluggy

try:  # one version source: the installed distribution's metadata (pyproject.toml)
    __version__ = metadata.version("recmtl")
except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree that was never installed
    __version__ = "0+unknown"

#: marks a plugin's hook implementations (built-in plugins use it too)
hookimpl = pluggy.HookimplMarker("recmtl")

from recmtl.errors import ConfigError, DataError, PluginError, RecmtlError  # noqa: E402
from recmtl.hookspecs import hookspec  # noqa: E402  (the one HookspecMarker)

_CONTRACTS = {"Balancer", "Encoder", "FeatureInfo", "Head", "Interaction", "Logger", "TableRows", "TaskInfo", "Tower",
              "TrainingRun"}


def __getattr__(name: str) -> Any:
    # the plugin contracts need torch; importing them lazily keeps `recmtl score` free of torch
    if name in _CONTRACTS:
        from recmtl import contracts
        return getattr(contracts, name)
    raise AttributeError(f"module 'recmtl' has no attribute {name!r}")


__all__ = [
    "Balancer", "ConfigError", "DataError", "Encoder", "FeatureInfo", "Head", "Interaction", "Logger", "PluginError",
    "RecmtlError", "TableRows", "TaskInfo", "Tower", "TrainingRun", "hookimpl", "hookspec", "__version__",
]
