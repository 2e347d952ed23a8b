"""The multi-task model: encoders -> tower -> heads, assembled from registered plugins by name."""
from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from recmtl.config import ComponentConfig, Config
from recmtl.contracts import Head, TaskInfo
from recmtl.errors import ConfigError, PluginError, close_matches
from recmtl.layers import fp32
from recmtl.registry import Registry
from recmtl.schema import FittedSchema

DEFAULT_ENCODERS = {"categorical": "embedding", "dense": "dense", "image": "cnn", "sequence": "sequence_pool",
                    "text": "text_bag"}


def encoder_config(config: Config, kind: str) -> ComponentConfig:
    return config.encoders.get(kind) or ComponentConfig(name=DEFAULT_ENCODERS.get(kind, kind))


def validate_plugins(config: Config, registry: Registry) -> dict[str, type[Head]]:
    """Check every plugin name and parameter name in the config before any data is read."""
    kinds_used = {f.kind for f in config.features}
    for kind in config.encoders:
        if kind not in DEFAULT_ENCODERS:
            raise ConfigError(f"encoders.{kind}: no feature kind '{kind}' (expected categorical, dense, image, sequence or text)")
    for kind in kinds_used:
        enc = encoder_config(config, kind)
        cls = registry.get("encoder", enc.name)
        if getattr(cls, "kind", None) != kind:
            raise ConfigError(f"encoder '{enc.name}' encodes '{cls.kind}' features, not '{kind}'")
        registry.check_params("encoder", enc.name, enc.params, fixed=["features"])
    check_interaction(config, registry)
    registry.check_params("tower", config.tower.name, config.tower.params, fixed=["input_dim", "task_names", "features"])
    gate_features = config.tower.params.get("gate_features")
    if gate_features is not None:  # pepnet's prior features: categorical features of the config
        names = gate_features if isinstance(gate_features, list) else [gate_features]
        cats = [f.name for f in config.features if f.kind == "categorical"]
        for name in names:
            if name not in cats:
                raise ConfigError(f"tower '{config.tower.name}': gate_features names '{name}', which is not a categorical "
                                  f"feature{close_matches(str(name), cats)} (categorical features: {', '.join(cats) or 'none'})")
    registry.check_params("balancer", config.balancer.name, config.balancer.params, fixed=["task_names", "weights"])
    heads = {}
    task_names = {t.name for t in config.tasks}
    for task in config.tasks:
        registry.check_params("head", task.head, task.params, fixed=["input_dim", "task"])
        heads[task.name] = registry.get("head", task.head)
        ctr = task.params.get("ctr_task")
        if ctr is not None and ctr not in task_names:
            raise ConfigError(f"task '{task.name}': ctr_task '{ctr}' is not a task (tasks: {', '.join(sorted(task_names))})")
    return heads


def _defaults(registry: Registry, kind: str, name: str, fixed: tuple[str, ...]) -> dict[str, Any]:
    """The keyword parameters of a plugin's constructor with their defaults, those the core passes left out; only
    defaults a config file can hold (JSON values)."""
    try:
        sig = inspect.signature(registry.get(kind, name))
    except (TypeError, ValueError):
        return {}
    out = {}
    for p in sig.parameters.values():
        if p.name in fixed or p.name == "self" or p.default is p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = list(p.default) if isinstance(p.default, tuple) else p.default
        try:
            json.dumps(default)
        except (TypeError, ValueError):
            continue
        out[p.name] = default
    return out


def _with_defaults(comp: ComponentConfig, registry: Registry, kind: str, fixed: tuple[str, ...]) -> ComponentConfig:
    return ComponentConfig(name=comp.name, **{**_defaults(registry, kind, comp.name, fixed), **comp.params})


