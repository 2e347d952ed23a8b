"""Post-hoc calibration of probability scores, the negative-downsampling correction, and score fusion.

Everything acts on the **logit** ``z`` of a task's score, never on its float32 probability: the raw output of a
``binary`` or ``multilabel`` head (its logit as the network computed it), or ``logit(p)`` of an ``esmm`` head's
pCTCVR (a product of two probabilities, which has no logit of its own). A task's final score is
``calibrator(z + log w)``: the downsampling correction for negatives kept at rate ``w``
(``tasks[].negative_sampling_rate``; odds times ``w``, i.e. ``p' = p / (p + (1 - p) / w)``, TorchRec's
recalibration) is an addition on the logit, then the task's calibrator when ``recmtl calibrate`` stored one in the run
directory (``calibrator.json``, plain JSON, never a pickle) maps the logit to a probability: ``platt``
(``sigmoid(a * z + b)``, Platt 1999), ``temperature`` (``sigmoid(z / T)``, Guo et al. 2017) or ``isotonic``
(scikit-learn's isotonic regression of the labels on ``z``, as a monotone piecewise-linear map whose knots are the
pooled blocks' mean logits, with no segment steeper than ``ISOTONIC_MAX_SLOPE``); without a calibrator the final
score is ``sigmoid(z + log w)``. A multilabel task gets one calibrator per attribute. The numpy arithmetic (float64)
here is the reference; the exported ONNX graph computes the same in float32 (``recmtl.export.graph``) and the parity
check compares the two. A float32 logit keeps its relative precision where a float32 probability near 0 or 1 has
none, so the graph and the reference agree to ~1e-7 at every score, 1e-7 and 1 - 1e-7 included.

``calibrator.json`` (format 2) records the checkpoint each task's calibrator was fitted on (file, epoch, SHA-256);
applying it to another checkpoint is refused (``check_binding``). Format-1 files (calibrators on probabilities,
before the logit and the binding) are refused with a message to calibrate again.

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
#: heads whose score is a probability per row (per attribute for multilabel), which a calibrator may map
CALIBRATED_HEADS = ("binary", "esmm", "multilabel")
#: heads whose raw output (``forward``) is the logit of their score; an esmm head's is its probability
LOGIT_HEADS = ("binary", "multilabel")
FORMAT = 2
#: esmm probabilities are clipped to [EPS, 1 - EPS] (as float32) before their logit
EPS = 1e-7
#: the steepest an isotonic segment may be, in probability per unit of logit (4x the identity map's 0.25 at p = 0.5):
#: steeper segments would magnify the ~1e-7 float32 difference between PyTorch's and onnxruntime's logits past 1e-6
ISOTONIC_MAX_SLOPE = 1.0
#: the output name of a fused ranking score
FUSED_OUTPUT = "ranking_score"


#: the clip bounds as float32 values, the graph's own (float32(1 - 1e-7) is 1 - 1.19e-7)
_LOW, _HIGH = float(np.float32(EPS)), float(np.float32(1 - EPS))


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _LOW, _HIGH)
    return np.log(p) - np.log1p(-p)


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


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
    """One score column's fitted map from logit to calibrated probability. ``params``: isotonic ``x``/``y`` (knots on
    the logit, strictly increasing and exact in float32; linear in between, constant outside), platt ``a``/``b``,
    temperature ``temperature``."""

    method: str
    params: dict[str, Any]

    def apply_logit(self, z: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (float64) of logits ``z``."""
        z = np.asarray(z, np.float64)
        if self.method == "isotonic":
            return np.interp(z, self.params["x"], self.params["y"])
        if self.method == "platt":
            return sigmoid(self.params["a"] * z + self.params["b"])
        return sigmoid(z / self.params["temperature"])

    def apply(self, p: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of probabilities ``p`` (through their logit)."""
        return self.apply_logit(logit(p))

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, **self.params}

    @classmethod
    def from_json(cls, entry: dict[str, Any], where: str) -> TaskCalibrator:
        method = entry.get("method")
        keys = {"isotonic": ("x", "y"), "platt": ("a", "b"), "temperature": ("temperature",)}.get(method)
        if keys is None or any(k not in entry for k in keys):
            raise DataError(f"{where}: not a calibrator recmtl wrote (method {method!r}); run `recmtl calibrate` again")
        return cls(method, {k: entry[k] for k in keys})


@dataclass
class AttributeCalibrators:
    """A multilabel task's calibrators, one per attribute (``attributes``: name -> calibrator, in column order)."""

    method: str
    attributes: dict[str, TaskCalibrator]

    def apply_logit(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, np.float64).reshape(len(z), -1)
        return np.stack([c.apply_logit(z[:, k]) for k, c in enumerate(self.attributes.values())], axis=1)

    def apply(self, p: np.ndarray) -> np.ndarray:
        return self.apply_logit(logit(p))

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "attributes": {a: c.params for a, c in self.attributes.items()}}

    @classmethod
    def from_json(cls, entry: dict[str, Any], where: str) -> AttributeCalibrators:
        attrs = entry.get("attributes")
        if not isinstance(attrs, dict) or not attrs:
            raise DataError(f"{where}: not a calibrator recmtl wrote (no attributes); run `recmtl calibrate` again")
        return cls(str(entry.get("method")), {a: TaskCalibrator.from_json({"method": entry.get("method"), **(e or {})},
                                                                            f"{where} attribute '{a}'")
                                               for a, e in attrs.items()})


