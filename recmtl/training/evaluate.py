"""Predicting with a trained model and computing per-task metrics over each task's labelled rows."""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recmtl.calibration import CALIBRATED_HEADS, LOGIT_HEADS, ScoreMap, check_binding, read_calibrators
from recmtl.config import Config, parse_config, read_raw
from recmtl.data.parquet import ParquetSource
from recmtl.errors import DataError
from recmtl.registry import Registry, load_registry
from recmtl.rundir import BEST, CALIBRATOR, CONFIG, LAST, RunDir, epoch_checkpoint, require_trusted_plugins
from recmtl.schema import FittedSchema
from recmtl.training.batches import blocks, minibatches
from recmtl.training.model import MultiTaskModel, PerTaskModel, model_for_state


@dataclass
class Predictions:
    scores: dict[str, np.ndarray]  # task -> [n], or [n, K] for class/multilabel heads
    labels: np.ndarray  # [n, L]: one column per scalar task, K per multilabel task
    mask: np.ndarray  # [n, L] bool
    group: np.ndarray | None
    losses: dict[str, float]
    slices: dict[str, tuple[int, int, bool]] = field(default_factory=dict)  # MultiTaskModel.label_slices
    #: the heads' raw outputs of the tasks ``predict`` was asked for (``raw``): the logits the score map acts on
    raw: dict[str, np.ndarray] = field(default_factory=dict)
    #: with ``predict(units=True)``: the range of each task's head input over the rows (``UnitRange``)
    units: UnitRange | None = None

    def _slice(self, task: str) -> tuple[int, int, bool]:
        return self.slices.get(task) or (list(self.scores).index(task), 1, True)

    def task_label(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """The task's labels (``[n]``, or ``[n, K]`` with NaN for missing attributes) and its labelled rows
        (for a multilabel task: rows with at least one labelled attribute)."""
        start, width, scalar = self._slice(task)
        if scalar:
            return self.labels[:, start], self.mask[:, start]
        label = self.labels[:, start:start + width].copy()
        mask = self.mask[:, start:start + width]
        label[~mask] = np.nan
        return label, mask.any(1)

    def labelled(self, task: str) -> int:
        """Labelled entries of the task (rows; attribute values for a multilabel task): its loss weight."""
        start, width, _ = self._slice(task)
        return int(self.mask[:, start:start + width].sum())


class UnitRange:
    """Per-unit minimum and maximum of each task's head input (the tower's output for it) over the rows seen.

    A unit whose minimum equals its maximum is *dead*: constant on every row (a ReLU unit that is zero on all of
    them), so the head cannot use it. Fed by ``MultiTaskModel.run(observe=...)``; ranks' ranges combine with
    ``merge`` (min of minima, max of maxima), so the count is the same under torchrun as in one process."""

    def __init__(self) -> None:
        self.low: dict[str, np.ndarray] = {}
        self.high: dict[str, np.ndarray] = {}
        self.rows: dict[str, int] = {}

    @torch.no_grad()
    def update(self, hidden: dict[str, torch.Tensor]) -> None:
        """One batch of head inputs ``{task: [batch, ...]}`` (any dtype; the units are the columns of each row)."""
        for t, h in hidden.items():
            h = h.detach().float().reshape(h.shape[0], -1)
            if not h.shape[0]:
                continue
            lo, hi = h.amin(0).cpu().numpy(), h.amax(0).cpu().numpy()
            if t in self.low:
                np.minimum(self.low[t], lo, out=self.low[t])
                np.maximum(self.high[t], hi, out=self.high[t])
            else:
                self.low[t], self.high[t] = lo, hi
            self.rows[t] = self.rows.get(t, 0) + h.shape[0]

    @classmethod
    def merge(cls, parts: list[UnitRange]) -> UnitRange:
        out = cls()
        for part in parts:
            for t in part.low:
                if t in out.low:
                    out.low[t] = np.minimum(out.low[t], part.low[t])
                    out.high[t] = np.maximum(out.high[t], part.high[t])
                else:
                    out.low[t], out.high[t] = part.low[t].copy(), part.high[t].copy()
                out.rows[t] = out.rows.get(t, 0) + part.rows[t]
        return out

    def dead_units(self) -> dict[str, list[int]]:
        """``{task: [dead, units]}``: units constant on every row seen, of the head input's width; tasks seen on
        fewer than two rows (where every unit is constant) are left out."""
        return {t: [int((self.low[t] == self.high[t]).sum()), int(self.low[t].size)] for t in self.low
                if self.rows[t] >= 2}


@torch.no_grad()
def predict(model: MultiTaskModel, schema: FittedSchema, source: ParquetSource, batch_size: int,
            read_rows: int = 65_536, shard: tuple[int, int] | None = None, raw: Iterable[str] = (),
            units: bool = False) -> Predictions:
    """Score every row of ``source`` in order (labels are read too, for metrics and losses), on the
    model's device; ``shard=(rank, world)``: only this rank's share (see :func:`merge_predictions`); ``raw``: the
    tasks whose raw outputs (``Predictions.raw``) to keep as well; ``units``: track the range of each task's head
    input (``Predictions.units``, for the dead-unit count)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: dict[str, list[np.ndarray]] = {t: [] for t in model.task_names}
    raws: dict[str, list[np.ndarray]] = {t: [] for t in raw if t in model.task_names}
    labels, masks, groups = [], [], []
    loss_sum = {t: 0.0 for t in model.task_names}
    tracker = UnitRange() if units else None
    for batch in minibatches(blocks(source, schema, read_rows, shard=shard), batch_size):
        batch = batch.to(device) if device.type != "cpu" else batch
        outputs, preds = model.run(batch.inputs, None if tracker is None else tracker.update)
        for t in model.task_names:
            scores[t].append(preds[t].float().cpu().numpy())
            if t in raws:
                raws[t].append(outputs[t].float().cpu().numpy())
            label, mask = model.task_label(batch.labels, batch.mask, t)
            n_lab = float(mask.sum())
            if n_lab:
                loss_sum[t] += float(model.heads[t].loss(outputs[t], label, mask)) * n_lab
        labels.append(batch.labels.cpu().numpy())
        masks.append(batch.mask.cpu().numpy().astype(bool))
        if batch.group is not None:
            groups.append(batch.group)
    model.train(was_training)
    if not labels:
        if shard is not None:  # a rank may get no validation rows; merge_predictions skips it
            width = sum(w for _, w, _ in model.label_slices.values())
            return Predictions({t: np.zeros(0, np.float32) for t in model.task_names},
                               np.zeros((0, width), np.float32), np.zeros((0, width), bool), None,
                               {t: math.nan for t in model.task_names}, dict(model.label_slices),
                               {t: np.zeros(0, np.float32) for t in raws}, tracker)
        raise DataError(f"{source.spec} has no rows")
    pred = Predictions({t: np.concatenate(v) for t, v in scores.items()}, np.concatenate(labels),
                       np.concatenate(masks), np.concatenate(groups) if groups else None, {}, dict(model.label_slices),
                       {t: np.concatenate(v) for t, v in raws.items()}, tracker)
    for t in model.task_names:
        count = pred.labelled(t)
        pred.losses[t] = loss_sum[t] / count if count else math.nan
    return pred


def merge_predictions(parts: list[Predictions], spec: str = "") -> Predictions:
    """One :class:`Predictions` from the ranks' shares (row order does not matter to the metrics);
    each task's loss is the mean over all its labelled rows, the head inputs' ranges (``units``) combined."""
    parts = [p for p in parts if len(p.mask)]
    if not parts:
        raise DataError(f"{spec} has no rows")
    if len(parts) == 1:
        return parts[0]
    mask = np.concatenate([p.mask for p in parts])
    tasks = list(parts[0].scores)
    losses = {}
    for t in tasks:
        counts = [p.labelled(t) for p in parts]
        total = sum(counts)
        losses[t] = sum(p.losses[t] * c for p, c in zip(parts, counts) if c) / total if total else math.nan
    groups = [p.group for p in parts]
    return Predictions({t: np.concatenate([p.scores[t] for p in parts]) for t in tasks},
                       np.concatenate([p.labels for p in parts]), mask,
                       np.concatenate(groups) if all(g is not None for g in groups) else None, losses, parts[0].slices,
                       {t: np.concatenate([p.raw[t] for p in parts]) for t in parts[0].raw},
                       UnitRange.merge([p.units for p in parts]) if parts[0].units is not None else None)


def score_map(config: Config, run_dir: Path | None = None, states: dict[str, dict[str, Any]] | None = None,
              checkpoint: str = "tasks") -> ScoreMap:
    """The config's negative-downsampling corrections and, with ``run_dir``, the calibrators of its
    ``calibrator.json`` when ``recmtl calibrate`` wrote one; with ``states`` (each task's checkpoint, see
    ``LoadedRun.states``) a calibrator fitted on another checkpoint is refused (``check_binding``)."""
    smap = ScoreMap({t.name: t.negative_sampling_rate for t in config.tasks if t.negative_sampling_rate != 1.0},
                    logit_tasks={t.name for t in config.tasks if t.head in LOGIT_HEADS})
    path = None if run_dir is None else Path(run_dir) / CALIBRATOR
    if path is not None and path.is_file():
        smap.calibrators, smap.info = read_calibrators(path)
        if states is not None:
            check_binding(path, smap.info, smap.calibrators, states, checkpoint)
    return smap


def map_scores(pred: Predictions, smap: ScoreMap) -> Predictions:
    """``pred`` with its scores mapped by ``smap`` (in place; returned for chaining). A task whose negatives were
    sampled gets as ``loss`` the log loss of its corrected scores (before any calibrator): the head's loss on its raw
    output would measure the sampled data's base rate against the full-rate labels."""
    if smap:
        for t in (t for t, r in smap.rates.items() if r != 1.0 and t in pred.scores):
            label, m = pred.task_label(t)
            if m.any():
                q = np.clip(smap.without_calibrators().task(t, pred.scores[t][m], pred.raw[t][m] if t in pred.raw else None),
                            1e-7, 1 - 1e-7)
                y = label[m].astype(np.float64)
                pred.losses[t] = float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))
        pred.scores = smap.apply(pred.scores, pred.raw)
    return pred


