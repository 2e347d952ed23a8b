"""Progress on stderr: a tqdm bar on a terminal; anywhere else (a CI log, ``make demo > log 2>&1``, a pipe)
a plain line every ``PROGRESS_LINE_S`` seconds and never a carriage return, which a log would keep as one
endless line of redrawn bars. tqdm is imported only for a terminal (``recmtl score`` must start fast)."""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

#: seconds between two progress lines when stderr is not a terminal
PROGRESS_LINE_S = 30.0


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real file
        return False


def progress(total: int, desc: str, enabled: bool = True, unit: str = "row", file: TextIO | None = None,
             interval: float = PROGRESS_LINE_S, initial: int = 0) -> Any:
    """A progress reporter with tqdm's ``update(n)``, ``set_postfix(dict, refresh=False)``, ``close()`` and
    context-manager interface: a tqdm bar when ``file`` (default stderr) is a terminal, else
    :class:`LineProgress`; nothing at all when not ``enabled``. ``initial``: units already done (a resumed
    epoch), counted in the share, not in the rate."""
    file = file if file is not None else sys.stderr
    if not enabled:
        return LineProgress(total, desc, unit, file, interval, silent=True, initial=initial)
    if is_terminal(file):
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=True, file=file, mininterval=1.0)
    return LineProgress(total, desc, unit, file, interval, initial=initial)


class LineProgress:
    """Plain progress lines, ``desc: 40% 8,000/20,000 rows, 12,345 rows/s  postfix``, at most one every
    ``interval`` seconds (the first after ``interval`` seconds: short tasks print nothing)."""

    def __init__(self, total: int, desc: str, unit: str = "row", file: TextIO | None = None,
                 interval: float = PROGRESS_LINE_S, silent: bool = False, initial: int = 0) -> None:
        self.total, self.desc, self.unit, self.interval, self.silent = total, desc, unit, interval, silent
        self.file = file if file is not None else sys.stderr
        self.n = self.initial = initial
        self.postfix = ""
        self.start = self.last = time.monotonic()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.silent:
            return
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.write(now)

    def set_postfix(self, values: dict[str, Any] | None = None, refresh: bool = False, **kw: Any) -> None:
        items = {**(values or {}), **kw}
        self.postfix = "  " + " ".join(f"{k}={v}" for k, v in items.items()) if items else ""

    def write(self, now: float | None = None) -> None:
        seconds = max((now or time.monotonic()) - self.start, 1e-9)
        share = f"{100 * self.n / self.total:.0f}% " if self.total else ""
        print(f"{self.desc}: {share}{self.n:,}/{self.total:,} {self.unit}s, {(self.n - self.initial) / seconds:,.0f} {self.unit}s/s"
              f"{self.postfix}", file=self.file, flush=True)

    def close(self) -> None:
        pass
