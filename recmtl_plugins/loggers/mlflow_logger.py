"""The ``mlflow`` logger: one MLflow run per training run (params, metrics with steps, artifacts); the run's id is
kept in ``RUN_DIR/mlflow.json`` for ``--resume`` and ``recmtl export --mlflow``. Needs the ``mlflow`` extra.

Calls go through a queue drained by a background thread, so the training loop never waits for the server, and
metrics go out merged, one request every ``send_every`` (5) seconds at most. A
tracking server that is down never stops training: one warning, the calls stay queued and are sent again every
few seconds (at the end of training for at most ``timeout`` seconds more); the run directory keeps every number either way."""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from recmtl import Logger, hookimpl
from recmtl.errors import ConfigError
from recmtl.metrics import epoch_scalars

#: the file in the run directory that names the MLflow run (read by ``recmtl export --mlflow``)
RUN_FILE = "mlflow.json"
#: run-directory files logged as artifacts when smaller than this
SMALL_FILE_BYTES = 10 << 20


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: ``optimizer.lr -> "0.005"``, list items by index (``tasks.0.name``)."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): json.dumps(value) if not isinstance(value, str) else value}


def epoch_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """An epoch record as flat metrics (the tensorboard logger's scalars), NaN left out."""
    return {k: v for k, v in epoch_scalars(metrics).items() if v == v}


