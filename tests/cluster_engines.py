"""Skip or fail a test whose cluster engine (Spark and its Java, Ray) is missing.

A developer without the engine sees the test skipped with what is missing and how to get it; under CI (the
environment variable ``CI`` set, as CI services do, and not ``0``/``false``) or with
``RECMTL_REQUIRE_CLUSTER=1`` a missing engine fails the test instead, so a CI image that lost pyspark, ray or
Java cannot pass by skipping. ``RECMTL_REQUIRE_CLUSTER=0`` allows skipping under CI too.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

REQUIRE = "RECMTL_REQUIRE_CLUSTER"


def required() -> bool:
    """Whether a missing engine fails (True) or skips (False) the test."""
    flag = os.environ.get(REQUIRE, "").strip().lower()
    if flag:
        return flag not in ("0", "false", "no")
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str) -> NoReturn:
    """Skip (or, when :func:`required`, fail) with one message saying what is missing and how to install it."""
    message = f"{what}; `make test` installs it"
    if required():
        pytest.fail(f"{message} ({REQUIRE}=1 or CI is set, so a missing engine fails instead of skipping)",
                    pytrace=False)
    pytest.skip(message)


def engine(module: str, extra: str) -> ModuleType:
    """Import ``module`` (e.g. ``pyspark``), or skip/fail naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing(f"{module} is not installed ({exc}): pip install 'recmtl[{extra}]'")


#: the oldest Java Spark 4 runs on
JAVA_MIN = 17


def java() -> str:
    """The ``java`` Spark will start (``$JAVA_HOME/bin/java``, else the one on PATH), or skip/fail when there
    is none or it is older than :data:`JAVA_MIN`."""
    home = os.environ.get("JAVA_HOME")
    found = str(Path(home) / "bin" / "java") if home and (Path(home) / "bin" / "java").is_file() else shutil.which("java")
    if not found:
        missing(f"Java is not installed (Spark needs a JRE, {JAVA_MIN} or later: apt-get install default-jre-headless)")
    try:
        version = subprocess.run([found, "-version"], capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        missing(f"{found} -version failed ({exc}): Spark needs a working JRE")
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version)
    major = int(match.group(2) if match and match.group(1) == "1" else match.group(1)) if match else 0
    if major < JAVA_MIN:
        missing(f"{found} is Java {major or 'of an unknown version'}; Spark 4 needs Java {JAVA_MIN} or later")
    return found
