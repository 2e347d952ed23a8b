"""The run configuration: a YAML/TOML file validated up front with pydantic."""
from __future__ import annotations

import operator
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recmtl.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureConfig(_Strict):
    """One input column. Categorical: ints or strings mapped to ids through a fitted vocabulary (values
    seen fewer than ``min_count`` times, unseen values and nulls share id 0) or hashed into
    ``hash_buckets``. Dense: numbers; nulls/NaN filled with ``fill`` then standardised. Image: encoded
    PNG/JPEG bytes or fixed-shape number lists of ``channels x height x width`` (see recmtl/images.py).
    A dense value is first clipped to ``clip`` (when given), then transformed (``transform: log1p`` is
    ``sign(x) * log1p(|x|)``, for heavy-tailed counts, prices, durations); the fill value and the
    statistics are those of the transformed values.
    Sequence: a list column of ints or strings (e.g. recently clicked item ids); each row keeps its last
    ``max_length`` items, mapped to ids with a vocabulary fitted over all list values (the categorical
    options apply); a null list is empty, a null item is missing (id 0). ``vocabulary: OTHER`` shares the
    categorical feature OTHER's vocabulary (fitted over both columns, OTHER's options) and embedding ids;
    ``target: OTHER`` names the candidate categorical feature the ``din``/``transformer`` encoders attend with.
    Text: a string column tokenised as lowercase words (split on non-word characters), its unigrams and, with
    ``ngrams: 2``, bigrams hashed (MurmurHash3) into ``hash_buckets``; at most ``max_tokens`` per row."""

    name: str
    kind: Literal["categorical", "dense", "image", "sequence", "text"]
    min_count: int = Field(1, ge=1)
    max_size: int | None = Field(None, ge=1)
    max_distinct: int | None = Field(None, ge=1)  # fit pass: distinct values counted exactly; a sketch above
    hash_buckets: int | None = Field(None, ge=1)
    embedding_dim: int | None = Field(None, ge=1)
    fill: Literal["mean", "zero"] | float = "mean"
    standardize: bool = True
    transform: Literal["none", "log1p"] = "none"  # dense: applied after clip, before fill and standardising
    clip: tuple[float, float] | None = None  # dense: [low, high] applied to the raw value
    height: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=1)
    channels: Literal[1, 3, 4] | None = None  # image: 1 (grey, the default), 3 (RGB) or 4 (RGBA)
    max_length: int | None = Field(None, ge=1)  # sequence: the most recent items kept per row (default 50)
    vocabulary: str | None = None  # sequence: share this categorical feature's vocabulary and ids
    target: str | None = None  # sequence: the candidate categorical feature din/transformer attend with
    ngrams: Literal[1, 2] | None = None  # text: 1 (words) or 2 (words and bigrams, the default)
    max_tokens: int | None = Field(None, ge=1)  # text: the first n-grams kept per row (default 64)

    @model_validator(mode="after")
    def _kind_options(self) -> FeatureConfig:
        if self.kind == "text" and (self.max_size or self.min_count != 1):
            raise ValueError(f"feature '{self.name}': a text feature is hashed (hash_buckets), it fits no vocabulary "
                             "(max_size/min_count)")
        if self.kind not in ("categorical", "sequence", "text") and (
                self.hash_buckets or self.max_size or self.embedding_dim or self.min_count != 1):
            raise ValueError(f"feature '{self.name}': hash_buckets/max_size/min_count/embedding_dim apply to "
                             "categorical and sequence features only")
        if self.kind != "sequence" and (self.vocabulary is not None or self.target is not None):
            raise ValueError(f"feature '{self.name}': vocabulary/target apply to sequence features only")
        if self.vocabulary is not None and (self.hash_buckets or self.max_size or self.min_count != 1):
            raise ValueError(f"feature '{self.name}': it shares the vocabulary of '{self.vocabulary}'; set "
                             f"hash_buckets/max_size/min_count on '{self.vocabulary}'")
        if self.max_distinct is not None and (self.kind not in ("categorical", "sequence") or self.hash_buckets
                                              or self.vocabulary is not None):
            raise ValueError(f"feature '{self.name}': max_distinct bounds the fit pass's vocabulary counter; it applies "
                             "to categorical and sequence features with a vocabulary of their own (no hash_buckets, "
                             "no shared vocabulary)")
        if self.max_distinct is not None and self.max_size is not None and self.max_distinct < self.max_size:
            raise ValueError(f"feature '{self.name}': max_distinct ({self.max_distinct}) must be at least max_size "
                             f"({self.max_size}): the counter cannot keep the top {self.max_size} values in "
                             f"{self.max_distinct} counters")
        if self.kind != "text" and (self.ngrams is not None or self.max_tokens is not None):
            raise ValueError(f"feature '{self.name}': ngrams/max_tokens apply to text features only")
        if self.kind == "text":
            self.ngrams = self.ngrams or 2
            self.max_tokens = self.max_tokens or 64
            self.hash_buckets = self.hash_buckets or 100_000
        if self.kind != "dense" and (self.transform != "none" or self.clip is not None):
            raise ValueError(f"feature '{self.name}': transform/clip apply to dense features only")
        if self.clip is not None and not (self.clip[0] <= self.clip[1]):
            raise ValueError(f"feature '{self.name}': clip must be [low, high] with low <= high, got {list(self.clip)}")
        if self.kind == "sequence" and self.max_length is None:
            self.max_length = 50
        if self.kind != "sequence" and self.max_length is not None:
            raise ValueError(f"feature '{self.name}': max_length applies to sequence features only")
        if self.kind == "image" and (self.height is None or self.width is None):
            raise ValueError(f"feature '{self.name}': an image feature needs height and width (and channels: 1, 3 or 4)")
        if self.kind != "image" and (self.height is not None or self.width is not None or self.channels is not None):
            raise ValueError(f"feature '{self.name}': height/width/channels apply to image features only")
        return self


