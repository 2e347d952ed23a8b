"""Every hook recmtl calls. Each docstring is the contract a plugin implements.

Registration hooks return ``{name: factory}``; the core merges the answers of all plugins into one
registry per kind and remembers which plugin supplied each name, so duplicates and unknown names are
explained. Life-cycle hooks are called by the trainer for loggers and callbacks; their return is ignored.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from recmtl.contracts import Balancer, Encoder, Head, Interaction, Logger, Tower, TrainingRun

hookspec = pluggy.HookspecMarker("recmtl")


@hookspec
def recmtl_register_towers() -> dict[str, type[Tower]]:
    """Return towers by name: classes built as ``cls(input_dim, task_names, **params)``.

    A tower decides how tasks share parameters (see :class:`recmtl.Tower`).
    """


@hookspec
def recmtl_register_heads() -> dict[str, type[Head]]:
    """Return task heads by name: classes built as ``cls(input_dim, task, **params)``.

    A head turns a tower's per-task output into a raw output, a loss, a score and metrics
    (see :class:`recmtl.Head`).
    """


@hookspec
def recmtl_register_balancers() -> dict[str, type[Balancer]]:
    """Return loss balancers by name: classes built as ``cls(task_names, weights, **params)``.

    A balancer receives the per-task losses and the shared parameters and performs the backward pass
    (see :class:`recmtl.Balancer`).
    """


@hookspec
def recmtl_register_encoders() -> dict[str, type[Encoder]]:
    """Return feature encoders by name: classes built as ``cls(features, **params)``.

    Each encoder declares the feature ``kind`` it consumes (``categorical``, ``dense``, ...) and turns
    the preprocessed tensor of all features of that kind into one ``[batch, output_dim]`` tensor
    (see :class:`recmtl.Encoder`).
    """


@hookspec
def recmtl_register_interactions() -> dict[str, type[Interaction]]:
    """Return feature-interaction blocks by name: classes built as ``cls(input_dim, field_names, field_dim, **params)``.

    A block sits between the encoders and the tower (config ``interaction: {name: ...}``) and turns the flat
    vector and the field view into the tower's input (see :class:`recmtl.Interaction`).
    """


@hookspec
def recmtl_register_loggers() -> dict[str, type[Logger]]:
    """Return experiment loggers by name: classes built as ``cls(**params)`` once per training run.

    A logger's instance is registered as a plugin for the run, so its ``@hookimpl`` methods receive the
    life-cycle hooks below; ``close()`` is called when training ends or fails (see :class:`recmtl.Logger`).
    """


@hookspec
def recmtl_step_logged(run: TrainingRun, step: int, record: dict[str, Any]) -> None:
    """Called every ``train.log_every`` steps with the step's record: ``epoch``, ``losses`` per task (raw,
    unweighted), the balancer's ``weights``, ``grad_norms`` per task and the pairwise ``cosine`` of the task
    gradients on the shared parameters (the ``balance.jsonl`` line)."""


@hookspec
def recmtl_train_start(run: TrainingRun) -> None:
    """Called once before the first training step (also after ``--resume``); ``run`` holds the
    config, the fitted schema, the model and the run directory."""


@hookspec
def recmtl_epoch_end(run: TrainingRun, epoch: int, metrics: dict[str, Any]) -> None:
    """Called after each epoch's validation with that epoch's record: ``train_loss`` per task,
    ``validation`` metrics per task, ``weights`` of the balancer, ``seconds`` and ``rows``."""


@hookspec
def recmtl_checkpoint_saved(run: TrainingRun, path: str, is_best: bool) -> None:
    """Called after a checkpoint was written (atomically) to ``path``; ``is_best`` when it is the best
    epoch so far by the monitored metric."""


@hookspec
def recmtl_train_end(run: TrainingRun, metrics: dict[str, Any]) -> None:
    """Called once when training finishes (epochs done or early stopped) with the final
    ``metrics.json`` content."""