class MLflowLogger(Logger):
    """Logs a training run to MLflow: the flattened config as params, the epoch (and ``log_every`` step) metrics
    with their steps, the run directory's small files and the report as artifacts."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = "recmtl", run_name: str | None = None,
                 report: bool = True, timeout: float = 15.0) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise ConfigError("logger 'mlflow' needs the mlflow package: pip install 'recmtl[mlflow]'") from None
        # fail fast when the server is down (MLflow's default retries for minutes); the queue retries later
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self._client_class, self._client = MlflowClient, None
        self.experiment, self.run_name, self.report = experiment, run_name, report
        self.run_id: str | None = None
        self.run_dir: Path | None = None
        self.pending: list[tuple[str, dict[str, Any]]] = []
        self.warned = False
        self.finished = False
        self.retry_seconds, self.close_timeout, self.send_every, self._sent = 5.0, float(timeout), 5.0, 0.0
        self._cond = threading.Condition()
        self._closing, self._deadline = False, 0.0
        self._thread: threading.Thread | None = None

    @property
    def client(self) -> Any:
        """The MLflow client, made on first use: a logger that sees no run touches no tracking store (MLflow's
        default store is a file in the working directory)."""
        if self._client is None:
            self._client = self._client_class(tracking_uri=self.tracking_uri)
        return self._client

    @client.setter
    def client(self, value: Any) -> None:
        self._client = value

    # -- sending: a background thread drains a queue, so a hook costs the training loop no network round trip --
    def _queue(self, op: str, **kwargs: Any) -> None:
        with self._cond:
            self.pending.append((op, kwargs))
            self._cond.notify()

    def _take(self) -> tuple[str, dict[str, Any], int]:
        """The first queued call; consecutive metric calls are merged into one (at most 1000 metrics a batch)."""
        op, kwargs = self.pending[0]
        if op != "metrics":
            return op, kwargs, 1
        rows, n = [], 0
        for other, kw in self.pending:
            if other != "metrics" or (rows and len(rows) + len(kw["rows"]) > 1000):
                break
            rows += kw["rows"]
            n += 1
        return op, {"rows": rows}, n

    def _flush(self) -> bool:
        """Send the queued calls in order; on the first failure keep it and the rest and warn once. True when all
        were sent."""
        while True:
            with self._cond:
                if not self.pending:
                    return True
                op, kwargs, n = self._take()
            try:
                getattr(self, f"_op_{op}")(**kwargs)
            except Exception as exc:
                if not self.warned:
                    self.warned = True
                    print(f"warning: MLflow at {self.client.tracking_uri} failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); training continues, every number stays "
                          "in the run directory (metrics.json, balance.jsonl), and the MLflow calls are sent again "
                          "every few seconds until training ends", file=sys.stderr, flush=True)
                return False
            with self._cond:
                del self.pending[:n]

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self.pending and not self._closing:
                    self._cond.wait()
                if not self.pending:
                    return
                # metrics wait up to send_every seconds so that they go out merged: one request, not one a step
                while (not self._closing and all(op == "metrics" for op, _ in self.pending)
                       and time.monotonic() < self._sent + self.send_every):
                    self._cond.wait(timeout=self._sent + self.send_every - time.monotonic())
                self._sent = time.monotonic()
            if not self._flush():  # the server is unreachable: try again in retry_seconds, give up after close
                until = time.monotonic() + self.retry_seconds
                with self._cond:
                    while True:
                        if self._closing and time.monotonic() > self._deadline:
                            return
                        remaining = until - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(timeout=remaining)

    def _op_start(self, config: dict[str, Any]) -> None:
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(self.experiment)
            run = self.client.create_run(exp_id, run_name=self.run_name or self.run_dir.name,
                                         tags={"recmtl.run_dir": str(self.run_dir)})
            self.run_id = run.info.run_id
            self._write_run_file()
            from mlflow.entities import Param
            params = [Param(k, v[:6000]) for k, v in flatten(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        else:  # --resume: the same run goes on (params stay as logged; metrics continue at the next steps)
            self.client.update_run(self.run_id, status="RUNNING")

    def _op_metrics(self, rows: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric
        metrics = [Metric(k, v, timestamp, step) for k, v, step, timestamp in rows]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._queue("metrics", rows=[(k, v, step, now) for k, v in values.items()])

    def _op_artifacts(self, files: list[str], folders: dict[str, str]) -> None:
        for f in files:
            self.client.log_artifact(self.run_id, f)
        for path, name in folders.items():
            self.client.log_artifacts(self.run_id, path, name)

    def _op_end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)

    def _write_run_file(self) -> None:
        path = self.run_dir / RUN_FILE
        tmp = path.with_name(f".{RUN_FILE}.tmp")
        tmp.write_text(json.dumps({"tracking_uri": self.client.tracking_uri, "run_id": self.run_id,
                                   "experiment": self.experiment}))
        os.replace(tmp, path)

    # -- the life-cycle hooks --------------------------------------------------------------------------------
    @hookimpl
    def recmtl_train_start(self, run: Any) -> None:
        self.run_dir = Path(run.run_dir)
        saved = self.run_dir / RUN_FILE
        if saved.is_file():  # --resume: the same MLflow run
            self.run_id = json.loads(saved.read_text()).get("run_id")
        self._queue("start", config=run.config.model_dump(mode="json", exclude_none=True))
        self._thread = threading.Thread(target=self._work, name="recmtl-mlflow-logger", daemon=True)
        self._thread.start()

    @hookimpl
    def recmtl_step_logged(self, step: int, record: dict[str, Any]) -> None:
        values = {f"step/{group}/{name}": float(v) for group in ("losses", "weights", "grad_norms", "cosine")
                  for name, v in (record.get(group) or {}).items() if isinstance(v, (int, float))}
        self._metrics(values, step)

    @hookimpl
    def recmtl_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        self._metrics(epoch_metrics(metrics), epoch)

    @hookimpl
    def recmtl_train_end(self, run: Any, metrics: dict[str, Any]) -> None:
        test = {f"test/{t}/{k}": float(v) for t, vals in (metrics.get("test") or {}).items()
                for k, v in vals.items() if isinstance(v, (int, float))}
        if test:
            self._metrics(test, int(metrics.get("best_epoch") or 0))
        files = [str(p) for p in sorted(self.run_dir.iterdir())
                 if p.is_file() and not p.name.startswith(".") and p.suffix != ".pt" and p.stat().st_size < SMALL_FILE_BYTES]
        folders = {}
        if self.report:
            try:
                folders[str(Path(run.write_report()).parent)] = "report"
            except Exception as exc:  # e.g. matplotlib (the report extra) missing
                print(f"warning: mlflow logger: no report ({exc})", file=sys.stderr)
        self._queue("artifacts", files=files, folders=folders)
        self._queue("end", status="FINISHED")
        self.finished = True

    def close(self) -> None:
        """Wait for the queue to drain (at most ``close_timeout`` seconds while the server is unreachable)."""
        if not self.finished and self.run_dir is not None:  # training failed or was interrupted
            self._queue("end", status="KILLED")
        if self._thread is None:
            return
        with self._cond:
            self._closing = True
            self._deadline = time.monotonic() + self.close_timeout
            self._cond.notify()
        self._thread.join()


@hookimpl
def recmtl_register_loggers() -> dict[str, type[Logger]]:
    return {"mlflow": MLflowLogger}
