"""The exported model's metadata: its inputs (``recmtl.serving.wire``), tasks and scores, versions and the run's
metrics, stored in ``metadata_props``."""
from __future__ import annotations

import json
import time
from typing import Any

import torch

import recmtl
from recmtl.calibration import FUSED_OUTPUT, Fusion
from recmtl.export.graph import OPSET
from recmtl.rundir import RunDir
from recmtl.serving.wire import FORMAT, METADATA_KEY, MISSING_VALUES, ModelInput
from recmtl.training.evaluate import LoadedRun


def model_inputs(run: LoadedRun) -> list[ModelInput]:
    inputs = [ModelInput(c.name, "int64" if c.value_type == "int" else "string") for c in run.schema.categorical]
    inputs += [ModelInput(d.name, "float32") for d in run.schema.dense]
    inputs += [ModelInput(i.name, "float32", (i.channels, i.height, i.width), "image") for i in run.schema.image]
    inputs += [ModelInput(s.name, "int64" if s.value_type == "int" else "string", (s.max_length,), "sequence")
               for s in run.schema.sequence]
    return inputs + [ModelInput(t.name, "string", (), "text") for t in run.schema.text]


def metadata(run: LoadedRun, inputs: list[ModelInput], fusion: Fusion | None = None) -> dict[str, str]:
    metrics = RunDir(run.run_dir).read_metrics(required=False)
    def task_entry(t: Any) -> dict[str, Any]:
        head = run.model.heads[t.name]
        entry = {"name": t.name, "label": t.label, "head": t.head,
                 "score": "probability" if t.head in ("binary", "esmm") else "value"}
        if head.label_type in ("class", "multi"):
            entry["score"] = "class probabilities" if head.label_type == "class" else "attribute probabilities"
            entry["width"] = len(head.task.classes)  # the model's dry run checked predict's width against it
            entry["classes"] = [c if isinstance(c, (int, str)) else str(c) for c in head.task.classes]
        if t.negative_sampling_rate != 1.0:
            entry["negative_sampling_rate"] = t.negative_sampling_rate
        if t.name in run.scores.calibrators:
            entry["calibrator"] = run.scores.calibrators[t.name].method
        return entry

    schema = {
        "format": FORMAT,
        "inputs": [i.to_metadata() for i in inputs],
        "missing_values": MISSING_VALUES,
        "tasks": [task_entry(t) for t in run.config.tasks],
    }
    if fusion is not None:  # an output like a task's, so score and serve return it with the others
        schema["tasks"].append({"name": FUSED_OUTPUT, "label": fusion.text, "head": "fusion",
                                "score": "ranking score", "expression": fusion.text, "tasks": fusion.tasks})
    calibration = {k: v for k, v in run.scores.describe().items() if k not in ("reliability", "metrics")}
    return {
        METADATA_KEY: json.dumps(schema),
        "recmtl.version": recmtl.__version__,
        "torch.version": torch.__version__,
        "onnx.opset": str(OPSET),
        "recmtl.metrics": json.dumps({k: metrics.get(k) for k in ("monitor", "best_epoch", "validation", "test", "task_best")
                                      if k in metrics}),
        "recmtl.epochs": json.dumps(run.epochs or {}),  # the epoch (1-based) each task's scores come from
        "recmtl.created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # downsampling corrections and calibrators inside the graph, where they were fitted; the fusion expression
        "recmtl.calibration": json.dumps({**calibration, "fusion": fusion.text if fusion is not None else None}),
    }