#: the comparisons a threshold ``positive`` may use (``TaskConfig.positive``)
THRESHOLD_OPS: dict[str, Callable[[Any, Any], Any]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt}
_THRESHOLD = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")


def parse_threshold(text: str) -> tuple[str, float] | None:
    """``"OP NUMBER"`` (e.g. ``">0"``, ``">= 4"``, ``"!=-1.5"``) -> ``(OP, NUMBER)``; None when ``text`` is not one."""
    match = _THRESHOLD.fullmatch(text)
    return (match.group(1), float(match.group(2))) if match else None


class TaskConfig(_Strict):
    """One task: its label column, its head and its weight. With ``positive``, the label is 1 where the
    column's value is one of those values (a list), or where it passes a comparison (one string ``"OP
    NUMBER"``: ``">0"`` for a count, ``">=4"`` for a 1-5 rating), and 0 elsewhere (nulls and NaN stay
    unlabelled). A multilabel head takes a list of 0/1 columns (one per attribute) or one fixed-length list
    column."""

    name: str
    label: str | list[str] | None = None
    head: str = "binary"
    weight: float = Field(1.0, ge=0)
    positive: list[str | int | float] | str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    #: the fraction of negatives kept in the training data; scores are corrected to the full base rate
    negative_sampling_rate: float = 1.0

    @field_validator("positive", mode="before")
    @classmethod
    def _positive_form(cls, value: Any, info: Any) -> Any:
        task = f"task '{info.data.get('name', '?')}'"
        if isinstance(value, str):
            if parse_threshold(value) is not None:
                return value.strip()
            hint = "" if value.strip()[:1] in tuple("<>=!") else f"; for values that count as 1 write a list: [{value}]"
            raise ValueError(f"{task}: positive '{value}' is neither a list of values nor one comparison 'OP NUMBER' "
                             f"with OP one of >, >=, <, <=, ==, != (e.g. '>0', '>=4'){hint}")
        if isinstance(value, bool):
            raise ValueError(f"{task}: positive {str(value).lower()} is a single value; write a list: "
                             f"[{str(value).lower()}]")
        if isinstance(value, (int, float)):
            raise ValueError(f"{task}: positive {value} is a single value; write a list ([{value}]) for values that "
                             f"count as 1, or a comparison such as '>={value}'")
        return value

    @model_validator(mode="after")
    def _default_label(self) -> TaskConfig:
        if self.label is None:
            self.label = self.name
        if isinstance(self.label, list):
            if not self.label:
                raise ValueError(f"task '{self.name}': label is an empty list")
            _no_duplicates(self.label, f"label column of task '{self.name}'")
            if self.positive is not None:
                raise ValueError(f"task '{self.name}': positive applies to a single label column")
        rate = self.negative_sampling_rate
        if not 0 < rate <= 1:
            raise ValueError(f"task '{self.name}': negative_sampling_rate must be in (0, 1] (the fraction of negatives "
                             f"kept in the training data), got {rate:g}")
        if rate != 1 and self.head not in ("binary", "esmm"):
            raise ValueError(f"task '{self.name}': negative_sampling_rate applies to binary and esmm heads (one "
                             f"probability per row), not {self.head}")
        return self

    @property
    def label_columns(self) -> list[str]:
        return list(self.label) if isinstance(self.label, list) else [self.label]


