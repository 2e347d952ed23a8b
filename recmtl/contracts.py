"""The small contracts every plugin kind implements. Plugins subclass these base classes."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class FeatureInfo:
    """What an encoder knows about one input feature after the fit pass."""

    name: str
    kind: str
    cardinality: int = 0  # categorical/sequence: number of ids, id 0 is the OOV/null bucket (sequence padding: cardinality)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskInfo:
    """What a head knows about its task."""

    name: str
    label: str | tuple[str, ...]
    head: str
    weight: float = 1.0
    #: fitted label values: the classes of a ``label_type = "class"`` head in id order (the sorted distinct int
    #: or string labels of the training data, or 0..K-1 with ``num_classes``), the attribute names of a
    #: ``"multi"`` head; empty for scalar labels
    classes: tuple[Any, ...] = ()
    #: ``"value"`` heads: statistics of the head's training target (``Head.target_values`` of the labelled
    #: training values), fitted in the fit pass and saved in ``schema.json``: ``count``, ``mean``, ``std``
    #: (population), ``min``, ``max``. Empty for other heads, in contract checks, and for runs trained before
    #: recmtl fitted them (a head then behaves as it did: e.g. mean 0, std 1).
    target: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TableRows:
    """One categorical feature's embedding rows inside a table an encoder owns, so that an encoder of another kind
    embeds the same vocabulary with the same parameters (a history of item ids and the candidate ``item_id``):
    the feature's id ``i`` is row ``offset + i`` of ``table``, ``size`` rows (its cardinality), ``width`` wide."""

    table: nn.Embedding
    offset: int
    size: int

    @property
    def width(self) -> int:
        return int(self.table.embedding_dim)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of the feature's ids (in ``[0, size)``: padding must be left out before the lookup)."""
        return self.table(ids + self.offset) if self.offset else self.table(ids)


