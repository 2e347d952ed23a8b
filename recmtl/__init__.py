"""recmtl: multi-task learning for recommenders, built on pluggy."""
from __future__ import annotations

from typing import Any

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("recmtl")
hookspec = pluggy.HookspecMarker("recmtl")

from recmtl.errors import ConfigError, DataError, PluginError, RecmtlError  # noqa: E402

_CONTRACTS = {"Balancer", "Encoder", "FeatureInfo", "Head", "TaskInfo", "Tower"}


def __getattr__(name: str) -> Any:
    # the plugin contracts need torch; importing them lazily keeps `recmtl score` free of torch
    if name in _CONTRACTS:
        from recmtl import contracts
        return getattr(contracts, name)
    raise AttributeError(f"module 'recmtl' has no attribute {name!r}")


__all__ = [
    "Balancer", "ConfigError", "DataError", "Encoder", "FeatureInfo", "Head", "PluginError",
    "RecmtlError", "TaskInfo", "Tower", "hookimpl", "hookspec", "__version__",
]