def reliability_bins(config: Config, pred: Predictions) -> dict[str, dict[str, list[float]]]:
    """Each binary and ESMM task's reliability bins (``recmtl.metrics.reliability``) over its labelled rows."""
    from recmtl import metrics as M
    out = {}
    for t in config.tasks:
        if t.head in CALIBRATED_HEADS and t.head != "multilabel" and t.name in pred.scores:
            label, m = pred.task_label(t.name)
            if m.any():
                out[t.name] = M.reliability(label[m], pred.scores[t.name][m])
    return out


def task_metrics(model: MultiTaskModel, pred: Predictions) -> dict[str, dict[str, float]]:
    """Each head's metrics over its task's labelled rows, plus the loss and the labelled-row count."""
    out: dict[str, dict[str, float]] = {}
    for t in model.task_names:
        label, m = pred.task_label(t)
        group = pred.group[m] if pred.group is not None else None
        values = model.heads[t].metrics(label[m], pred.scores[t][m], group)
        out[t] = {**values, "loss": pred.losses[t], "rows": int(m.sum())}
    return out


@dataclass
class LoadedRun:
    config: Config
    schema: FittedSchema
    model: MultiTaskModel | PerTaskModel
    registry: Registry
    run_dir: Path
    #: the epoch (1-based) each task's scores come from, when known
    epochs: dict[str, int] | None = None
    #: downsampling corrections and calibrators applied to the model's scores (``score_map``)
    scores: ScoreMap = field(default_factory=ScoreMap)
    #: the checkpoint that scores each task: ``{"file", "epoch", "sha256"}`` (what binds a calibrator to it)
    states: dict[str, dict[str, Any]] = field(default_factory=dict)

    def predict(self, source: ParquetSource, batch_size: int, raw: Iterable[str] = ()) -> Predictions:
        """The final scores of every row of ``source`` (corrected and calibrated as ``scores`` says); ``raw``: tasks
        whose raw outputs to keep too (``Predictions.raw``)."""
        keep = {*raw, *(t for t in self.scores.mapped if t in self.scores.logit_tasks)}
        return map_scores(predict(self.model, self.schema, source, batch_size, self.config.data.read_rows, raw=keep),
                          self.scores)


