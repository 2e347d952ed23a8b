"""Post-hoc calibration of probability scores, the negative-downsampling correction, and score fusion.

A task's final score is ``calibrator(corrected(p))``: the model's probability ``p``, corrected for negative
downsampling at rate ``w`` (``tasks[].negative_sampling_rate``: ``p' = p / (p + (1 - p) / w)``, i.e. the odds times
``w``, TorchRec's recalibration), then mapped by the task's calibrator when ``recmtl calibrate`` stored one in the run
directory (``calibrator.json``, plain JSON, never a pickle). Methods: ``isotonic`` (a monotone piecewise-linear map
through breakpoints, scikit-learn's ``IsotonicRegression``), ``platt`` (``sigmoid(a * logit(p) + b)``, Platt 1999) and
``temperature`` (``sigmoid(logit(p) / T)``, Guo et al. 2017). The numpy arithmetic here is the reference; the exported
ONNX graph computes the same (``recmtl.export.graph``) and the parity check compares the two.

Fusion: ``fuse_expression("click^1.0 * conversion^0.5", tasks)`` parses a ranking formula over task scores with
``ast`` and a whitelist (numbers, task names, ``+ - * / ^ **``, unary minus): no user string is ever evaluated.
"""
from __future__ import annotations

import ast
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recmtl.errors import ConfigError, DataError

METHODS = ("isotonic", "platt", "temperature")
#: heads whose score is one probability per row, which a calibrator may map
CALIBRATED_HEADS = ("binary", "esmm")
FORMAT = 1
#: probabilities are clipped to [EPS, 1 - EPS] before a logit
EPS = 1e-7
#: the output name of a fused ranking score
FUSED_OUTPUT = "ranking_score"


#: the clip bounds as float32 values, the graph's own (float32(1 - 1e-7) is 1 - 1.19e-7)
_LOW, _HIGH = float(np.float32(EPS)), float(np.float32(1 - EPS))


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _LOW, _HIGH)
    return np.log(p) - np.log1p(-p)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def correct_downsampling(p: np.ndarray, rate: float) -> np.ndarray:
    """Scores of a model trained with negatives kept at ``rate`` mapped to the full data's base rate:
    ``p / (p + (1 - p) / rate)`` (identity at rate 1)."""
    if rate == 1.0:
        return p
    p = np.asarray(p, np.float64)
    return p * rate / (p * rate + (1.0 - p))


def check_sampling_rate(rate: float, task: str) -> float:
    """``rate`` when it is in (0, 1]; else the ConfigError naming ``task``."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < float(rate) <= 1:
        raise ConfigError(f"tasks[{task}].negative_sampling_rate must be in (0, 1] (the fraction of negatives kept "
                          f"in the training data), got {rate!r}")
    return float(rate)


@dataclass
class TaskCalibrator:
    """One task's fitted map from probability to calibrated probability. ``params``: isotonic ``x``/``y`` (increasing
    breakpoints, linear in between, clipped outside), platt ``a``/``b``, temperature ``temperature``."""

    method: str
    params: dict[str, Any]

    def apply(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, np.float64)
        if self.method == "isotonic":
            return np.interp(p, self.params["x"], self.params["y"])
        if self.method == "platt":
            return sigmoid(self.params["a"] * logit(p) + self.params["b"])
        return sigmoid(logit(p) / self.params["temperature"])

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, **self.params}

    @classmethod
    def from_json(cls, entry: dict[str, Any], where: str) -> TaskCalibrator:
        method = entry.get("method")
        keys = {"isotonic": ("x", "y"), "platt": ("a", "b"), "temperature": ("temperature",)}.get(method)
        if keys is None or any(k not in entry for k in keys):
            raise DataError(f"{where}: not a calibrator recmtl wrote (method {method!r}); run `recmtl calibrate` again")
        return cls(method, {k: entry[k] for k in keys})


def fit_calibrator(method: str, label: np.ndarray, score: np.ndarray) -> TaskCalibrator:
    """Fit ``method`` on held-out probabilities ``score`` and 0/1 ``label`` (both classes present)."""
    label = np.asarray(label, np.float64)
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(np.asarray(score, np.float64), label)
        x, y = iso.X_thresholds_.astype(np.float32), iso.y_thresholds_
        keep = np.concatenate([[True], np.diff(x) > 0])  # strictly increasing in float32, as the graph computes
        x, y = x[keep].astype(np.float64), y[keep]
        if len(x) == 1:  # one breakpoint: a constant
            x, y = np.array([0.0, 1.0]), np.array([y[0], y[0]])
        return TaskCalibrator("isotonic", {"x": x.tolist(), "y": y.tolist()})
    z = logit(score)
    if method == "platt":
        from sklearn.linear_model import LogisticRegression
        lr = LogisticRegression(C=1e6, max_iter=1000).fit(z.reshape(-1, 1), label.astype(np.int64))
        return TaskCalibrator("platt", {"a": float(lr.coef_[0, 0]), "b": float(lr.intercept_[0])})
    if method == "temperature":
        from scipy.optimize import minimize_scalar

        def nll(log_t: float) -> float:
            q = np.clip(sigmoid(z / math.exp(log_t)), EPS, 1 - EPS)
            return float(-np.mean(label * np.log(q) + (1 - label) * np.log1p(-q)))
        res = minimize_scalar(nll, bounds=(-5.0, 5.0), method="bounded")
        return TaskCalibrator("temperature", {"temperature": float(math.exp(res.x))})
    raise ConfigError(f"--method {method!r}: use one of {', '.join(METHODS)}")


@dataclass
class ScoreMap:
    """What turns a model's raw task scores into its final ones: the downsampling correction per task (rate < 1)
    and the calibrators, applied in that order."""

    rates: dict[str, float] = field(default_factory=dict)
    calibrators: dict[str, TaskCalibrator] = field(default_factory=dict)
    #: where the calibrators were fitted (``recmtl calibrate``'s data, method, rows), for metadata and messages
    info: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.calibrators) or any(r != 1.0 for r in self.rates.values())

    def task(self, t: str, p: np.ndarray) -> np.ndarray:
        out = correct_downsampling(p, self.rates.get(t, 1.0))
        if t in self.calibrators:
            out = self.calibrators[t].apply(out)
        return out

    def apply(self, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``scores`` with each corrected/calibrated task mapped (float32, as the model's scores); others as given."""
        return {t: self.task(t, s).astype(np.float32) if t in self.calibrators or self.rates.get(t, 1.0) != 1.0 else s
                for t, s in scores.items()}

    def without_calibrators(self) -> ScoreMap:
        return ScoreMap(dict(self.rates))

    def describe(self) -> dict[str, Any]:
        """The metadata form: rates below 1 and each calibrator, with where it was fitted."""
        return {"negative_sampling_rate": {t: r for t, r in self.rates.items() if r != 1.0},
                "calibrators": {t: c.to_json() for t, c in self.calibrators.items()}, **self.info}