class ComponentConfig(BaseModel):
    """A plugin by registered name plus its keyword parameters, e.g. ``{name: mmoe, num_experts: 8}``."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataConfig(_Strict):
    """Parquet inputs (file, folder or glob), relative to the config file's folder."""

    train: str
    validation: str | None = None
    test: str | None = None
    shuffle_buffer: int = Field(262_144, ge=0)
    read_rows: int = Field(65_536, ge=1)


class EarlyStoppingConfig(_Strict):
    """``monitor``: ``auto`` (mean AUC when every task has one, else loss), ``loss``, ``TASK/METRIC`` or
    ``mean/METRIC`` (selects ``best.pt`` and when to stop), or a mapping ``{task: METRIC}`` (each task's best epoch
    by its own metric; stop when no task improved). Every task's best epoch is kept either way
    (``recmtl.training.early_stopping``); ``patience`` epochs without improvement before stopping (0 = never)."""

    monitor: str | dict[str, str] = "auto"
    patience: int = Field(2, ge=0)
    # monitor delta_m: the single-task metrics it is relative to, a `recmtl compare` directory (relative to the
    # config file) or a mapping {task: {metric: value}}
    reference: str | dict[str, dict[str, float]] | None = None

    @model_validator(mode="after")
    def _reference(self) -> EarlyStoppingConfig:
        if self.monitor == "delta_m" and self.reference is None:
            raise ValueError("monitor delta_m needs the single-task reference metrics: set early_stopping.reference "
                             "to a `recmtl compare` directory or to a mapping {task: {metric: value}}")
        if self.reference is not None and self.monitor != "delta_m":
            raise ValueError(f"early_stopping.reference applies to monitor delta_m only (monitor is {self.monitor!r})")
        return self


