"""The ``tensorboard`` logger: event files under ``RUN_DIR/tensorboard/`` (or ``log_dir``) through
``torch.utils.tensorboard``; needs the ``tensorboard`` extra."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from recmtl import Logger, hookimpl
from recmtl.errors import ConfigError
from recmtl.metrics import epoch_scalars


def step_scalars(record: dict[str, Any]) -> dict[str, float]:
    """One ``log_every`` step record as flat scalars: losses, weights, gradient norms, task-gradient cosines."""
    out: dict[str, float] = {}
    for group in ("losses", "weights", "grad_norms", "cosine"):
        for name, v in (record.get(group) or {}).items():
            out[f"step/{group}/{name}"] = v
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


class TensorBoardLogger(Logger):
    """Scalars per epoch and every ``train.log_every`` steps, the config as text, the report's figures as images."""

    def __init__(self, log_dir: str | None = None, report: bool = True) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("logger 'tensorboard' needs the tensorboard package: "
                              "pip install 'recmtl[tensorboard]'") from None
        self._writer_class = SummaryWriter
        self.log_dir = log_dir
        self.report = report
        self.writer: Any = None

    @hookimpl
    def recmtl_train_start(self, run: Any) -> None:
        path = Path(self.log_dir).expanduser() if self.log_dir else Path(run.run_dir) / "tensorboard"
        self.writer = self._writer_class(str(path))
        config_file = Path(run.run_dir) / "config.yaml"
        text = config_file.read_text() if config_file.is_file() else run.config.model_dump_json(indent=2)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))

    @hookimpl
    def recmtl_step_logged(self, step: int, record: dict[str, Any]) -> None:
        for tag, value in step_scalars(record).items():
            self.writer.add_scalar(tag, value, step)

    @hookimpl
    def recmtl_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        for tag, value in epoch_scalars(metrics).items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    @hookimpl
    def recmtl_train_end(self, run: Any, metrics: dict[str, Any]) -> None:
        best = int(metrics.get("best_epoch") or 0)
        for task, values in (metrics.get("test") or {}).items():
            for name, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"test/{task}/{name}", float(v), best)
        if self.report:
            self._add_report(run)
        self.writer.flush()

    def _add_report(self, run: Any) -> None:
        import numpy as np
        from PIL import Image
        try:
            index = run.write_report()
        except Exception as exc:  # e.g. matplotlib (the report extra) is not installed
            warnings.warn(f"tensorboard logger: no report figures ({exc})", stacklevel=2)
            return
        for png in sorted(Path(index).parent.glob("*.png")):
            with Image.open(png) as img:
                self.writer.add_image(f"report/{png.stem}", np.asarray(img.convert("RGB")), dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@hookimpl
def recmtl_register_loggers() -> dict[str, type[Logger]]:
    return {"tensorboard": TensorBoardLogger}
