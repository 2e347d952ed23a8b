"""The run directory: the files ``recmtl train --out DIR`` writes and every later command reads.

One place for their names and for reading and writing them, with one "not a run directory" error. Every
write is atomic (``recmtl.files``), so an interrupted run never leaves a file that looks complete.

=================  =====================================================================================
``config.yaml``    the run's config, as resolved (``dump_config``)
``schema.json``    the fitted schema (``recmtl.schema``), vocabularies under ``vocab/``
``run.json``       versions, argv, start time, world size, the label summary per task and split (``labels``),
                   threads (count, auto or train.threads, CPUs seen, OpenMP wait)
``metrics.json``   per-epoch history, best epoch, validation and test metrics (rewritten every epoch)
``balance.jsonl``  the balance log: one JSON line every ``train.log_every`` steps (``recmtl.training.balance_log``)
``affinity.jsonl`` the lookahead task affinity: one JSON line every ``train.affinity_every`` steps (``recmtl.training.affinity``)
``best.pt``        the model state of the best epoch by ``early_stopping.monitor``
``best_epochs/``   ``epoch_NNNN.pt``: the model state of each task's best epoch (one file per distinct epoch)
``last.pt``        everything ``--resume`` needs: model, balancer, optimisers, RNGs, history
``calibrator.json`` the post-hoc calibrators ``recmtl calibrate`` fitted (JSON, ``recmtl.calibration``)
``.lock``          held by the ``recmtl train`` writing the folder (its process id)
=================  =====================================================================================
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recmtl.errors import ConfigError, DataError
from recmtl.files import atomic_path, write_json, write_text

CONFIG = "config.yaml"
SCHEMA = "schema.json"
VOCAB = "vocab"
RUN_INFO = "run.json"
METRICS = "metrics.json"
BALANCE_LOG = "balance.jsonl"
AFFINITY_LOG = "affinity.jsonl"
BEST = "best.pt"
LAST = "last.pt"
BEST_EPOCHS = "best_epochs"
LOCK = ".lock"
CALIBRATOR = "calibrator.json"


def epoch_checkpoint(epoch: int) -> str:
    """The file name (relative to the run directory) of the model state saved after ``epoch`` (1-based)."""
    return f"{BEST_EPOCHS}/epoch_{epoch:04d}.pt"


def require_trusted_plugins(run_dir: Path, saved: list[str], passed: list[str]) -> None:
    """A run directory's saved config may name plugin modules (``plugins:``), and importing one runs its code: a
    run directory from elsewhere is code. Refuse unless each was passed again with ``--plugin`` (installed plugin
    packages, found through entry points, load without it)."""
    def key(spec: str) -> str:
        return str(Path(spec).resolve()) if spec.endswith(".py") else spec
    confirmed = {key(p) for p in passed}
    missing = [m for m in saved if key(m) not in confirmed]
    if missing:
        flags = " ".join(f"--plugin {m}" for m in missing)
        raise ConfigError(f"{run_dir}/{CONFIG} names plugin code to import ({', '.join(missing)}); importing it runs it, "
                          f"so a run directory's plugins load only when named again: recmtl {flags} ...")


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

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory for one writer (an exclusive ``flock`` on ``.lock``): a second ``recmtl train``
        into the same folder fails at once, naming the process that holds it. Creates the folder; removes it again
        when it was created here and is still empty afterwards."""
        import fcntl
        import os
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / LOCK
        fh = open(path, "a+")
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                raise ConfigError(f"{self.path} is in use by another `recmtl train` (process {holder}); wait for it to "
                                  "finish or choose another --out") from None
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            try:
                yield
            finally:
                path.unlink(missing_ok=True)
                fcntl.flock(fh, fcntl.LOCK_UN)
                if created and not any(self.path.iterdir()):
                    self.path.rmdir()
        finally:
            fh.close()

    def discard_checkpoints(self) -> None:
        """Delete ``best.pt``, ``last.pt`` and the per-epoch checkpoints (a run started again from scratch)."""
        import shutil
        for name in (BEST, LAST):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / BEST_EPOCHS, ignore_errors=True)

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
        return _read_jsonl(self.balance_log)

    @property
    def affinity_log(self) -> Path:
        return self.path / AFFINITY_LOG

    def read_affinity_log(self) -> tuple[list[dict[str, Any]], int]:
        """Records of ``affinity.jsonl`` (as ``read_balance_log``)."""
        return _read_jsonl(self.affinity_log)

    # ---- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, name: str, state: dict[str, Any]) -> Path:
        """``torch.save`` of ``state`` to file ``name``, atomically, followed by its SHA-256 (``load_checkpoint``
        verifies it, so a damaged file is refused instead of silently loaded)."""
        import torch
        path = self.path / name
        with atomic_path(path) as tmp:
            try:
                torch.save(state, tmp)
            except RuntimeError as exc:  # torch's C++ writer: "file write failed", whatever the cause
                raise DataError(f"could not write {path}: {_write_failure(tmp, exc)}") from None
            digest = _sha256(tmp, tmp.stat().st_size)
            with open(tmp, "ab") as fh:
                fh.write(CHECKSUM_MAGIC + digest.encode())
        return path

    def prune_epoch_checkpoints(self, keep: set[int]) -> None:
        """Delete the per-epoch checkpoints of epochs (1-based) not in ``keep``."""
        folder = self.path / BEST_EPOCHS
        if folder.is_dir():
            for path in folder.glob("epoch_*.pt"):
                if path.stem.removeprefix("epoch_").isdigit() and int(path.stem.removeprefix("epoch_")) not in keep:
                    path.unlink(missing_ok=True)

    def task_best_epochs(self) -> dict[str, int] | None:
        """Each task's best epoch (1-based) as ``metrics.json`` records it, when every one has its checkpoint;
        None for runs from before per-task selection, or when a file is missing."""
        best = self.read_metrics(required=False).get("task_best")
        if not isinstance(best, dict) or not best:
            return None
        epochs = {t: int(b["epoch"]) for t, b in best.items() if isinstance(b, dict) and isinstance(b.get("epoch"), int)}
        if len(epochs) != len(best) or not all((self.path / epoch_checkpoint(e)).is_file() for e in epochs.values()):
            return None
        return epochs

    def checkpoint_digest(self, name: str) -> str:
        """The SHA-256 of checkpoint ``name``: the one written with it, or computed for files from before checksums
        (what binds ``calibrator.json`` to the state it was fitted on)."""
        path = self.require(name, "the run has not finished an epoch")
        size = path.stat().st_size
        if size > _TRAILER:
            with open(path, "rb") as fh:
                fh.seek(size - _TRAILER)
                trailer = fh.read(_TRAILER)
            if trailer.startswith(CHECKSUM_MAGIC):
                return trailer[len(CHECKSUM_MAGIC):].decode("ascii", "replace")
        return _sha256(path, size)

    def load_checkpoint(self, name: str) -> dict[str, Any]:
        """A checkpoint's state dict, on the CPU, after checking its SHA-256 (files written before checksums are
        loaded unchecked). Only tensors and plain data are unpickled (``weights_only=True``): a crafted file
        cannot run code. Damaged, truncated, empty or foreign files are one clear ``DataError``."""
        import pickle

        import torch
        path = self.require(name, "the run has not finished an epoch")
        verify_checkpoint(path)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line or "GLOBAL" in line]
            if not found:  # not a pickle of ours at all (e.g. text)
                raise DataError(f"{path} is not a readable checkpoint ({str(exc).strip().splitlines()[0][:120]}); it is "
                                "damaged or was not written by recmtl") from None
            raise DataError(f"refusing to load {path}: it holds Python objects other than tensors and plain data, which "
                            f"could run code when unpickled, so recmtl loads weights only ({found[0][:160]})") from None
        except (RuntimeError, EOFError, ValueError, OSError) as exc:
            raise DataError(f"{path} is not a readable checkpoint ({str(exc).strip().splitlines()[0][:200]}); "
                            "it is damaged or was not written by recmtl") from None


