"""``recmtl export --mlflow``: the exported ONNX model logged with MLflow's ONNX flavour and registered in the
model registry, into the MLflow run that the ``mlflow`` logger recorded in ``RUN_DIR/mlflow.json``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from recmtl.errors import ConfigError, RecmtlError

#: written by the ``mlflow`` logger (``recmtl_plugins/loggers/mlflow_logger.py``): tracking URI and run id
MLFLOW_RUN_FILE = "mlflow.json"


def log_onnx_model(run_dir: Path, model_path: Path, registered_name: str) -> dict[str, Any]:
    """Log ``model_path`` to MLflow (the run of ``RUN_DIR/mlflow.json``, else a new run under ``MLFLOW_TRACKING_URI``)
    and register it as ``registered_name``; returns ``{tracking_uri, run_id, model_uri, version}``."""
    try:
        import mlflow
        import mlflow.onnx
    except ImportError:
        raise ConfigError("--mlflow needs the mlflow package: pip install 'recmtl[mlflow]'") from None
    import onnx
    info_file = Path(run_dir) / MLFLOW_RUN_FILE
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    uri = info.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    if uri:
        mlflow.set_tracking_uri(uri)
    try:
        run_args = {"run_id": info["run_id"]} if info.get("run_id") else {"run_name": Path(run_dir).name}
        with mlflow.start_run(**run_args) as run:
            logged = mlflow.onnx.log_model(onnx.load(str(model_path)), name="model", registered_model_name=registered_name,
                                           pip_requirements=["onnxruntime"], save_as_external_data=False)
        version = getattr(logged, "registered_model_version", None)
        return {"tracking_uri": mlflow.get_tracking_uri(), "run_id": run.info.run_id, "model_uri": logged.model_uri,
                "version": version}
    except RecmtlError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ConfigError(f"--mlflow: logging the model to MLflow at {mlflow.get_tracking_uri()} failed ({first}); "
                          f"{model_path} is written, run the export again with --mlflow once the server is up") from None