Calibrator = TaskCalibrator | AttributeCalibrators


def _isotonic_knots(z: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knots ``(x, y)`` of the isotonic map on the logit: scikit-learn's isotonic regression (pool adjacent
    violators) of ``label`` on ``z``; each block of rows with one fitted value becomes the knot (its mean logit, its
    mean label), and adjacent blocks are pooled while a segment between knots is steeper than ``ISOTONIC_MAX_SLOPE``
    (or two knots round to one float32). Pooling adjacent blocks of a monotone fit keeps it monotone."""
    from sklearn.isotonic import isotonic_regression
    values, inverse, counts = np.unique(z, return_inverse=True, return_counts=True)
    fitted = isotonic_regression(np.bincount(inverse, weights=label) / counts, sample_weight=counts,
                                 y_min=0.0, y_max=1.0, increasing=True)
    block = np.cumsum(np.concatenate([[True], np.diff(fitted) != 0])) - 1
    w = np.bincount(block, weights=counts)
    cx = np.bincount(block, weights=values * counts) / w
    cy = np.bincount(block, weights=fitted * counts) / w
    while len(w) > 1:
        dx = np.diff(cx.astype(np.float32).astype(np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(dx > 0, np.diff(cy) / np.where(dx > 0, dx, 1.0), np.inf)
        i = int(np.argmax(slope))
        if slope[i] <= ISOTONIC_MAX_SLOPE:
            break
        total = w[i] + w[i + 1]
        cx[i] = (cx[i] * w[i] + cx[i + 1] * w[i + 1]) / total
        cy[i] = (cy[i] * w[i] + cy[i + 1] * w[i + 1]) / total
        w[i] = total
        cx, cy, w = np.delete(cx, i + 1), np.delete(cy, i + 1), np.delete(w, i + 1)
    x = cx.astype(np.float32).astype(np.float64)
    if len(x) == 1:  # one block: a constant
        return np.array([x[0], x[0] + 1.0]), np.array([cy[0], cy[0]])
    return x, cy


def fit_calibrator(method: str, label: np.ndarray, z: np.ndarray) -> TaskCalibrator:
    """Fit ``method`` on held-out logits ``z`` and 0/1 ``label`` (both classes present)."""
    label = np.asarray(label, np.float64)
    z = np.asarray(z, np.float64)
    if method == "isotonic":
        x, y = _isotonic_knots(z, label)
        return TaskCalibrator("isotonic", {"x": x.tolist(), "y": y.tolist()})
    if method == "platt":
        from sklearn.linear_model import LogisticRegression
        lr = LogisticRegression(C=1e6, max_iter=1000).fit(z.reshape(-1, 1), label.astype(np.int64))
        return TaskCalibrator("platt", {"a": float(lr.coef_[0, 0]), "b": float(lr.intercept_[0])})
    if method == "temperature":
        from scipy.optimize import minimize_scalar

        def nll(log_t: float) -> float:
            q = np.clip(sigmoid(z / math.exp(log_t)), 1e-12, 1 - 1e-12)
            return float(-np.mean(label * np.log(q) + (1 - label) * np.log1p(-q)))
        res = minimize_scalar(nll, bounds=(-5.0, 5.0), method="bounded")
        return TaskCalibrator("temperature", {"temperature": float(math.exp(res.x))})
    raise ConfigError(f"--method {method!r}: use one of {', '.join(METHODS)}")


@dataclass
class ScoreMap:
    """What turns a model's raw task outputs into its final scores: the downsampling correction per task (rate < 1)
    and the calibrators, both on the logit. ``logit_tasks``: the tasks whose raw output is their logit
    (``LOGIT_HEADS``); the others' logits are taken of their probabilities."""

    rates: dict[str, float] = field(default_factory=dict)
    calibrators: dict[str, Calibrator] = field(default_factory=dict)
    #: where the calibrators were fitted (``recmtl calibrate``'s data, method, rows, checkpoint), for metadata
    info: dict[str, Any] = field(default_factory=dict)
    logit_tasks: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.calibrators) or any(r != 1.0 for r in self.rates.values())

    @property
    def mapped(self) -> list[str]:
        """The tasks this map changes."""
        return list(dict.fromkeys([*(t for t, r in self.rates.items() if r != 1.0), *self.calibrators]))

    def logit(self, t: str, p: np.ndarray, raw: np.ndarray | None = None) -> np.ndarray:
        """Task ``t``'s logit (float64): its raw output ``raw`` when that is the logit, else ``logit(p)``."""
        return np.asarray(raw, np.float64) if raw is not None and t in self.logit_tasks else logit(p)

    def task(self, t: str, p: np.ndarray, raw: np.ndarray | None = None) -> np.ndarray:
        """Task ``t``'s final scores (float64) from its probabilities ``p`` (and raw outputs ``raw``, see ``logit``)."""
        rate = self.rates.get(t, 1.0)
        if t not in self.calibrators and rate == 1.0:
            return np.asarray(p, np.float64)
        z = self.logit(t, p, raw)
        if rate != 1.0:
            z = z + math.log(rate)
        return self.calibrators[t].apply_logit(z) if t in self.calibrators else sigmoid(z)

    def apply(self, scores: dict[str, np.ndarray], raw: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """``scores`` with each corrected/calibrated task mapped (float32, as the model's scores); others as given."""
        raw = raw or {}
        mapped = set(self.mapped)
        return {t: self.task(t, s, raw.get(t)).astype(np.float32) if t in mapped else s for t, s in scores.items()}

    def without_calibrators(self) -> ScoreMap:
        return ScoreMap(dict(self.rates), logit_tasks=set(self.logit_tasks))

    def describe(self) -> dict[str, Any]:
        """The metadata form: rates below 1 and each calibrator, with where it was fitted."""
        return {"negative_sampling_rate": {t: r for t, r in self.rates.items() if r != 1.0}, "scale": "logit",
                "calibrators": {t: c.to_json() for t, c in self.calibrators.items()}, **self.info}


def write_calibrators(path: Path, calibrators: dict[str, Calibrator], info: dict[str, Any]) -> None:
    """``calibrator.json``: the format, where it was fitted (``info``: with ``bound``, each task's checkpoint) and one
    entry per task, written atomically."""
    from recmtl.files import write_json
    write_json(path, {"format": FORMAT, "scale": "logit", **info,
                      "tasks": {t: c.to_json() for t, c in calibrators.items()}})


def read_calibrators(path: Path) -> tuple[dict[str, Calibrator], dict[str, Any]]:
    """The calibrators of ``calibrator.json`` and its other fields; ``DataError`` when it is not one, or an older
    format."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not readable JSON ({exc}); delete it or run `recmtl calibrate` again") from None
    if isinstance(raw, dict) and raw.get("format") == 1:
        raise DataError(f"{path} is a format-1 calibrator file (calibrators on probabilities, not bound to a "
                        f"checkpoint) from an older recmtl; run `recmtl calibrate` again to write format {FORMAT}, or "
                        "pass --no-calibration")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("tasks"), dict):
        raise DataError(f"{path} is not a calibrator file recmtl wrote (format {FORMAT}); run `recmtl calibrate` again")
    cals: dict[str, Calibrator] = {}
    for t, e in raw["tasks"].items():
        e = e if isinstance(e, dict) else {}
        where = f"{path} task '{t}'"
        cals[t] = AttributeCalibrators.from_json(e, where) if "attributes" in e else TaskCalibrator.from_json(e, where)
    return cals, {k: v for k, v in raw.items() if k not in ("format", "tasks", "scale")}


def check_binding(path: Path, info: dict[str, Any], tasks: Iterable[str], states: dict[str, dict[str, Any]],
                  checkpoint: str) -> None:
    """Refuse (``DataError``) to apply a task's calibrator to a checkpoint other than the one it was fitted on:
    ``info["bound"]`` (``calibrator.json``) and ``states`` (the loaded run's, ``--checkpoint checkpoint``) map a task
    to ``{"file", "epoch", "sha256"}``; the SHA-256 of the checkpoint file decides."""
    bound = info.get("bound")
    if not isinstance(bound, dict):
        raise DataError(f"{path} does not record the checkpoint its calibrators were fitted on; run `recmtl calibrate` "
                        "again, or pass --no-calibration")

    def show(s: dict[str, Any]) -> str:
        epoch = f"epoch {s['epoch']}, " if s.get("epoch") is not None else ""
        return f"{s.get('file')} ({epoch}sha256 {str(s.get('sha256'))[:12]})"
    for t in tasks:
        was, now = bound.get(t), states.get(t)
        if not isinstance(was, dict) or now is None or was.get("sha256") != now.get("sha256"):
            raise DataError(f"{path}: task '{t}' was calibrated on checkpoint "
                            f"{show(was) if isinstance(was, dict) else 'unknown'} but is scored here by "
                            f"{show(now or {})}; run `recmtl calibrate RUN_DIR --checkpoint {checkpoint} ...` for the "
                            "checkpoint you score with, or pass --no-calibration")


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


def fuse_expression(text: str, tasks: Iterable[str], where: str = "--fuse") -> Fusion:
    """Parse ``text`` (``^`` is a power, as ``**``) over the task names ``tasks``; ConfigError (naming ``where``, the
    option or config key) for a syntax error, an unknown name or anything but numbers, names, ``+ - * / ^`` and
    parentheses."""
    tasks = list(tasks)
    where = f"{where} {text!r}"
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
