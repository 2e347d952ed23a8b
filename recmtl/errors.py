"""One exception family for mistakes a user can fix; the CLI prints the message without a traceback."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class RecmtlError(Exception):
    """Base class of every error caused by user input (config, data, plugin names, files)."""


class ConfigError(RecmtlError):
    """The configuration is invalid: unknown key, bad value, inconsistent settings."""


class DataError(RecmtlError):
    """The data does not match what the configuration expects: missing column, wrong type, bad labels."""


class PluginError(RecmtlError):
    """A plugin is unknown, duplicated, failed to import or broke its contract."""


def close_matches(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean: a, b?)' for near-misses of ``name`` among ``choices``, or ''."""
    found = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f" (did you mean: {', '.join(found)}?)" if found else ""