class OptimizerConfig(_Strict):
    name: Literal["adam", "adamw", "sgd", "adagrad"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    embedding_lr: float | None = Field(None, gt=0)
    # decoupled weight decay of the sparse embedding tables, on the rows each batch looks up (SparseAdam, sparse
    # SGD and Adagrad take none of their own): row *= 1 - embedding_lr * embedding_weight_decay per step it is seen
    embedding_weight_decay: float = Field(0.0, ge=0)


class TrainConfig(_Strict):
    batch_size: int = Field(2048, gt=0)
    epochs: int = Field(10, gt=0)
    eval_batch_size: int = Field(16_384, gt=0)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    threads: int | None = Field(None, gt=0)
    progress: bool = True
    # cpu, cuda or auto (cuda when available); batch_size is the global batch: under torchrun each of N
    # ranks takes batch_size / N rows a step
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: fp32 on CPU; on GPU bf16 autocast where supported, else fp16 with loss scaling
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # every N steps: weights, per-task gradient norms and cosines on the shared parameters -> balance.jsonl
    log_every: int = Field(200, ge=0)
    # every N steps the lookahead task affinity (TAG) -> affinity.jsonl; costs T gradients + T+1 forwards (0 = off)
    affinity_every: int = Field(0, ge=0)
    # also save last.pt inside an epoch: every N steps (an int) or every "30s" / "10m" / "1h" (0 = at epoch ends only);
    # --resume then continues from that step with the same batches as an uninterrupted run
    checkpoint_every: int | str = 0
    # an epoch = this many optimiser steps from a continuing stream of passes over the training data (each pass
    # shuffled on its own); validation, early stopping and checkpoints per epoch (null: an epoch is one pass)
    steps_per_epoch: int | None = Field(None, gt=0)

    @field_validator("checkpoint_every")
    @classmethod
    def _checkpoint_every(cls, v: int | str) -> int | str:
        if isinstance(v, int):
            if v < 0:
                raise ValueError("checkpoint_every must be 0 (off), a number of steps, or a duration like '10m'")
            return v
        if not re.fullmatch(r"\d+(\.\d+)?(s|m|h)", v.strip()):
            raise ValueError(f"checkpoint_every '{v}': use a number of steps (e.g. 500) or a duration: 30s, 10m, 1h")
        return v.strip()

    def checkpoint_interval(self) -> tuple[int, float]:
        """``checkpoint_every`` as (steps, seconds); 0 where it does not apply."""
        if isinstance(self.checkpoint_every, int):
            return self.checkpoint_every, 0.0
        value, unit = float(self.checkpoint_every[:-1]), self.checkpoint_every[-1]
        return 0, value * {"s": 1, "m": 60, "h": 3600}[unit]


class EvaluationConfig(_Strict):
    """``group_column``: a user-id column; binary tasks then also report GAUC."""

    group_column: str | None = None


class ExportConfig(_Strict):
    """``fuse``: the ranking score ``recmtl export`` adds when ``--fuse`` is not given (``recmtl.calibration``)."""

    fuse: str | None = None


class FeatureGatesConfig(_Strict):
    """Per-task field gates: each task scales every field of its input by its own learned ``2·sigmoid(a)`` (1 at the
    start), with an L1 penalty ``sparsity * sum(gates)`` added to the training loss."""

    sparsity: float = Field(0.0, ge=0)


class Config(_Strict):
    seed: int = 42
    plugins: list[str] = Field(default_factory=list)
    data: DataConfig
    features: list[FeatureConfig] = Field(min_length=1)
    tasks: list[TaskConfig] = Field(min_length=1)
    encoders: dict[str, ComponentConfig] = Field(default_factory=dict)
    # a feature-interaction block between the encoders and the tower (null: none, the encoders' flat vector)
    interaction: ComponentConfig | None = None
    feature_gates: FeatureGatesConfig | None = None  # per-task field gates (null: off)
    tower: ComponentConfig = Field(default_factory=lambda: ComponentConfig(name="shared_bottom"))
    balancer: ComponentConfig = Field(default_factory=lambda: ComponentConfig(name="fixed"))
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    # experiment loggers (plugins of kind logger): names, or {name: mlflow, tracking_uri: ...} with parameters
    loggers: list[str | ComponentConfig] = Field(default_factory=list)

    @field_validator("features")
    @classmethod
    def _unique_features(cls, features: list[FeatureConfig]) -> list[FeatureConfig]:
        _no_duplicates([f.name for f in features], "feature")
        return features

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        _no_duplicates([t.name for t in self.tasks], "task")
        feature_names = {f.name for f in self.features}
        kinds = {f.name: f.kind for f in self.features}
        for f in self.features:
            for key in ("vocabulary", "target"):
                other = getattr(f, key)
                if other is not None and kinds.get(other) != "categorical":
                    found = f"is a {kinds[other]} feature" if other in kinds else "is not a feature"
                    cats = ", ".join(n for n, k in kinds.items() if k == "categorical") or "none"
                    raise ValueError(f"feature '{f.name}': {key} '{other}' {found}; expected a categorical "
                                     f"feature (categorical features: {cats})")
        for task in self.tasks:
            for label in task.label_columns:
                if label in feature_names:
                    raise ValueError(
                        f"column '{label}' is the label of task '{task.name}' and also a feature: "
                        "a model would read its own answer; remove it from features"
                    )
        if self.export.fuse is not None:  # checked here, before any data is read; export checks it again per head
            from recmtl.calibration import fuse_expression
            from recmtl.errors import ConfigError
            scalar = [t.name for t in self.tasks if t.head not in ("multiclass", "multilabel")]
            try:
                fuse_expression(self.export.fuse, scalar, where="export.fuse")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return self

    # where relative data paths are resolved
    _base_dir: Path = Path(".")

    def resolve(self, path: str | None) -> str | None:
        if path is None:
            return None
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else self._base_dir / p)

    def plugin_modules(self) -> list[str]:
        """``plugins`` with ``.py`` paths resolved against the config file's folder."""
        return [self.resolve(p) if p.endswith(".py") else p for p in self.plugins]

    def logger_components(self) -> list[ComponentConfig]:
        """``loggers`` as components (a bare name has no parameters)."""
        return [ComponentConfig(name=item) if isinstance(item, str) else item for item in self.loggers]

    def columns(self) -> list[str]:
        """Every column a training run reads."""
        cols = [f.name for f in self.features] + [c for t in self.tasks for c in t.label_columns]
        if self.evaluation.group_column:
            cols.append(self.evaluation.group_column)
        return list(dict.fromkeys(cols))