def write_calibrators(path: Path, calibrators: dict[str, TaskCalibrator], info: dict[str, Any]) -> None:
    """``calibrator.json``: the format, where it was fitted (``info``) and one entry per task, written atomically."""
    from recmtl.files import write_json
    write_json(path, {"format": FORMAT, **info, "tasks": {t: c.to_json() for t, c in calibrators.items()}})


def read_calibrators(path: Path) -> tuple[dict[str, TaskCalibrator], dict[str, Any]]:
    """The calibrators of ``calibrator.json`` and its other fields; ``DataError`` when it is not one."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not readable JSON ({exc}); delete it or run `recmtl calibrate` again") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("tasks"), dict):
        raise DataError(f"{path} is not a calibrator file recmtl wrote (format {FORMAT}); run `recmtl calibrate` again")
    cals = {t: TaskCalibrator.from_json(e if isinstance(e, dict) else {}, f"{path} task '{t}'")
            for t, e in raw["tasks"].items()}
    return cals, {k: v for k, v in raw.items() if k not in ("format", "tasks")}


# ---- score fusion --------------------------------------------------------------------------------------------
_BINOPS = {ast.Add: "Add", ast.Sub: "Sub", ast.Mult: "Mul", ast.Div: "Div", ast.Pow: "Pow"}


@dataclass
class Fusion:
    """A parsed fusion expression: ``tree`` holds only numbers, task names and the whitelisted operators."""

    text: str
    tree: ast.expr
    tasks: list[str]

    def evaluate(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """The fused score from per-task scores (numpy, float64), the reference for the graph's nodes."""
        def ev(node: ast.expr) -> Any:
            if isinstance(node, ast.Constant):
                return float(node.value)
            if isinstance(node, ast.Name):
                return np.asarray(scores[node.id], np.float64)
            if isinstance(node, ast.UnaryOp):
                return -ev(node.operand)
            left, right = ev(node.left), ev(node.right)
            op = _BINOPS[type(node.op)]
            with np.errstate(all="ignore"):
                return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
                        "Pow": np.power}[op](left, right)
        return np.broadcast_to(ev(self.tree), np.shape(next(iter(scores.values())))).astype(np.float64)


def fuse_expression(text: str, tasks: Iterable[str]) -> Fusion:
    """Parse ``text`` (``^`` is a power, as ``**``) over the task names ``tasks``; ConfigError for a syntax error, an
    unknown name or anything but numbers, names, ``+ - * / ^`` and parentheses."""
    tasks = list(tasks)
    where = f"--fuse {text!r}"
    try:
        tree = ast.parse(text.replace("^", "**").strip(), mode="eval").body
    except SyntaxError as exc:
        raise ConfigError(f"{where} is not a valid expression ({exc.msg}); write e.g. 'click^1.0 * conversion^0.5'") from None
    used: list[str] = []

    def check(node: ast.AST) -> None:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return
        if isinstance(node, ast.Name):
            if node.id not in tasks:
                raise ConfigError(f"{where} names '{node.id}', which is not a task with one score per row "
                                  f"(tasks: {', '.join(tasks) or 'none'})")
            used.append(node.id)
            return
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            check(node.operand)
            return
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            check(node.left)
            check(node.right)
            return
        shown = ast.get_source_segment(text.replace("^", "**"), node) or type(node).__name__
        raise ConfigError(f"{where}: '{shown}' is not allowed; use task names, numbers, + - * / ^ and parentheses")
    check(tree)
    if not used:
        raise ConfigError(f"{where} names no task (tasks: {', '.join(tasks)})")
    return Fusion(text, _strip_uadd(tree), list(dict.fromkeys(used)))


def _strip_uadd(node: ast.expr) -> ast.expr:
    """The tree without unary plus (so every UnaryOp left is a minus)."""
    if isinstance(node, ast.UnaryOp):
        inner = _strip_uadd(node.operand)
        return inner if isinstance(node.op, ast.UAdd) else ast.UnaryOp(ast.USub(), inner)
    if isinstance(node, ast.BinOp):
        return ast.BinOp(_strip_uadd(node.left), node.op, _strip_uadd(node.right))
    return node