def resolved_config(config: Config, registry: Registry) -> Config:
    """``config`` with every plugin's parameters written out, the defaults of those it leaves unset included (the
    encoders of every feature kind used too): what a run directory keeps, so that a later change of a plugin's
    default does not change how a saved run is rebuilt."""
    update: dict[str, Any] = {
        "tower": _with_defaults(config.tower, registry, "tower", ("input_dim", "task_names", "features")),
        "balancer": _with_defaults(config.balancer, registry, "balancer", ("task_names", "weights")),
        "encoders": {**config.encoders, **{kind: _with_defaults(encoder_config(config, kind), registry, "encoder",
                                                                ("features",))
                                           for kind in dict.fromkeys(f.kind for f in config.features)}},
        "tasks": [t.model_copy(update={"params": {**_defaults(registry, "head", t.head, ("input_dim", "task")),
                                                  **t.params}}) for t in config.tasks],
    }
    if config.interaction is not None:
        update["interaction"] = _with_defaults(config.interaction, registry, "interaction", INTERACTION_FIXED)
    return config.model_copy(update=update)


#: the interaction block's constructor arguments the model passes (never config parameters)
INTERACTION_FIXED = ("input_dim", "field_names", "field_dim", "field_columns")

#: the interaction section's own key, read by the model (the common width of the field view), not by the block
FIELD_DIM_KEY = "field_dim"


def interaction_params(config: Config) -> tuple[dict[str, Any], int | None]:
    """The interaction block's parameters and the field view's width (``interaction.field_dim``, None: default)."""
    params = dict(config.interaction.params) if config.interaction else {}
    field_dim = params.pop(FIELD_DIM_KEY, None)
    if field_dim is not None and (isinstance(field_dim, bool) or not isinstance(field_dim, int) or field_dim < 1):
        raise ConfigError(f"interaction.{FIELD_DIM_KEY} must be a positive width, got {field_dim!r}")
    return params, field_dim


def config_fields(config: Config, registry: Registry) -> list[str]:
    """The names of the field view's fields, known from the config alone (before any data is read): one per feature
    of an encoder with the field view, one per kind (named by it) for an encoder without."""
    names = []
    for kind in DEFAULT_ENCODERS:
        feats = [f.name for f in config.features if f.kind == kind]
        if feats:
            has = bool(getattr(registry.get("encoder", encoder_config(config, kind).name), "has_fields", False))
            names += feats if has else [kind]
    return names


def check_interaction(config: Config, registry: Registry) -> None:
    """The interaction block's name, parameters and the fields it needs, before any data is read."""
    if config.interaction is None:
        return
    name = config.interaction.name
    params, _ = interaction_params(config)
    registry.check_params("interaction", name, params, fixed=INTERACTION_FIXED)
    cls = registry.get("interaction", name)
    need = int(getattr(cls, "min_fields", 0))
    fields = config_fields(config, registry)
    if getattr(cls, "uses_fields", True) and len(fields) < need:
        raise ConfigError(f"interaction '{name}' needs at least {need} fields (categorical, sequence, dense or image "
                          f"features), the config has {len(fields)}: {', '.join(fields) or 'none'}")
    check = getattr(cls, "check_fields", None)
    if check is not None:
        try:
            check(list(fields), dict(params))
        except ValueError as exc:
            raise ConfigError(f"interaction '{name}': {exc}") from exc


def share_tables(encoders: nn.ModuleDict) -> None:
    """One table per vocabulary: each encoder gets the embedding rows the other encoders offer
    (``Encoder.vocabulary_tables`` -> ``Encoder.share_tables``)."""
    offered = {kind: dict(enc.vocabulary_tables()) for kind, enc in encoders.items()}
    for kind, enc in encoders.items():
        others = {name: rows for k, tables in offered.items() if k != kind for name, rows in tables.items()}
        if others:
            enc.share_tables(others)


#: called with the heads' inputs ``{task: h_task}`` of a forward pass (``MultiTaskModel.run``'s ``observe``)
HiddenObserver = Callable[[dict[str, torch.Tensor]], None]

#: initial scale of a projected field (the built-in embeddings' ``init_std``)
PROJECTION_STD = 0.05