def _no_duplicates(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"duplicate {what} name '{name}'")
        seen.add(name)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{loc}'")
        elif err["type"] == "missing":
            lines.append(f"missing required key '{loc}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg}" if err["loc"] else msg)
    return f"invalid config {source}: " + "; ".join(lines)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply one ``a.b.c=value`` override to a nested dict."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{key}' is not a section")
    node[keys[-1]] = value


def parse_config(raw: dict[str, Any], base_dir: Path = Path("."), source: str = "") -> Config:
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
    config._base_dir = base_dir
    return config


def read_raw(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config {path} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of keys (data, features, tasks, ...)")
    return raw


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read, apply ``key.path=value`` overrides (values parsed as YAML), and validate."""
    raw = read_raw(path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        key, value = item.split("=", 1)
        set_dotted(raw, key.strip(), yaml.safe_load(value))
    return parse_config(raw, Path(path).resolve().parent, f"{path}")


def _keep_null_params(model: Any, data: Any) -> None:
    """Put back the plugin parameters set to null that ``exclude_none`` dropped (``rank: null`` is not the
    parameter's default when that is not null), in ``data``, the dump of ``model``, recursively."""
    if isinstance(model, ComponentConfig) and isinstance(data, dict):
        data.update({k: None for k, v in (model.model_extra or {}).items() if v is None})
    if isinstance(model, BaseModel) and isinstance(data, dict):
        for name in type(model).model_fields:
            if name in data:
                _keep_null_params(getattr(model, name), data[name])
    elif isinstance(model, dict) and isinstance(data, dict):
        for key, value in model.items():
            if key in data:
                _keep_null_params(value, data[key])
    elif isinstance(model, (list, tuple)) and isinstance(data, list):
        for value, dumped in zip(model, data):
            _keep_null_params(value, dumped)


def dump_config(config: Config) -> str:
    data = config.model_dump(mode="json", exclude_none=True)
    _keep_null_params(config, data)
    data["plugins"] = config.plugin_modules()
    for key in ("train", "validation", "test"):
        if data["data"].get(key):
            data["data"][key] = config.resolve(data["data"][key])
    reference = data["train"]["early_stopping"].get("reference")
    if isinstance(reference, str):
        data["train"]["early_stopping"]["reference"] = config.resolve(reference)
    return yaml.safe_dump(data, sort_keys=False)
