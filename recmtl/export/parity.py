"""The parity check: onnxruntime's scores of the exported file against PyTorch's on sample rows. Scores are
compared with a relative and an absolute tolerance, as ``numpy.isclose`` does: probabilities are bounded,
but a regression output (watch time in seconds, a price) is not, and float32 arithmetic in a different order
differs by a few units in the last place of the value, whatever its size."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from recmtl.calibration import FUSED_OUTPUT, Fusion
from recmtl.serving.score import Scorer
from recmtl.training.evaluate import LoadedRun

#: absolute tolerance: what a difference may be on scores near 0 (probabilities, standardised values)
PARITY_ATOL = 1e-4
#: relative tolerance: what a difference may be per unit of the score's size (float32 epsilon is 1.2e-7)
PARITY_RTOL = 1e-5


def parity_failures(diffs: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The tasks whose scores differ beyond ``PARITY_ATOL + PARITY_RTOL * |torch score|`` somewhere."""
    return {t: d for t, d in diffs.items() if not d["excess"] <= 0}


def parity(run: LoadedRun, model_path: Path, sample: pa.Table, fusion: Fusion | None = None) -> dict[str, dict[str, float]]:
    """Per task, between onnxruntime and PyTorch on ``sample`` rows: the largest absolute difference (``max_abs``),
    the largest relative one (``max_rel``, per unit of ``max(|torch score|, 1)``) and how far the worst row exceeds its
    tolerance (``excess`` <= 0: within it everywhere). A task whose score the graph maps (``run.scores``: downsampling
    correction, calibrator) is checked three times, the worst counting: the model's raw output (the logit, for a
    binary or multilabel head) against PyTorch's, the mapped output against ``run.scores`` (numpy) applied to that raw
    output, and the mapped output against ``run.scores`` applied to PyTorch's raw output (what ``evaluate`` returns);
    ``max_abs`` and ``max_rel`` are then the scores' differences, ``excess`` the worst of the three.
    With ``fusion`` the ``ranking_score`` output is checked against ``Fusion.evaluate`` of the graph's task scores."""
    import onnx
    import onnxruntime as ort

    from recmtl.serving.score import to_feeds
    mapped = [t for t in run.model.task_names if t in run.scores.mapped]
    scorer = Scorer(model_path)
    proto = onnx.load(str(model_path))
    raw_names = {t: f"recmtl_{t}_raw" for t in mapped}
    for name in raw_names.values():
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    names = [*scorer.tasks, *raw_names.values()]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip(names, session.run(names, to_feeds(sample, scorer.inputs))))
    arrays = run.schema.transform(sample, labels=False)
    with torch.no_grad():
        torch_raw, torch_scores = run.model.run({k: torch.from_numpy(v) for k, v in arrays.inputs.items()})
    out = {}
    for t in run.model.task_names:
        want = torch_scores[t].numpy()
        if t not in raw_names:
            out[t] = score_differences(got[t], want)
            continue
        raw = got[raw_names[t]]
        model_diff = score_differences(raw, torch_raw[t].numpy() if t in run.scores.logit_tasks else want)
        map_diff = score_differences(got[t], run.scores.task(t, raw, raw))
        end_diff = score_differences(got[t], run.scores.task(t, want, torch_raw[t].numpy()))
        # the raw output (a logit: its own units) counts against the tolerance; the differences reported are the scores'
        out[t] = {"max_abs": max(map_diff["max_abs"], end_diff["max_abs"]),
                  "max_rel": max(map_diff["max_rel"], end_diff["max_rel"]),
                  "excess": max(model_diff["excess"], map_diff["excess"], end_diff["excess"])}
    if fusion is not None:
        out[FUSED_OUTPUT] = score_differences(got[FUSED_OUTPUT], fusion.evaluate(
            {t: got[t].reshape(-1) for t in fusion.tasks}))
    return out


def score_differences(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    """``max_abs`` and ``max_rel`` (per unit of ``max(|want|, 1)``) differences of ``got`` to ``want``, and ``excess``:
    the largest ``|got - want| - (PARITY_ATOL + PARITY_RTOL * |want|)`` (<= 0: within tolerance everywhere; a NaN on
    either side where the other is not NaN counts as infinite)."""
    got, want = np.asarray(got, np.float64).reshape(-1), np.asarray(want, np.float64).reshape(-1)
    if not len(want):
        return {"max_abs": 0.0, "max_rel": 0.0, "excess": 0.0}
    both_nan = np.isnan(got) & np.isnan(want)
    diff = np.where(both_nan, 0.0, np.abs(got - want))
    diff = np.where(np.isnan(diff), np.inf, diff)
    excess = diff - (PARITY_ATOL + PARITY_RTOL * np.where(np.isnan(want), 0.0, np.abs(want)))
    scale = np.maximum(np.where(np.isnan(want), 1.0, np.abs(want)), 1.0)
    return {"max_abs": float(diff.max()), "max_rel": float((diff / scale).max()), "excess": float(excess.max())}