class FieldView(nn.Module):
    """The encoders' field views as one tensor ``[batch, n_fields, dim]``: fields of width ``dim`` as the encoders
    give them, others (dense values, images, narrower embeddings) by a learned projection per field
    (``x_j W_j + b_j``), an encoder without the field view as one field (its whole output, projected)."""

    def __init__(self, encoders: nn.ModuleDict, dim: int) -> None:
        super().__init__()
        self.dim = int(dim)
        self.names: list[str] = []
        self.weights = nn.ParameterDict()
        self.biases = nn.ParameterDict()
        for kind, enc in encoders.items():
            names, width = (enc.field_names, enc.field_dim) if enc.has_fields else ([kind], enc.output_dim)
            self.names += list(names)
            if width != self.dim:  # projected fields start at the scale of fresh embeddings (std 0.05), no offset
                std = PROJECTION_STD / width ** 0.5
                self.weights[kind] = nn.Parameter(torch.randn(len(names), width, self.dim) * std)
                self.biases[kind] = nn.Parameter(torch.zeros(len(names), self.dim))

    def forward(self, encoders: nn.ModuleDict, flats: dict[str, torch.Tensor],
                fields: dict[str, torch.Tensor | None]) -> torch.Tensor:
        parts = []
        for kind, enc in encoders.items():
            f = fields[kind] if enc.has_fields else flats[kind].unsqueeze(1)
            if kind in self.weights:
                f = torch.einsum("bnw,nwd->bnd", f, self.weights[kind]) + self.biases[kind]
            parts.append(f)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class FeatureGates(nn.Module):
    """Per-task field gates ``2·sigmoid(a[task, field])`` (1 at the start): task ``t``'s copy of the input has every
    field scaled by its gate (the flat vector column by column, the field view field by field); the tasks' copies
    are stacked along the batch, ``[T * batch, ...]``, so the interaction block and tower run once on all of them and
    task ``t`` reads rows ``t * batch .. (t + 1) * batch`` of its output."""

    def __init__(self, task_names: list[str], field_names: list[str], field_columns: list[int], sparsity: float) -> None:
        super().__init__()
        self.task_names, self.field_names, self.sparsity = list(task_names), list(field_names), float(sparsity)
        self.logits = nn.Parameter(torch.zeros(len(task_names), len(field_names)))
        self.register_buffer("columns", torch.tensor(field_columns, dtype=torch.long), persistent=False)

    def gates(self) -> torch.Tensor:
        return 2 * torch.sigmoid(self.logits)

    def forward(self, x: torch.Tensor, fields: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = self.gates()  # [T, F]
        xs = (x.unsqueeze(0) * g[:, self.columns].unsqueeze(1)).flatten(0, 1)  # [T*B, D]
        fs = None if fields is None else (fields.unsqueeze(0) * g[:, None, :, None]).flatten(0, 1)
        return xs, fs

    def penalty(self) -> torch.Tensor:
        return self.sparsity * self.gates().sum() if self.sparsity > 0 else torch.zeros(())

    def matrix(self) -> dict[str, Any]:
        return {"rows": list(self.task_names), "cols": list(self.field_names),
                "values": [[round(float(v), 4) for v in row] for row in self.gates().detach().cpu()]}


class MultiTaskModel(nn.Module):
    def __init__(self, config: Config, schema: FittedSchema, registry: Registry, share: bool = True) -> None:
        """``share``: one table per vocabulary (``share_tables``); False only for checkpoints saved before it."""
        super().__init__()
        self.shares_tables = share
        self.task_names = [t.name for t in config.tasks]
        self.encoders = nn.ModuleDict()
        for kind, infos in schema.feature_infos().items():
            enc = encoder_config(config, kind)
            self.encoders[kind] = registry.create("encoder", enc.name, infos, **enc.params)
        if share:
            share_tables(self.encoders)
        input_dim = sum(e.output_dim for e in self.encoders.values())
        field_names = [n for kind, e in self.encoders.items() for n in (e.field_names if e.has_fields else [kind])]
        columns, first = [], 0  # the field of each column of the flat vector
        for kind, e in self.encoders.items():
            cols = [int(c) for c in e.field_columns()]
            if len(cols) != e.output_dim:
                raise PluginError(f"encoder '{encoder_config(config, kind).name}': field_columns() has {len(cols)} "
                                  f"entries, expected one per output column ({e.output_dim})")
            columns += [first + c for c in cols]
            first += len(e.field_names) if e.has_fields else 1
        self.field_names = field_names
        self.gates = None
        if config.feature_gates is not None:
            self.gates = FeatureGates(self.task_names, field_names, columns, config.feature_gates.sparsity)
        self.interaction = None
        self.field_view = None
        if config.interaction is not None:
            params, field_dim = interaction_params(config)
            cls = registry.get("interaction", config.interaction.name)
            dim = field_dim or self._default_field_dim()
            if getattr(cls, "uses_fields", True):
                self.field_view = FieldView(self.encoders, dim)
            if getattr(cls, "uses_field_columns", False):  # the field of each column of the flat vector
                params["field_columns"] = list(columns)
            self.interaction = registry.create("interaction", config.interaction.name, input_dim, list(field_names),
                                               dim, **params)
            input_dim = int(self.interaction.output_dim)
        # a tower with `uses_inputs` also gets the feature infos (and the preprocessed inputs in forward)
        self.tower_uses_inputs = bool(getattr(registry.get("tower", config.tower.name), "uses_inputs", False))
        extra = {"features": schema.feature_infos()} if self.tower_uses_inputs else {}
        self.tower = registry.create("tower", config.tower.name, input_dim, list(self.task_names),
                                     **config.tower.params, **extra)
        self._scores: dict[str, torch.Tensor] = {}
        dims = self.tower.output_dims
        missing = [t for t in self.task_names if t not in dims]
        if missing:
            raise PluginError(f"tower '{config.tower.name}' declares no output for task(s) {missing}")
        self.heads = nn.ModuleDict()
        #: where each task's label sits in a batch's label/mask tensors: (start, width, scalar)
        self.label_slices = schema.label_slices()
        classes = {lab.task: tuple(lab.classes or ()) for lab in schema.labels}
        targets = {lab.task: dict(lab.target or {}) for lab in schema.labels}
        for task in config.tasks:
            label = tuple(task.label) if isinstance(task.label, list) else (task.label or task.name)
            info = TaskInfo(task.name, label, task.head, task.weight, classes.get(task.name, ()),
                            targets.get(task.name, {}))
            self.heads[task.name] = registry.create("head", task.head, dims[task.name], info, **task.params)
        self.order = self._topological_order()
        self._check_contracts(config)

    @torch.no_grad()
    def _check_contracts(self, config: Config) -> None:
        """A two-row dry run naming the plugin that breaks its contract (shapes, missing tasks, errors)."""
        was_training = self.training
        self.eval()
        inputs = {kind: example_input(kind, enc.features, 2) for kind, enc in self.encoders.items()}

        def call(what: str, fn: Any, *args: Any) -> Any:
            try:
                return fn(*args)
            except Exception as exc:
                raise PluginError(f"{what} failed on a 2-row dry run: {exc!r}") from exc

        for kind, enc in self.encoders.items():
            name = encoder_config(config, kind).name
            out = call(f"encoder '{name}'", self.call_encoder, kind, inputs)
            if tuple(out.shape) != (2, enc.output_dim):
                raise PluginError(f"encoder '{name}' returned shape {tuple(out.shape)}, expected (batch, output_dim={enc.output_dim})")
            if enc.has_fields and self.field_view is not None:
                f = call(f"encoder '{name}' (field view)", enc.fields, inputs[kind])
                want = (2, len(enc.field_names), enc.field_dim)
                if tuple(f.shape) != want:
                    raise PluginError(f"encoder '{name}': fields returned shape {tuple(f.shape)}, expected {want} "
                                      "(batch, len(field_names), field_dim)")
        if self.interaction is not None:
            x, fields = self.encode_all(inputs)
            z = call(f"interaction '{config.interaction.name}'", self.interaction, x, fields)
            if tuple(z.shape) != (2, self.interaction.output_dim):
                raise PluginError(f"interaction '{config.interaction.name}' returned shape {tuple(z.shape)}, expected "
                                  f"(batch, output_dim={self.interaction.output_dim})")
        hidden = call(f"tower '{config.tower.name}'", self.hidden, inputs)
        dims = self.tower.output_dims
        for t in self.task_names:
            if not isinstance(hidden, dict) or t not in hidden:
                raise PluginError(f"tower '{config.tower.name}' returned no output for task '{t}'")
            if tuple(hidden[t].shape) != (2, dims[t]):
                raise PluginError(f"tower '{config.tower.name}' returned shape {tuple(hidden[t].shape)} for task '{t}', "
                                  f"but declares output_dims['{t}'] = {dims[t]}")
        scores: dict[str, torch.Tensor] = {}
        for t in self.order:
            head = self.heads[t]
            name = f"head '{head.task.head}' of task '{t}'"
            out = call(name, head, hidden[t], {d: scores[d] for d in head.depends_on})
            scores[t] = call(name, head.predict, out)
            width = self.label_slices[t][1] if head.label_type == "multi" else len(head.task.classes)
            expected = (2,) if head.label_type == "value" else (2, width)
            if tuple(scores[t].shape) != expected:
                raise PluginError(f"{name}: predict returned shape {tuple(scores[t].shape)}, expected "
                                  + ("(batch,)" if head.label_type == "value" else f"(batch, {width}) for its {width} "
                                     + ("classes" if head.label_type == "class" else "attributes")))
        self.diagnostics()  # forget the dry run's statistics
        self.train(was_training)

    def _default_field_dim(self) -> int:
        """The field view's width without ``interaction.field_dim``: the categorical (else sequence) embeddings'."""
        for kind in ("categorical", "sequence"):
            enc = self.encoders[kind] if kind in self.encoders else None
            if enc is not None and enc.has_fields:
                return int(enc.field_dim)
        return 16

    def _topological_order(self) -> list[str]:
        order: list[str] = []
        visiting: set[str] = set()

        def visit(t: str) -> None:
            if t in order:
                return
            if t in visiting:
                raise ConfigError(f"tasks depend on each other in a cycle through '{t}'")
            visiting.add(t)
            for dep in self.heads[t].depends_on:
                if dep not in self.heads:
                    raise ConfigError(f"task '{t}' depends on unknown task '{dep}'")
                visit(dep)
            visiting.discard(t)
            order.append(t)

        for t in self.task_names:
            visit(t)
        return order

    def call_encoder(self, kind: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        enc = self.encoders[kind]
        return enc(inputs[kind], inputs) if getattr(enc, "uses_inputs", False) else enc(inputs[kind])

    def encode(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [self.call_encoder(kind, inputs) for kind in self.encoders]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def encode_all(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The flat vector ``[batch, D]`` and, when the interaction block reads it, the field view
        ``[batch, n_fields, field_dim]``."""
        if self.field_view is None:
            return self.encode(inputs), None
        flats, fields = {}, {}
        for kind, enc in self.encoders.items():
            flats[kind], fields[kind] = (enc.encode(inputs[kind]) if enc.has_fields
                                         else (self.call_encoder(kind, inputs), None))
        parts = list(flats.values())
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return x, self.field_view(self.encoders, flats, fields)

    def hidden(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encoders -> (per-task feature gates) -> (interaction block) -> tower: ``{task: h_task}``."""
        if self.gates is None and self.interaction is None:
            return self.call_tower(self.encode(inputs), inputs)
        x, fields = self.encode_all(inputs)
        n = x.shape[0]
        if self.gates is not None:
            x, fields = self.gates(x, fields)
            if self.tower_uses_inputs:  # the tower reads the ids of each task's copy
                inputs = {k: v.repeat(len(self.task_names), *([1] * (v.dim() - 1))) for k, v in inputs.items()}
        if self.interaction is not None:
            x = self.interaction(x, fields)
        hidden = self.call_tower(x, inputs)
        if self.gates is not None:
            hidden = {t: hidden[t][i * n:(i + 1) * n] for i, t in enumerate(self.task_names)}
        return hidden

    def run(self, inputs: dict[str, torch.Tensor], observe: HiddenObserver | None = None
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Raw outputs (what each head's ``loss`` takes) and scores per task, heads in dependency order; raw outputs
        are float32 under autocast too (the heads' matmuls run in bf16, their sigmoid / softmax and losses do not).
        ``observe``, when given, is called with the heads' inputs ``{task: h_task}`` (e.g. ``UnitRange.update``)."""
        hidden = self.hidden(inputs)
        if observe is not None:
            observe(hidden)
        outputs: dict[str, torch.Tensor] = {}
        scores: dict[str, torch.Tensor] = {}
        for t in self.order:
            head = self.heads[t]
            # fp32 (a no-op outside autocast): losses, scores and the upstream scores of dependent heads
            outputs[t] = fp32(head(hidden[t], {d: scores[d] for d in head.depends_on}))
            scores[t] = head.predict(outputs[t])
        if self.training:
            self._scores = scores  # for the tower's regularization term of this step
        return outputs, scores

    def call_tower(self, x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.tower(x, inputs) if self.tower_uses_inputs else self.tower(x)

    def backward_regularization(self) -> float:
        """Back-propagate the tower's (and the interaction block's) extra loss term for the last training forward (kept graph, so
        the balancer's backward still runs after it); returns its value."""
        reg = self.tower.regularization(self._scores)
        if self.interaction is not None:
            reg = reg + self.interaction.regularization()
        if self.gates is not None and self.gates.sparsity > 0:
            reg = reg + self.gates.penalty()
        self._scores = {}  # keep no graph on the module
        if reg.requires_grad:
            reg.backward(retain_graph=True)
        return float(reg.detach())

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.run(inputs)[0]

    def predict(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.run(inputs)[1]

    def task_label(self, labels: torch.Tensor, mask: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's label and mask out of a batch's ``[batch, total width]`` tensors: ``[batch]`` for a
        scalar label, ``[batch, K]`` for a multilabel one."""
        start, width, scalar = self.label_slices[task]
        if scalar:
            return labels[:, start], mask[:, start]
        return labels[:, start:start + width], mask[:, start:start + width]

    def losses(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: self.heads[t].loss(outputs[t], *self.task_label(labels, mask, t)) for t in self.task_names}

    def shared_parameters(self) -> list[nn.Parameter]:
        """Dense parameters shared by tasks: encoders' dense weights and the tower's shared part."""
        enc = [p for m in self.encoders.values() for p in _dense_params(m)]
        between = [p for m in (self.field_view, self.interaction) if m is not None for p in _dense_params(m)]
        return enc + between + list(self.tower.shared_parameters())

    def diagnostics(self) -> dict[str, Any]:
        """The tower's diagnostics, with the ``[task x field]`` matrix of the feature gates (``matrices.feature_gates``)
        and the encoders' (``encoders: {kind: ...}``) where they have any."""
        diag = dict(self.tower.diagnostics())
        if self.gates is not None:
            diag["matrices"] = {**diag.get("matrices", {}), "feature_gates": self.gates.matrix()}
        enc = {kind: d for kind, e in self.encoders.items() if (d := getattr(e, "diagnostics", dict)())}
        if enc:
            diag["encoders"] = enc
        return diag


def model_for_state(config: Config, schema: FittedSchema, registry: Registry, state: dict[str, Any],
                    source: str = "the checkpoint") -> MultiTaskModel:
    """A model with ``state`` (a checkpoint's model state) loaded: one table per vocabulary, or, for a checkpoint
    saved before encoders shared tables (it holds their own tables too), each encoder with its own
    (``shares_tables`` False). A state of neither layout is a ``ConfigError`` naming ``source`` (retrain)."""
    def layout(sd: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(getattr(v, "shape", ())) for k, v in sd.items()}

    model = MultiTaskModel(config, schema, registry)
    if layout(state) != layout(model.state_dict()):
        legacy = MultiTaskModel(config, schema, registry, share=False)
        if layout(state) != layout(legacy.state_dict()):
            want, got = layout(model.state_dict()), layout(state)
            missing = [k for k in want if k not in got]
            unexpected = [k for k in got if k not in want]
            shapes = [f"{k} {list(got[k])} (expected {list(want[k])})" for k in want if k in got and got[k] != want[k]]
            what = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for label, keys in
                             (("missing", missing), ("not expected", unexpected), ("other shape", shapes)) if keys)
            raise ConfigError(f"{source} does not fit the model this version of recmtl builds from the run's config "
                              f"and schema ({what}); it was saved by another version of recmtl or of its plugins: "
                              "retrain the run (recmtl train CONFIG --out NEW_DIR)")
        model = legacy
    model.load_state_dict(state)
    return model


class PerTaskModel(nn.Module):
    """Several trained copies of one network, each task scored by its own copy (e.g. the model of that task's best
    epoch): task ``t``'s outputs and scores are exactly what ``models[owner[t]]`` computes, so a dependent head
    (ESMM's CTCVR) uses the upstream score of its own copy. Offers what evaluation and export use of a
    ``MultiTaskModel`` (``run``, ``predict``, ``forward``, ``heads``, ``task_names``, ``encoders``,
    ``label_slices``, ``task_label``); each copy is evaluated once per batch."""

    def __init__(self, models: list[MultiTaskModel], owner: dict[str, int]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.owner = dict(owner)
        first = models[0]
        self.task_names = list(first.task_names)
        self.label_slices = first.label_slices
        # plain attributes (not submodules): the modules are registered once, under `models`
        self.__dict__["encoders"] = first.encoders
        self.__dict__["heads"] = {t: models[owner[t]].heads[t] for t in self.task_names}

    def run(self, inputs: dict[str, torch.Tensor], observe: HiddenObserver | None = None
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``MultiTaskModel.run`` of each task's copy; ``observe`` sees each task's head input from its own copy."""
        def mine(i: int) -> HiddenObserver | None:
            if observe is None:
                return None
            return lambda hidden: observe({t: h for t, h in hidden.items() if self.owner[t] == i})
        results = {i: self.models[i].run(inputs, mine(i)) for i in sorted(set(self.owner.values()))}
        return ({t: results[self.owner[t]][0][t] for t in self.task_names},
                {t: results[self.owner[t]][1][t] for t in self.task_names})

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.run(inputs)[0]

    def predict(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.run(inputs)[1]

    def task_label(self, labels: torch.Tensor, mask: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.models[0].task_label(labels, mask, task)


def example_input(kind: str, features: list, n: int) -> torch.Tensor:
    """Zeros shaped like ``n`` preprocessed rows of the features of ``kind`` (dry runs, ONNX export)."""
    if kind == "categorical":
        return torch.zeros(n, len(features), dtype=torch.long)
    if kind in ("sequence", "text"):  # every position padding but the first (id 0 / 1: an item, a token)
        width = max(int(f.options["max_length"]) for f in features)
        x = torch.tensor([f.cardinality for f in features], dtype=torch.long)[None, :, None].repeat(n, 1, width)
        x[:, :, 0] = 0
        return x
    if kind == "image":
        opt = features[0].options
        return torch.zeros(n, len(features), opt["channels"], opt["height"], opt["width"])
    return torch.zeros(n, len(features), dtype=torch.float32)


def _dense_params(module: nn.Module) -> list[nn.Parameter]:
    sparse = {id(p) for p in sparse_parameters(module)}
    return [p for p in module.parameters() if id(p) not in sparse]


def sparse_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of embedding modules built with ``sparse=True`` (updated by a sparse optimiser)."""
    return [m.weight for m in module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