#: what follows the torch.save payload of a checkpoint: the magic, then the payload's SHA-256 in hex
CHECKSUM_MAGIC = b"\nrecmtl-sha256:"
_TRAILER = len(CHECKSUM_MAGIC) + 64


def _sha256(path: Path, size: int) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        left = size
        while left > 0:
            chunk = fh.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def verify_checkpoint(path: Path) -> None:
    """Raise ``DataError`` when ``path`` is empty or its trailing SHA-256 does not match its content."""
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path} is empty: a write was interrupted, or the disk was full")
    if size <= _TRAILER:
        return  # too short for a trailer: torch.load says what it is
    with open(path, "rb") as fh:
        fh.seek(size - _TRAILER)
        trailer = fh.read(_TRAILER)
    if not trailer.startswith(CHECKSUM_MAGIC):
        return  # written before checksums
    if _sha256(path, size - _TRAILER) != trailer[len(CHECKSUM_MAGIC):].decode("ascii", "replace"):
        raise DataError(f"{path} is damaged: its content does not match the checksum written with it; use another "
                        "checkpoint of the run (e.g. --checkpoint last) or train again")


def _write_failure(tmp: Path, exc: Exception) -> str:
    """Why a write failed, in words: "no space left" when the disk is (nearly) full."""
    import shutil
    try:
        free = shutil.disk_usage(tmp.parent).free
    except OSError:
        free = None
    if free is not None and free < 64 << 20:
        return f"no space left on the device ({free / 1e6:.1f} MB free)"
    return str(exc).strip().splitlines()[0][:200]


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """A JSON-lines log's object records and the count of unreadable lines; an absent file has none."""
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
