"""``recmtl new-plugin``: a pip-installable plugin package that works immediately."""
from __future__ import annotations

import re
from pathlib import Path

from recmtl.errors import ConfigError

PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "A recmtl {kind} plugin"
requires-python = ">=3.10"
dependencies = ["recmtl"]

[project.optional-dependencies]
dev = ["pytest"]

# recmtl finds plugins through this entry-point group, exactly as it finds its built-ins.
[project.entry-points.recmtl]
{name} = "{pkg}.plugin"

[tool.setuptools]
packages = ["{pkg}"]
'''

README = '''# {dist}

A recmtl {kind} plugin.

```bash
pip install -e .            # then `recmtl plugins` lists the {kind} '{name}'
pytest                      # runs recmtl's contract checks on it (recmtl.testing)
```

Use it in a config: {usage}
'''

TEST = '''"""recmtl's contract checks: the same tests every built-in {kind} passes."""
from recmtl.testing import check_{kind}

from {pkg}.plugin import {cls}


def test_contract():
    check_{kind}({cls})
'''

PLUGINS = {
    "tower": ('''"""{cls}: a shared layer followed by one small MLP per task.

Edit ``__init__`` and ``forward``; keep the constructor signature ``(input_dim, task_names, **params)``.
Parameters come from the config: ``tower: {{name: {name}, hidden: 64}}``.
"""
from __future__ import annotations

import torch
from torch import nn

from recmtl import Tower, hookimpl


class {cls}(Tower):
    def __init__(self, input_dim: int, task_names: list[str], hidden: int = 64) -> None:
        super().__init__(input_dim, task_names)
        if hidden < 1:
            raise ValueError(f"hidden must be positive, got {{hidden}}")  # shown to the user as a config error
        self.hidden = hidden
        self.shared = nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU())
        self.per_task = nn.ModuleDict({{t: nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()) for t in task_names}})

    @property
    def output_dims(self) -> dict[str, int]:
        """Width of each task's output (what its head receives)."""
        return {{t: self.hidden for t in self.task_names}}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.shared(x)
        return {{t: self.per_task[t](shared) for t in self.task_names}}

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters used by every task (gradient-surgery balancers act on these)."""
        return list(self.shared.parameters())


@hookimpl
def recmtl_register_towers():
    return {{"{name}": {cls}}}
''', "tower: {name: NAME}"),
    "head": ('''"""{cls}: a binary head with focal loss (Lin et al., ICCV 2017) for rare positives.

A head turns a tower output into a raw output, a loss over labelled rows, a score and metrics.
Use it in a task: ``{{name: click, head: {name}, params: {{gamma: 2.0}}}}``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recmtl import Head, TaskInfo, hookimpl, metrics
from recmtl.layers import masked_mean


