"""The run directory: the files ``recmtl train --out DIR`` writes and every later command reads.

One place for their names and for reading and writing them, with one "not a run directory" error. Every
write is atomic (``recmtl.files``), so an interrupted run never leaves a file that looks complete.

=================  =====================================================================================
``config.yaml``    the run's config, as resolved (``dump_config``)
``schema.json``    the fitted schema (``recmtl.schema``), vocabularies under ``vocab/``
``run.json``       versions, argv, start time, world size, threads (count, auto or train.threads, CPUs seen, OpenMP wait)
``metrics.json``   per-epoch history, best epoch, validation and test metrics (rewritten every epoch)
``balance.jsonl``  the balance log: one JSON line every ``train.log_every`` steps (``recmtl.training.balance_log``)
``best.pt``        the model state of the best epoch
``last.pt``        everything ``--resume`` needs: model, balancer, optimisers, RNGs, history
=================  =====================================================================================
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recmtl.errors import DataError
from recmtl.files import atomic_path, write_json, write_text

CONFIG = "config.yaml"
SCHEMA = "schema.json"
VOCAB = "vocab"
RUN_INFO = "run.json"
METRICS = "metrics.json"
BALANCE_LOG = "balance.jsonl"
BEST = "best.pt"
LAST = "last.pt"


def not_a_run_dir(path: Path, reason: str) -> DataError:
    """The one error for a folder that is not (or not yet) what ``recmtl train --out`` wrote."""
    return DataError(f"{path} is not a recmtl run directory ({reason}); pass the folder written by "
                     "`recmtl train --out`")


class RunDir:
    """A run directory at ``path`` (it need not exist yet when training writes it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    def require(self, name: str, why: str = "") -> Path:
        """The path of file ``name``; the one "not a run directory" error when the folder or the file is absent."""
        if not self.path.exists():
            raise not_a_run_dir(self.path, "it does not exist")
        if not self.path.is_dir():
            raise not_a_run_dir(self.path, "it is a file, not a folder")
        path = self.path / name
        if not path.is_file():
            raise not_a_run_dir(self.path, f"no {name}{': ' + why if why else ''}")
        return path

    @property
    def holds_run(self) -> bool:
        """Whether a run has already written a checkpoint here."""
        return (self.path / LAST).is_file() or (self.path / BEST).is_file()

    # ---- config --------------------------------------------------------------------------------
    def write_config(self, text: str) -> None:
        write_text(self.path / CONFIG, text)

    def read_config_text(self) -> str:
        return self.require(CONFIG).read_text(errors="replace")

    # ---- run info, metrics ---------------------------------------------------------------------
    def write_run_info(self, info: dict[str, Any]) -> None:
        write_json(self.path / RUN_INFO, info)

    def read_run_info(self) -> dict[str, Any] | None:
        """``run.json`` as a dict; None when it is absent or unreadable (it is informational)."""
        path = self.path / RUN_INFO
        if not path.is_file():
            return None
        try:
            info = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return info if isinstance(info, dict) else None

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.path / METRICS, metrics)

    def read_metrics(self, required: bool = True) -> dict[str, Any]:
        """``metrics.json``, checked to hold a ``history`` list of per-epoch objects (``{}`` when absent and
        not ``required``)."""
        if not required and not (self.path / METRICS).is_file():
            return {}
        path = self.require(METRICS, "it appears after the first epoch")
        try:
            metrics = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path} is not valid JSON ({exc}); the file is corrupt") from None
        if not isinstance(metrics, dict) or not isinstance(metrics.get("history"), list):
            raise DataError(f"{path} has no 'history' list; it was not written by `recmtl train`")
        if not all(isinstance(r, dict) for r in metrics["history"]):
            raise DataError(f"{path}: every 'history' entry must be an object (one per epoch)")
        return metrics

    # ---- balance log ---------------------------------------------------------------------------
    @property
    def balance_log(self) -> Path:
        return self.path / BALANCE_LOG

    def read_balance_log(self) -> tuple[list[dict[str, Any]], int]:
        """Records of ``balance.jsonl`` (absent file: none) and the number of lines that could not be read
        (e.g. the last line of a run that was killed while writing it)."""
        path = self.balance_log
        if not path.is_file():
            return [], 0
        records, skipped = [], 0
        with path.open(errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    skipped += 1
                    continue
                if isinstance(rec, dict):
                    records.append(rec)
                else:
                    skipped += 1
        return records, skipped

    # ---- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, name: str, state: dict[str, Any]) -> Path:
        import torch
        path = self.path / name
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        return path

    def load_checkpoint(self, name: str) -> dict[str, Any]:
        """A checkpoint's state dict, on the CPU."""
        import torch
        path = self.require(name, "the run has not finished an epoch")
        return torch.load(path, map_location="cpu", weights_only=False)
