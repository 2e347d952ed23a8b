"""Experiment loggers for one training run: built from the config's ``loggers`` before any data is read,
registered as plugins so the life-cycle hooks reach them, closed when training ends or fails."""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from recmtl.config import Config
from recmtl.registry import Registry


def build_loggers(config: Config, registry: Registry) -> list[Any]:
    """One instance per entry of ``config.loggers``; unknown names and parameters are ConfigErrors/PluginErrors."""
    loggers = []
    for comp in config.logger_components():
        registry.check_params("logger", comp.name, comp.params)
        loggers.append(registry.create("logger", comp.name, **comp.params))
    return loggers


@contextmanager
def attached(registry: Registry, observers: Sequence[Any]) -> Iterator[None]:
    """Register ``observers`` (loggers, tune's pruning callback) on the plugin manager for the block; unregister
    them after it and call each one's ``close()`` (a failing close is a warning, never the run's error)."""
    names = []
    try:
        for i, obs in enumerate(observers):
            name = f"recmtl-run-observer-{i}-{type(obs).__name__}"
            registry.pm.register(obs, name=name)
            names.append(name)
        yield
    finally:
        for name in reversed(names):
            registry.pm.unregister(name=name)
        for obs in reversed(observers):
            close = getattr(obs, "close", None)
            if close is None:
                continue
            try:
                close()
            except Exception as exc:  # a logger's backend failing at the end does not fail the run
                warnings.warn(f"logger {type(obs).__name__} failed to close: {exc!r}", stacklevel=2)