class {cls}(Head):
    def __init__(self, input_dim: int, task: TaskInfo, gamma: float = 2.0) -> None:
        super().__init__(input_dim, task)
        self.gamma = float(gamma)
        self.linear = nn.Linear(input_dim, 1)

    def forward(self, h: torch.Tensor, upstream: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(h).squeeze(-1)  # a logit per row

    def loss(self, output: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(output, label, reduction="none")
        p_true = torch.exp(-bce)
        per_row = (1 - p_true) ** self.gamma * bce
        return masked_mean(per_row, mask)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(output)

    @classmethod
    def label_problem(cls, distinct: np.ndarray) -> str | None:
        return metrics.binary_label_problem(distinct, "a {name} head")

    def metrics(self, label: np.ndarray, score: np.ndarray, group: np.ndarray | None = None) -> dict[str, float]:
        return metrics.binary_metrics(label, score, group)

    def metric_names(self) -> tuple[str, ...]:
        return metrics.BINARY_METRICS


@hookimpl
def recmtl_register_heads():
    return {{"{name}": {cls}}}
''', "tasks: [{name: click, head: NAME}]"),
    "balancer": ('''"""{cls}: weights each task by the inverse of its running mean loss (scale-free weighting).

A balancer receives the per-task losses and the shared parameters and performs the backward pass.
"""
from __future__ import annotations

import torch
from torch import nn

from recmtl import Balancer, hookimpl


class {cls}(Balancer):
    def __init__(self, task_names: list[str], weights: dict[str, float], momentum: float = 0.9) -> None:
        super().__init__(task_names, weights)
        self.momentum = momentum
        self.register_buffer("running", torch.ones(len(task_names)))

    def backward(self, losses: dict[str, torch.Tensor], shared_parameters: list[nn.Parameter]) -> dict[str, float]:
        current = torch.stack([losses[t].detach() for t in self.task_names])
        self.running.mul_(self.momentum).add_((1 - self.momentum) * current)
        w = 1.0 / self.running.clamp_min(1e-8)
        w = w * len(w) / w.sum()
        total = sum(w[i] * self.weights.get(t, 1.0) * losses[t] for i, t in enumerate(self.task_names))
        total.backward()
        return {{t: float(w[i]) for i, t in enumerate(self.task_names)}}


@hookimpl
def recmtl_register_balancers():
    return {{"{name}": {cls}}}
''', "balancer: {name: NAME}"),
    "encoder": ('''"""{cls}: dense features through log1p of their magnitude, then a learnt linear projection.

An encoder consumes every feature of one kind (``kind``) as one tensor ``[batch, n_features]``.
"""
from __future__ import annotations

import torch
from torch import nn

from recmtl import Encoder, FeatureInfo, hookimpl


class {cls}(Encoder):
    kind = "dense"

    def __init__(self, features: list[FeatureInfo], dim: int = 8) -> None:
        super().__init__(features)
        self.proj = nn.Linear(len(features), dim)
        self.dim = dim

    @property
    def output_dim(self) -> int:
        return self.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.sign(x) * torch.log1p(x.abs()))


@hookimpl
def recmtl_register_encoders():
    return {{"{name}": {cls}}}
''', "encoders: {dense: {name: NAME}}"),
    "interaction": ('''"""{cls}: a bilinear interaction of every pair of fields, beside the flat vector.

A block sits between the encoders and the tower (``interaction: {{name: {name}}}``): ``x`` is the flat vector
``[batch, input_dim]``, ``fields`` one embedding per field ``[batch, n_fields, field_dim]``.
"""
from __future__ import annotations

import torch
from torch import nn

from recmtl import Interaction, hookimpl


class {cls}(Interaction):
    min_fields = 2  # pairs need two fields

    def __init__(self, input_dim: int, field_names: list[str], field_dim: int, rank: int = 4) -> None:
        super().__init__(input_dim, field_names, field_dim)
        self.project = nn.Linear(field_dim, rank, bias=False)

    @property
    def output_dim(self) -> int:
        return self.input_dim + 1

    def forward(self, x: torch.Tensor, fields: torch.Tensor | None) -> torch.Tensor:
        v = self.project(fields)  # [batch, n_fields, rank]
        pairs = 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(1, keepdim=True)  # sum over i < j of <v_i, v_j>
        return torch.cat([x, pairs], dim=1)


@hookimpl
def recmtl_register_interactions():
    return {{"{name}": {cls}}}
''', "interaction: {name: NAME}"),
    "logger": ('''"""{cls}: writes each epoch's validation metrics as one JSON line to ``RUN_DIR/{name}.jsonl``.

A logger's methods marked ``@hookimpl`` receive the training life-cycle hooks (``recmtl.hookspecs``); it
observes the run and must not change the model. ``close()`` is called once when training ends or fails.
"""
from __future__ import annotations

import json
from typing import Any

from recmtl import Logger, hookimpl


class {cls}(Logger):
    def __init__(self, file_name: str = "{name}.jsonl") -> None:
        self.file_name = file_name
        self.out: Any = None

    @hookimpl
    def recmtl_train_start(self, run: Any) -> None:
        self.out = open(run.run_dir / self.file_name, "a", encoding="utf-8")

    @hookimpl
    def recmtl_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self.out is not None:
            self.out.write(json.dumps({{"epoch": epoch, "validation": metrics.get("validation")}}) + "\\n")
            self.out.flush()

    def close(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None


@hookimpl
def recmtl_register_loggers():
    return {{"{name}": {cls}}}
''', "loggers: [NAME]"),
}


def scaffold(name: str, kind: str, parent: Path = Path(".")) -> Path:
    """Write ``parent/name/``: pyproject (entry point), the plugin module, a contract test, a README."""
    if kind not in PLUGINS:
        raise ConfigError(f"--kind must be one of {', '.join(PLUGINS)}, got '{kind}'")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
        raise ConfigError(f"plugin name '{name}' must start with a letter and hold only letters, digits, - and _")
    pkg = name.replace("-", "_").lower()
    cls = "".join(part.capitalize() for part in re.split(r"[-_]", name))
    root = parent / name
    if root.exists():
        raise ConfigError(f"{root} already exists")
    code, usage = PLUGINS[kind]
    values = {"dist": name, "pkg": pkg, "cls": cls, "kind": kind, "name": pkg}
    (root / pkg).mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "pyproject.toml").write_text(PYPROJECT.format(**values))
    (root / "README.md").write_text(README.format(**values, usage=f"`{usage.replace('NAME', pkg)}`"))
    (root / pkg / "__init__.py").write_text(f'"""{name}: a recmtl {kind} plugin."""\n')
    (root / pkg / "plugin.py").write_text(code.format(**values))
    (root / "tests" / "test_plugin.py").write_text(TEST.format(**values))
    return root