class Encoder(nn.Module):
    """Turns the preprocessed tensor of all features of one ``kind`` into ``[batch, output_dim]``.

    Categorical input is a LongTensor ``[batch, n_features]`` of ids in ``[0, cardinality)`` (0 is the
    OOV/null bucket); dense input is a FloatTensor ``[batch, n_features]``, standardised, nulls filled;
    image input is a FloatTensor ``[batch, n_features, channels, height, width]`` scaled to [0, 1]
    (``FeatureInfo.options`` holds ``channels``, ``height``, ``width``); sequence input is a LongTensor
    ``[batch, n_features, length]`` of ids in ``[0, cardinality)`` (a row's items, left-aligned, most recent
    last; ``length`` is the longest ``max_length`` in ``FeatureInfo.options``), positions past a row's items
    holding the padding id ``cardinality``.
    Embedding tables built with ``sparse=True`` are updated with a sparse optimiser, so a step costs
    time proportional to the ids in the batch, not the vocabulary. Text input is a LongTensor
    ``[batch, n_features, max_tokens]`` of hashed n-gram ids in ``[1, cardinality)``, padding ``cardinality``.

    An encoder that sets ``uses_inputs = True`` is called as ``forward(x, inputs)`` with every kind's
    preprocessed tensor (e.g. a sequence encoder reading the candidate item's ids in ``inputs["categorical"]``:
    a sequence feature's ``options["target"]`` is that categorical feature's position, ``options["shared"]``
    True when it shares the sequence's vocabulary). ``diagnostics()`` returns what it learned since the last
    call (JSON-serialisable; kept in metrics.json per epoch under ``diagnostics.encoders.KIND``).

    One table per vocabulary: an encoder that owns categorical features' embeddings offers them
    (``vocabulary_tables``); after building every encoder the model hands each encoder the rows the others offer
    (``share_tables``), and an encoder whose features embed such a vocabulary (a sequence's
    ``options["vocabulary"]``, a candidate's ``options["target_name"]``) uses them and drops its own table.
    """

    kind: ClassVar[str] = ""
    #: True: the encoder offers the *field view* (``fields``, ``field_dim``, ``field_names``, ``field_columns``):
    #: one embedding per field, for interaction blocks and per-task feature gates. An encoder without it counts
    #: as one field (its whole output, named by its kind).
    has_fields: ClassVar[bool] = False
    #: True: called as ``forward(x, inputs)`` with every kind's preprocessed tensor
    uses_inputs: ClassVar[bool] = False

    def __init__(self, features: list[FeatureInfo]) -> None:
        super().__init__()
        self.features = list(features)

    @property
    def output_dim(self) -> int:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- the field view (optional: ``has_fields = True``) ----
    @property
    def field_names(self) -> list[str]:
        """The fields' names, in the order of ``fields``' axis 1 (default: one field per feature)."""
        return [f.name for f in self.features]

    @property
    def field_dim(self) -> int:
        """The width ``w`` of each field in ``fields`` (the model projects it to the common width when it differs)."""
        raise NotImplementedError

    def fields(self, x: torch.Tensor) -> torch.Tensor:
        """Per-field embeddings ``[batch, len(field_names), field_dim]`` of the same input ``forward`` takes."""
        raise NotImplementedError

    def field_columns(self) -> list[int]:
        """For each of ``forward``'s ``output_dim`` columns, the index of the field it belongs to (per-task
        feature gates scale the flat vector by it). Default: field-major, ``field_dim`` columns per field."""
        if not self.has_fields:
            return [0] * self.output_dim
        return [j for j in range(len(self.field_names)) for _ in range(self.field_dim)]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(forward(x), fields(x))`` (fields None without the field view); override to compute both at once."""
        return self(x), (self.fields(x) if self.has_fields else None)

    def diagnostics(self) -> dict[str, Any]:
        """Statistics since the last call (e.g. attention weights by history position); default none."""
        return {}

    # ---- one table per vocabulary (optional) ----
    def vocabulary_tables(self) -> dict[str, TableRows]:
        """The embedding rows this encoder owns, by categorical feature name, for encoders of other kinds to share
        (the ``embedding`` encoder offers each of its features'). Default: none."""
        return {}

    def share_tables(self, tables: Mapping[str, TableRows]) -> None:
        """Called once by the model, after every encoder is built and before any forward, with the rows the other
        encoders offer (``vocabulary_tables``, by categorical feature name). Use the rows of each vocabulary your
        features embed when they are as wide as your own and have the feature's cardinality, and drop your own
        table for it (its parameters then live once, in the offering encoder: one table in training, one in the
        exported graph). Default: keep your own tables."""


class Tower(nn.Module):
    """Decides how tasks share parameters: ``forward(x) -> {task: h_task}``.

    Built as ``cls(input_dim, task_names, **params)``; ``output_dims[task]`` is the width of ``h_task``.

    A tower that sets ``uses_inputs = True`` also reaches the embedding layer (e.g. STEM's task-specific
    embeddings): it is built with an extra keyword ``features={kind: [FeatureInfo, ...]}`` and called as
    ``forward(x, inputs)`` where ``inputs`` holds the preprocessed tensors per feature kind, as encoders
    get them (``categorical``: LongTensor ids ``[batch, n]``, ``dense``: floats ``[batch, n]``).
    """

    #: True: built with ``features=...`` and called as ``forward(x, inputs)``
    uses_inputs: ClassVar[bool] = False
    #: this tower's own remedy, added to the trainer's warning when a task's head input (``h_task``) has at least
    #: half of its units dead (constant on every validation row); "": none beyond a wider last layer
    dead_units_hint: ClassVar[str] = ""

    def __init__(self, input_dim: int, task_names: list[str]) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.task_names = list(task_names)

    @property
    def output_dims(self) -> dict[str, int]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters used by more than one task (what gradient-surgery balancers act on)."""
        return list(self.parameters())

    def regularization(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """An extra term added to the training loss each step (default: none, a zero scalar).

        ``scores`` are this step's per-task scores (the heads' ``predict``), e.g. for AITM's calibrator;
        a term on parameters alone (soft parameter sharing's L2 penalty) ignores them. The trainer
        back-propagates it beside the balancer's task losses; balancers never see it.
        """
        return torch.zeros(())

    def diagnostics(self) -> dict[str, Any]:
        """What the tower learned about task relations since the last call, JSON-serialisable.

        Conventional keys (``recmtl report`` draws them; others are kept in metrics.json as they are):
        ``gate_weights: {gate: [mean weight per expert]}`` (a gate is a task, or ``level/task`` for
        multi-level towers), ``gate_entropy: {gate: float}``, ``max_entropy: float``,
        ``expert_utilisation: {gate: [share of rows whose top expert it is]}`` and
        ``matrices: {name: {"rows": [...], "cols": [...], "values": [[...]]}}`` (e.g. cross-stitch units).
        """
        return {}


class Interaction(nn.Module):
    """A feature-interaction block between the encoders and the tower: ``forward(x, fields) -> [batch, output_dim]``.

    Built as ``cls(input_dim, field_names, field_dim, **params)``. ``x`` is the flat vector ``[batch, input_dim]``
    (the encoders' outputs concatenated, what a tower gets without a block); ``fields`` is the field view
    ``[batch, len(field_names), field_dim]``: one embedding per field (categorical and pooled sequence features as
    the encoders embed them, dense and image features projected to ``field_dim``), or None when the class sets
    ``uses_fields = False``. ``min_fields``: the fewest fields the block works with (checked before data is read).
    A class that sets ``uses_field_columns = True`` is also built with ``field_columns=``: for each column of ``x``,
    the index in ``field_names`` of the field it belongs to (``len(field_columns) == input_dim``). The tower is
    built on ``output_dim``.
    """

    #: False: the block reads only the flat vector (``fields`` is None)
    uses_fields: ClassVar[bool] = True
    #: the fewest fields the block needs (e.g. 2 for pairwise interactions)
    min_fields: ClassVar[int] = 0
    #: True: the block is also built with ``field_columns=`` (the field index of each column of the flat vector)
    uses_field_columns: ClassVar[bool] = False

    @classmethod
    def check_fields(cls, field_names: list[str], params: dict[str, Any]) -> None:
        """Check the config's ``params`` against the field names before any data is read (e.g. a parameter that
        names fields); raise ValueError with a message naming the bad value. Default: nothing to check."""

    def __init__(self, input_dim: int, field_names: list[str], field_dim: int) -> None:
        super().__init__()
        self.input_dim = int(input_dim)
        self.field_names = list(field_names)
        self.field_dim = int(field_dim)

    @property
    def output_dim(self) -> int:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, fields: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def regularization(self) -> torch.Tensor:
        """An extra term added to the training loss each step, on the block's parameters (default: none, a
        zero scalar; e.g. dcn_v2's ``l2`` on its cross weights). Back-propagated beside the tower's term."""
        return torch.zeros(())

    def lr_scales(self) -> list[tuple[list[nn.Parameter], float]]:
        """Parameters of the block to train at ``scale x optimizer.lr`` in the dense optimiser, as
        ``[(params, scale), ...]`` (default: none, every parameter at ``optimizer.lr``; e.g. dcn_v2's
        ``lr_scale`` on its cross weights). A parameter named twice takes its first scale."""
        return []

    def optimizer_groups(self) -> list[tuple[list[nn.Parameter], dict[str, float]]]:
        """Per-parameter options of the dense optimiser, as ``[(params, options), ...]``; options:
        ``lr_scale`` (train at ``lr_scale x optimizer.lr``, default 1) and ``weight_decay`` (decoupled decay, as
        AdamW, ``p <- p - lr * weight_decay * p`` each step with the parameter's own ``lr``, whatever
        ``optimizer.name``; on top of ``optimizer.weight_decay``; default 0). A parameter named twice takes its
        first options. Default: ``lr_scales()`` as ``{"lr_scale": scale}`` groups."""
        return [(list(params), {"lr_scale": float(scale)}) for params, scale in self.lr_scales()]


class Head(nn.Module):
    """Turns ``h_task`` into a raw output, a loss, a user-facing score and metrics.

    Built as ``cls(input_dim, task, **params)``. A head may depend on other tasks' scores
    (``depends_on``): they arrive in ``upstream`` (ESMM's CTCVR = CTR x CVR).

    ``label_type`` says what the label tensor is: ``"value"`` (default) a float ``[batch]`` and a score
    ``[batch]``; ``"class"`` class ids ``0..K-1`` as floats ``[batch]`` (string labels go through a fitted
    vocabulary, ``task.classes``) and a score ``[batch, K]``; ``"multi"`` K 0/1 attributes ``[batch, K]`` with
    a mask ``[batch, K]`` (attributes may be missing one by one) and a score ``[batch, K]``.
    """

    depends_on: tuple[str, ...] = ()
    label_type: ClassVar[str] = "value"
    #: metrics where larger is better (used by early stopping)
    higher_is_better: ClassVar[frozenset[str]] = frozenset({"auc", "gauc", "accuracy", "f1"})

    def __init__(self, input_dim: int, task: TaskInfo) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.task = task

    def forward(self, h: torch.Tensor, upstream: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def loss(self, output: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean loss over the rows where ``mask`` is true (rows with a label)."""
        raise NotImplementedError

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        """The score a user wants (a probability for binary heads)."""
        raise NotImplementedError

    @classmethod
    def label_problem(cls, distinct: np.ndarray) -> str | None:
        """Say what is wrong with the distinct non-null label values, or None when they are fine."""
        return None

    @classmethod
    def target_values(cls, label: np.ndarray, **params: Any) -> np.ndarray:
        """What this head learns to predict from labelled values ``label`` (numpy ``[n]``; ``label_type = "value"``
        only), given the task's ``params`` as keyword arguments (accept ``**params`` for the others). The fit pass
        records their statistics in ``TaskInfo.target``, e.g. to standardise the target inside the head (the
        ``regression`` head: ``log1p(y)`` with ``log1p: true``). Default: the labels as they are."""
        return label

    def metrics(self, label: np.ndarray, score: np.ndarray, group: np.ndarray | None = None) -> dict[str, float]:
        """Metrics over labelled rows only (``label`` has no nulls here; for ``"multi"`` heads the rows with
        at least one labelled attribute, NaN marking the missing ones)."""
        return {}

    def metric_names(self) -> tuple[str, ...]:
        """The names ``metrics`` may return (a metric that needs groups, e.g. ``gauc``, only with groups): what
        ``early_stopping.monitor`` may name for this head; ``auto`` monitors ``mean/auc`` when every head has
        ``auc``."""
        return ()


class Balancer(nn.Module):
    """Combines per-task losses and performs the backward pass.

    Built as ``cls(task_names, weights, **params)`` where ``weights`` are the per-task weights from the
    config. ``backward`` receives the losses and the shared parameters, so both loss weighting and
    gradient surgery fit; it returns the weights it applied (for logs and reports).

    ``grad_scale`` is the factor that the gradients of this step's losses carry (``train.precision: fp16``
    multiplies them by the loss scale, and the optimiser step divides it out again; 1.0 otherwise). The
    trainer sets it before each ``backward``. A balancer needs it where its update does not scale with its
    gradients (``nash_mtl``: the same direction for ``G`` and ``10 G``), where it keeps gradients across
    steps (``dbmtl``'s averages: the loss scale changes) or trains its own parameters from them (``gradnorm``).
    """

    grad_scale: float = 1.0

    def __init__(self, task_names: list[str], weights: dict[str, float]) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.weights = dict(weights)

    def backward(self, losses: dict[str, torch.Tensor], shared_parameters: list[nn.Parameter]) -> dict[str, float]:
        raise NotImplementedError

    def on_epoch_end(self, epoch: int, train_losses: dict[str, float]) -> None:
        """Called after each epoch with the mean training loss per task (for e.g. DWA)."""


class Logger:
    """An experiment logger (TensorBoard, MLflow, ...), built as ``cls(**params)`` from the config's ``loggers``.

    The trainer registers the instance as a plugin for one training run (rank 0 only), so its methods marked
    ``@hookimpl`` receive the life-cycle hooks (``recmtl_train_start``, ``recmtl_epoch_end``,
    ``recmtl_step_logged``, ``recmtl_checkpoint_saved``, ``recmtl_train_end``); it observes and must not change the
    model. ``close()`` is called once when training ends, also when it fails or is interrupted. A missing
    optional package is a ``ConfigError`` raised by the constructor naming the ``pip install``, so it shows before
    any data is read. A logger that cannot reach its backend warns and lets training go on.
    """

    def close(self) -> None:
        """Flush and release what the logger holds (files, connections); called once."""


@runtime_checkable
class TrainingRun(Protocol):
    """What the training life-cycle hooks receive as ``run`` (``recmtl.hookspecs``): read it, do not replace
    its members. ``history`` grows by one record per finished epoch (the ``metrics`` of ``recmtl_epoch_end``)."""

    config: Any  # recmtl.config.Config
    schema: Any  # recmtl.schema.FittedSchema
    model: nn.Module  # recmtl.training.model.MultiTaskModel
    balancer: Balancer
    run_dir: Path
    history: list[dict[str, Any]]

    def write_report(self, out_dir: Path | None = None) -> Path:
        """Write ``recmtl report``'s HTML and PNGs for the run so far (default ``RUN_DIR/report``); returns
        ``index.html``. Needs the ``report`` extra (matplotlib)."""
        ...
