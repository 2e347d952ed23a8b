"""Atomic file output: write to a temporary name in the same folder, then rename, so an interrupted
write never leaves a file that looks complete."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recmtl.errors import DataError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, target)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(f"no space left on the device to write {target} ({exc.strerror}); nothing was "
                            "written there") from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def sweep_temporary_files(folder: str | os.PathLike) -> list[Path]:
    """Delete what interrupted ``atomic_path`` writes left in ``folder`` and its subfolders (``.NAME.*.tmp``);
    returns them. Only for a folder no other process is writing to."""
    found = [p for p in Path(folder).rglob(".*.tmp") if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