#: ``checkpoint`` of :func:`load_run`: each task from its own best epoch (the default)
PER_TASK = "tasks"


def per_task_model(config: Config, schema: FittedSchema, registry: Registry, states: dict[int, dict[str, Any]],
                   epochs: dict[str, int], run_dir: str | Path = "the run") -> MultiTaskModel | PerTaskModel:
    """The model that scores each task with the state of its epoch (``states``: epoch -> model state dict): one
    ``MultiTaskModel`` when every task has the same epoch, else a ``PerTaskModel`` over one copy per epoch."""
    distinct = sorted(set(epochs.values()))
    models = []
    for e in distinct:
        models.append(model_for_state(config, schema, registry, states[e], f"{epoch_checkpoint(e)} of {run_dir}").eval())
    if len(models) == 1:
        return models[0]
    return PerTaskModel(models, {t: distinct.index(e) for t, e in epochs.items()}).eval()


def load_run(run_dir: str | Path, plugins: list[str] = (), disabled: list[str] = (), checkpoint: str = PER_TASK,
             calibration: bool = True) -> LoadedRun:
    """Rebuild a trained model from its run directory (config, schema, checkpoint). ``checkpoint``: ``tasks`` (each
    task scored by the model of its own best epoch, ``best.pt`` for runs from before per-task selection), ``best``
    (``best.pt``: one network, the best epoch by ``early_stopping.monitor``), ``last`` or a checkpoint file name.
    ``scores`` holds the config's downsampling corrections and, with ``calibration``, the run's calibrators."""
    files = RunDir(run_dir)
    run_dir = files.path
    config_path = files.require(CONFIG)
    config = parse_config(read_raw(config_path), run_dir, str(config_path))
    require_trusted_plugins(run_dir, config.plugin_modules(), list(plugins))
    registry = load_registry([*config.plugin_modules(), *plugins], disabled)
    schema = FittedSchema.load(run_dir)
    epochs = files.task_best_epochs() if checkpoint == PER_TASK else None
    if epochs is not None:
        states = {e: files.load_checkpoint(epoch_checkpoint(e))["model"] for e in set(epochs.values())}
        bound = {t: {"file": epoch_checkpoint(e), "epoch": e, "sha256": files.checkpoint_digest(epoch_checkpoint(e))}
                 for t, e in epochs.items()}
        return LoadedRun(config, schema, per_task_model(config, schema, registry, states, epochs, run_dir), registry, run_dir, epochs,
                         score_map(config, run_dir if calibration else None, bound, checkpoint), bound)
    name = {PER_TASK: BEST, "best": BEST, "last": LAST}.get(checkpoint, checkpoint)
    state = files.load_checkpoint(name)
    model = model_for_state(config, schema, registry, state["model"], f"{name} of {run_dir}").eval()
    epoch = state.get("epoch")
    epochs = {t: int(epoch) + 1 for t in model.task_names} if isinstance(epoch, int) else None
    digest = files.checkpoint_digest(name)
    bound = {t: {"file": name, "epoch": (epochs or {}).get(t), "sha256": digest} for t in model.task_names}
    return LoadedRun(config, schema, model, registry, run_dir, epochs,
                     score_map(config, run_dir if calibration else None, bound, checkpoint), bound)


def format_table(metrics: dict[str, dict[str, Any]], reference: dict[str, dict[str, float]] | None = None) -> str:
    """A plain text table: one row per task, one column per metric."""
    names: list[str] = []
    for values in metrics.values():
        names += [k for k in values if k not in names and k != "rows"]
    header = ["task", "rows", *names]
    if reference:
        header.append("reference_auc")
    rows = []
    for task, values in metrics.items():
        row = [task, str(values.get("rows", ""))]
        row += [f"{values[k]:.4f}" if isinstance(values.get(k), float) else str(values.get(k, "")) for k in names]
        if reference:
            ref = reference.get(task, {}).get("auc")
            row.append("" if ref is None else f"{ref:.4f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
