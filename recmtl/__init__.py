"""recmtl: multi-task learning for recommenders, built on pluggy."""
from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("recmtl")
hookspec = pluggy.HookspecMarker("recmtl")

from recmtl.contracts import Balancer, Encoder, FeatureInfo, Head, TaskInfo, Tower  # noqa: E402
from recmtl.errors import ConfigError, DataError, PluginError, RecmtlError  # noqa: E402

__all__ = [
    "Balancer", "ConfigError", "DataError", "Encoder", "FeatureInfo", "Head", "PluginError",
    "RecmtlError", "TaskInfo", "Tower", "hookimpl", "hookspec", "__version__",
]
