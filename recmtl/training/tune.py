"""``recmtl tune``: hyperparameter search with Optuna over any config key.

The search space is YAML, one entry per dotted config key::

    optimizer.lr: {float: [1.0e-4, 1.0e-2], log: true}
    tower.num_experts: {int: [2, 16]}
    train.batch_size: {choice: [512, 1024, 2048]}
    tower:                                  # a plugin section: the choice is its name, each with its own space
      choice:
        mmoe: {num_experts: {int: [2, 8]}}
        ple: {num_levels: {int: [1, 3]}}

Every key, range and plugin parameter is checked against the config before any trial. Each trial is an ordinary
run directory (``OUT/trials/trial-NNNN``); the study lives in an Optuna storage (SQLite by default), so a killed
``tune`` resumes and several processes share one study. Pruning reads the per-epoch validation metric through
the ``recmtl_epoch_end`` hook. At the end: ``best.yaml``, ``trials.csv``, the top trials and the study's plots.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from recmtl import hookimpl
from recmtl.config import Config, parse_config, read_raw, set_dotted
from recmtl.errors import ConfigError, RecmtlError
from recmtl.files import atomic_path, write_text
from recmtl.registry import Registry

#: metrics where larger is better (the study maximises them; others are minimised)
HIGHER_IS_BETTER = frozenset({"auc", "gauc", "accuracy", "f1", "r2"})
#: sections whose value is a plugin ``{name: ..., params}``: a choice over them picks the plugin's name
COMPONENT_KEYS = ("tower", "balancer")
SPEC_KINDS = ("int", "float", "choice")
SPEC_OPTIONS = {"int": {"log", "step"}, "float": {"log", "step"}, "choice": set()}
WORKER_ENV = "RECMTL_TUNE_WORKER"  # set in the processes `--workers` starts: they run trials, the parent reports
TOP = 10
MAX_FAILURES = 3  # trials in a row that fail stop the study
#: what fails one trial (recorded in the study, the search goes on): user-input errors and torch's runtime errors
TRIAL_ERRORS = (RecmtlError, RuntimeError, ValueError, FloatingPointError)


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("recmtl tune needs Optuna: pip install 'recmtl[tune]'") from None
    import warnings
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# ---- the search space ----------------------------------------------------------------------------------------
@dataclass
class Param:
    """One searched config key. ``name`` is Optuna's parameter name (a branch's: ``tower=ple:num_levels``)."""

    key: str
    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)
    branches: dict[Any, list[Param]] = field(default_factory=dict)
    #: a list-valued choice (``expert_units: {choice: [[64], [128, 64]]}``) by the label Optuna sees (``"[64]"``)
    lists: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def is_component(self) -> bool:
        return self.kind == "choice" and is_component_key(self.key)

    def distribution_args(self) -> dict[str, Any]:
        if self.kind == "choice":
            return {"choices": self.choices}
        args: dict[str, Any] = {"low": self.low, "high": self.high, "log": self.log}
        if self.step is not None:
            args["step"] = self.step
        return args


def is_component_key(key: str) -> bool:
    """``tower``, ``balancer`` or ``encoders.KIND``: a section naming a plugin."""
    parts = key.split(".")
    return key in COMPONENT_KEYS or (len(parts) == 2 and parts[0] == "encoders")


def _number(value: Any, integer: bool) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) if integer else (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))


def parse_space(raw: Any, source: str = "the space") -> list[Param]:
    """Parse and check the space's form (kinds, ranges, options); keys are checked against the config later."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source} must be a mapping of config keys to ranges, e.g. optimizer.lr: "
                          "{float: [1.0e-4, 1.0e-2], log: true}")
    return [_parse_param(str(key), spec, source, str(key)) for key, spec in raw.items()]


def _parse_param(key: str, spec: Any, source: str, name: str) -> Param:
    where = f"{source}: '{key}'"
    kinds = [k for k in SPEC_KINDS if isinstance(spec, dict) and k in spec]
    if len(kinds) != 1:
        raise ConfigError(f"{where} must be one of {{int: [LOW, HIGH]}}, {{float: [LOW, HIGH]}} (options log, step) "
                          f"or {{choice: [A, B, ...]}}, got {spec!r}")
    kind = kinds[0]
    unknown = set(spec) - {kind} - SPEC_OPTIONS[kind]
    if unknown:
        allowed = ", ".join(sorted(SPEC_OPTIONS[kind])) or "no options"
        raise ConfigError(f"{where}: unknown option(s) {', '.join(sorted(map(str, unknown)))} for {kind} (it takes {allowed})")
    if kind == "choice":
        choices = spec["choice"]
        if isinstance(choices, dict):
            if not choices:
                raise ConfigError(f"{where}: choice needs at least one value")
            branches = {}
            for value, sub in choices.items():
                sub = sub or {}
                if not isinstance(sub, dict):
                    raise ConfigError(f"{where}: the space of choice '{value}' must be a mapping of keys to ranges")
                prefix = f"{key}." if is_component_key(key) else ""
                branches[value] = [_parse_param(f"{prefix}{k}", s, source, f"{name}={value}:{k}") for k, s in sub.items()]
            return Param(key, name, kind, choices=list(choices), branches=branches)
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choice must be a non-empty list of values (or a mapping value -> its space)")
        scalar = (bool, int, float, str)
        bad = [c for c in choices if not (c is None or isinstance(c, scalar)
                                          or (isinstance(c, list) and all(isinstance(v, scalar) for v in c)))]
        if bad:
            raise ConfigError(f"{where}: choice values must be numbers, strings, booleans, null or lists of "
                              f"numbers/strings (e.g. layer widths [128, 64]); got {bad[0]!r}")
        lists = {json.dumps(c): c for c in choices if isinstance(c, list)}
        clash = [c for c in choices if isinstance(c, str) and c in lists]
        if clash:
            raise ConfigError(f"{where}: the string choice {clash[0]!r} reads like the list choice {clash[0]}; "
                              "keep one of them")
        return Param(key, name, kind, choices=[json.dumps(c) if isinstance(c, list) else c for c in choices],
                     lists=lists)
    integer = kind == "int"
    bounds = spec[kind]
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(_number(b, integer) for b in bounds)):
        raise ConfigError(f"{where}: {kind} needs [LOW, HIGH] with two {'integers' if integer else 'numbers'}, got {bounds!r}")
    low, high = bounds
    if not low < high:
        raise ConfigError(f"{where}: {kind} range [{low}, {high}] is empty or reversed; LOW must be below HIGH")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false")
    if log and low <= 0:
        raise ConfigError(f"{where}: log: true needs LOW > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        if not _number(step, integer) or step <= 0:
            raise ConfigError(f"{where}: step must be a positive {'integer' if integer else 'number'}, got {step!r}")
        if log:
            raise ConfigError(f"{where}: step and log: true do not go together (Optuna samples one or the other)")
    return Param(key, name, kind, float(low) if not integer else low, float(high) if not integer else high, log, step)


def apply_value(raw: dict[str, Any], param: Param, value: Any) -> None:
    """Set one sampled value in a raw config; a plugin choice replaces the section unless it names the same plugin."""
    if param.is_component:
        section = _get(raw, param.key)
        if isinstance(section, dict) and section.get("name") == value:
            return
        set_dotted(raw, param.key, {"name": value})
        return
    if isinstance(value, str) and value in param.lists:
        value = list(param.lists[value])
    set_dotted(raw, param.key, value)


def _get(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def apply_params(raw: dict[str, Any], space: list[Param], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with the values of one trial (Optuna parameter name -> value) applied."""
    out = copy.deepcopy(raw)

    def walk(params: list[Param]) -> None:
        for p in params:
            if p.name in values:
                apply_value(out, p, values[p.name])
                if p.branches:
                    walk(p.branches.get(values[p.name], []))
    walk(space)
    return out


def _corners(param: Param) -> list[tuple[dict[str, Any], str]]:
    """Value sets that exercise every bound and choice of ``param`` (and its branches): ``(values, label)``."""
    if param.kind != "choice":
        low = param.low if param.kind == "int" else float(param.low)
        return [({param.name: low}, f"{param.key}={low}"), ({param.name: param.high}, f"{param.key}={param.high}")]
    out = []
    for c in param.choices:
        base = {param.name: c}
        out.append((base, f"{param.key}={c}"))
        for sub in param.branches.get(c, []):
            out += [({**base, **v}, f"{param.key}={c}, {label}") for v, label in _corners(sub)]
    return out


def check_space(raw: dict[str, Any], space: list[Param], registry: Registry, base_dir: Path, source: str) -> None:
    """Build the config at every bound and choice of every key and check it as ``recmtl train`` would (unknown keys,
    bad values, plugin names and parameters), before any trial."""
    from recmtl.training.model import validate_plugins
    for param in space:
        for values, label in _corners(param):
            try:
                cfg = parse_config(apply_params(raw, space, values), base_dir, source)
                validate_plugins(cfg, registry)
            except RecmtlError as exc:
                raise ConfigError(f"{source}: with {label}: {exc}") from None


def fingerprint(space_raw: Any, metric: str) -> str:
    """What identifies a study's search: the space and the metric (a study refuses another one)."""
    return json.dumps({"space": space_raw, "metric": metric}, sort_keys=True, default=str)


# ---- the metric ----------------------------------------------------------------------------------------------
def metric_value(validation: dict[str, dict[str, float]] | None, metric: str) -> float | None:
    """``mean/METRIC`` (mean over the tasks that report it) or ``TASK/METRIC`` from an epoch's validation record."""
    if not validation:
        return None
    scope, _, name = metric.partition("/")
    if scope == "mean":
        values = [m[name] for m in validation.values() if isinstance(m.get(name), (int, float))]
        value = float(np.nanmean(values)) if values and not all(math.isnan(v) for v in values) else None
    else:
        value = (validation.get(scope) or {}).get(name)
    return float(value) if value is not None and math.isfinite(value) else None


def check_metric(metric: str, config: Config) -> str:
    """The study's direction for ``metric``; refuses a metric the run cannot report."""
    scope, sep, name = metric.partition("/")
    tasks = [t.name for t in config.tasks]
    if not sep or not name or (scope != "mean" and scope not in tasks):
        raise ConfigError(f"--metric '{metric}' must be mean/METRIC or TASK/METRIC with TASK one of {', '.join(tasks)} "
                          "(e.g. mean/auc, click/logloss)")
    if not config.data.validation:
        raise ConfigError("recmtl tune selects on the validation data: set data.validation in the config")
    return "maximize" if name in HIGHER_IS_BETTER else "minimize"


class Pruning:
    """Reports each epoch's metric to the trial and prunes it when the pruner says so (an observer of one run)."""

    def __init__(self, trial: Any, metric: str, optuna: Any) -> None:
        self.trial, self.metric, self.optuna = trial, metric, optuna
        self.values: list[float] = []

    @hookimpl
    def recmtl_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        value = metric_value(metrics.get("validation"), self.metric)
        if value is None:
            return
        self.values.append(value)
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise self.optuna.TrialPruned(f"pruned after epoch {epoch} ({self.metric} = {value:.4f})")


# ---- storage and study ---------------------------------------------------------------------------------------
def open_storage(url: str, optuna: Any) -> Any:
    """An Optuna storage: an RDB URL (``sqlite:///study.db``, ``postgresql://...``; with heartbeats, so a killed
    process's trial is failed and retried) or ``journal:PATH`` (a journal file, for many processes on one machine)."""
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend
            path = Path(url.removeprefix("journal:")).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
        retry_class = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
            optuna.storages.RetryFailedTrialCallback
        retry = retry_class(max_retry=1)
        return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120,
                                          heartbeat_stale_trial_callback=retry,
                                          engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None)
    except Exception as exc:  # sqlalchemy's URL, driver and connection errors, a journal path that cannot be written
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"--storage {url}: cannot open it ({first}); expected an RDB URL such as "
                          "sqlite:///study.db or postgresql://user@host/db, or journal:PATH") from None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine exists (a zombie counts as alive; pid reuse is not detected)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def fail_dead_trials(study: Any, storage: Any, optuna: Any, echo: Any) -> list[int]:
    """Optuna's ``JournalStorage`` has no heartbeat, so the trial of a killed worker would stay RUNNING for ever:
    each RUNNING trial whose worker (user attrs ``host`` and ``pid``) ran on this machine and no longer exists is
    marked FAIL and queued again with the same parameters (``RetryHeartbeatStaleTrialCallback``, once, as the RDB
    storages' heartbeat does). Trials of workers on other machines cannot be checked and are left as they are.
    Returns the numbers of the trials failed here."""
    if not isinstance(storage, optuna.storages.JournalStorage):
        return []  # the RDB storages fail stale trials themselves (heartbeat_interval / grace_period)
    retry_class = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    retry, host, failed = retry_class(max_retry=1), socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if trial.user_attrs.get("host") != host or not isinstance(pid, int) or pid == os.getpid() or _alive(pid):
            continue
        try:
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        except Exception:  # another process finished or failed it meanwhile
            continue
        retry(study, storage.get_trial(trial._trial_id))
        failed.append(trial.number)
        echo(f"trial {trial.number}: its process {pid} on this machine is gone (the journal storage has no "
             "heartbeat); marked failed and queued again with the same parameters")
    return failed


def open_study(storage: Any, name: str, direction: str, pruner: str, seed: int | None, mark: str, url: str,
               optuna: Any) -> Any:
    """Create or load the study; one created with another space or metric is refused."""
    pruners = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
               "none": optuna.pruners.NopPruner}
    if pruner not in pruners:
        raise ConfigError(f"--pruner '{pruner}': expected median or none")
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=direction, load_if_exists=True,
                                    sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruners[pruner]())
    except Exception as exc:
        raise ConfigError(f"--storage {url}: cannot open study '{name}' ({str(exc).splitlines()[0]})") from None
    saved = study.user_attrs.get("recmtl.search")
    if saved is None and not study.trials:
        study.set_user_attr("recmtl.search", mark)
    elif saved != mark or study.direction.name.lower() != direction:
        raise ConfigError(f"study '{name}' in {url} was made with another search space or metric; resume it with the "
                          f"same --space and --metric, or start a new study with --study NEW_NAME")
    return study


# ---- running ---------------------------------------------------------------------------------------------------
@dataclass
class TuneOptions:
    config: Path
    space: Path
    trials: int
    out: Path
    storage: str | None = None
    study: str | None = None
    workers: int = 1
    metric: str = "mean/auc"
    pruner: str = "median"
    seed: int | None = None
    overrides: list[str] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)


def tune(opts: TuneOptions, echo: Any = print) -> dict[str, Any] | None:
    """Run (or resume) the study until it holds ``opts.trials`` finished trials; the parent process writes the
    results and returns ``{best_value, best_params, best_config, ...}`` (``None`` in a worker process)."""
    optuna = _optuna()
    from recmtl.registry import load_registry
    raw = read_raw(opts.config)
    for item in opts.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        set_dotted(raw, key.strip(), yaml.safe_load(value))
    base_dir = opts.config.resolve().parent
    config = parse_config(raw, base_dir, str(opts.config))
    registry = load_registry([*config.plugin_modules(), *opts.plugins], opts.disabled)
    direction = check_metric(opts.metric, config)
    if not opts.space.is_file():
        raise ConfigError(f"--space file not found: {opts.space}")
    try:
        space_raw = yaml.safe_load(opts.space.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"--space {opts.space} is not valid YAML: {exc}") from None
    space = parse_space(space_raw, f"--space {opts.space}")
    check_space(raw, space, registry, base_dir, f"--space {opts.space}")
    if opts.trials < 1 or opts.workers < 1:
        raise ConfigError("--trials and --workers must be at least 1")

    url = opts.storage or f"sqlite:///{(opts.out / 'study.db').resolve()}"
    name = opts.study or opts.config.stem
    worker = int(os.environ.get(WORKER_ENV, "0"))
    seed = None if opts.seed is None else opts.seed + worker
    storage = open_storage(url, optuna)
    study = open_study(storage, name, direction, opts.pruner, seed, fingerprint(space_raw, opts.metric), url, optuna)
    if not worker:
        fail_dead_trials(study, storage, optuna, echo)
    children = []
    if not worker:
        for i in range(1, opts.workers):  # Optuna's distributed mode: K processes on one study
            argv = [sys.executable, "-m", "recmtl.cli", *sum((["--plugin", p] for p in opts.plugins), []),
                    *sum((["--disable-plugin", p] for p in opts.disabled), []),
                    "tune", str(opts.config), "--space", str(opts.space), "--trials", str(opts.trials), "--out",
                    str(opts.out), "--storage", url, "--study", name, "--metric", opts.metric, "--pruner", opts.pruner,
                    *(["--seed", str(opts.seed)] if opts.seed is not None else []),
                    *sum((["--set", s] for s in opts.overrides), [])]
            children.append(subprocess.Popen(argv, env={**os.environ, WORKER_ENV: str(i)}, stdout=subprocess.DEVNULL))
        echo(f"study '{name}' in {url}: {_done(study, optuna)} of {opts.trials} trials done; "
             f"{opts.workers} process(es), {opts.metric} ({direction}), pruner {opts.pruner}")
    threads = raw.get("train", {}).get("threads") or max(1, (os.cpu_count() or 1) // opts.workers)
    objective = _objective(raw, space, registry, base_dir, opts, threads, optuna)
    stop = optuna.study.MaxTrialsCallback(opts.trials, states=(optuna.trial.TrialState.COMPLETE,
                                                               optuna.trial.TrialState.PRUNED))
    failures: list[str] = []
    try:
        if _done(study, optuna) < opts.trials:
            study.optimize(objective, callbacks=[stop, _progress(opts, echo, optuna, failures)], catch=TRIAL_ERRORS,
                           gc_after_trial=True)
    finally:
        for child in children:
            if child.wait() != 0:
                echo(f"warning: tune worker process {child.pid} exited with status {child.returncode}")
    if len(failures) >= MAX_FAILURES:
        raise ConfigError(f"{len(failures)} trials in a row failed, the study stopped; the last: {failures[-1]} "
                          f"(logs: {opts.out / 'trials'}/trial-NNNN.log)")
    if worker:
        return None
    return write_results(study, raw, space, opts, echo, optuna)


def _done(study: Any, optuna: Any) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def _objective(raw: dict[str, Any], space: list[Param], registry: Registry, base_dir: Path, opts: TuneOptions,
               threads: int, optuna: Any) -> Any:
    from recmtl.training.loop import train

    def suggest(trial: Any, params: list[Param], values: dict[str, Any]) -> None:
        for p in params:
            if p.kind == "int":
                values[p.name] = trial.suggest_int(p.name, **p.distribution_args())
            elif p.kind == "float":
                values[p.name] = trial.suggest_float(p.name, **p.distribution_args())
            else:
                values[p.name] = trial.suggest_categorical(p.name, p.choices)
                suggest(trial, p.branches.get(values[p.name], []), values)

    def objective(trial: Any) -> float:
        values: dict[str, Any] = {}
        suggest(trial, space, values)
        trial_raw = apply_params(raw, space, values)
        train_raw = trial_raw.setdefault("train", {})
        train_raw["progress"] = False
        train_raw.setdefault("threads", threads)
        if not any(p.key.startswith("train.early_stopping.monitor") for p in space):
            train_raw.setdefault("early_stopping", {})["monitor"] = opts.metric
        trial_raw.setdefault("data", {})["test"] = None  # selection on validation; the test set is for the winner
        config = parse_config(trial_raw, base_dir, f"trial {trial.number}")
        run_dir = opts.out / "trials" / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", socket.gethostname())
        pruning = Pruning(trial, opts.metric, optuna)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir.parent / f"trial-{trial.number:04d}.log", "w") as log, contextlib.redirect_stderr(log):
            try:
                summary = train(config, run_dir, registry, observers=[pruning])
            except TRIAL_ERRORS as exc:  # e.g. a learning rate that makes the loss diverge: this trial fails
                trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                raise
        scores = [metric_value(r.get("validation"), opts.metric) for r in summary["history"]]
        scores = [s for s in scores if s is not None]
        if not scores:
            raise ConfigError(f"trial {trial.number}: {opts.metric} was never defined on the validation data")
        return max(scores) if opts.metric.split("/")[1] in HIGHER_IS_BETTER else min(scores)
    return objective


def _progress(opts: TuneOptions, echo: Any, optuna: Any, failures: list[str]) -> Any:
    def report(study: Any, trial: Any) -> None:
        if trial.state == optuna.trial.TrialState.FAIL:
            failures.append(trial.user_attrs.get("error", "failed"))
            if len(failures) >= MAX_FAILURES:  # e.g. a value every trial gets wrong: stop, do not loop forever
                study.stop()
        else:
            failures.clear()
        state = trial.state.name.lower()
        if trial.state == optuna.trial.TrialState.PRUNED:
            last = trial.intermediate_values.get(trial.last_step) if trial.last_step is not None else None
            what = f"after epoch {trial.last_step}" + (f" ({opts.metric} {last:.4f})" if last is not None else "")
        elif trial.value is not None:
            what = f"{opts.metric} {trial.value:.4f}"
        else:
            what = trial.user_attrs.get("error", "")
        try:
            best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:
            best = "no finished trial yet"
        echo(f"trial {trial.number} {state} {what} | {_done(study, optuna)}/{opts.trials} done, {best}")
    return report


def write_results(study: Any, raw: dict[str, Any], space: list[Param], opts: TuneOptions, echo: Any,
                  optuna: Any) -> dict[str, Any]:
    """``best.yaml`` (ready for ``recmtl train``), ``trials.csv``, the top-trials table and ``plots/*.png``."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise ConfigError(f"study '{study.study_name}' has no completed trial (see {opts.out / 'trials'}/*.log)")
    best = study.best_trial
    best_raw = apply_params(raw, space, best.params)
    best_path = opts.out / "best.yaml"
    header = (f"# recmtl tune: study '{study.study_name}', trial {best.number}, {opts.metric} = {best.value:.6f}\n"
              f"# params: {json.dumps(best.params, default=str)}\n")
    write_text(best_path, header + yaml.safe_dump(best_raw, sort_keys=False))
    frame = study.trials_dataframe(attrs=("number", "value", "state", "duration", "params", "user_attrs"))
    with atomic_path(opts.out / "trials.csv") as tmp:
        frame.to_csv(tmp, index=False)
    higher = study.direction == optuna.study.StudyDirection.MAXIMIZE
    ranked = sorted(complete, key=lambda t: t.value, reverse=higher)[:TOP]
    echo(top_table(ranked, opts.metric))
    pruned = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)))
    plots = write_plots(study, opts.out / "plots", echo)
    echo(f"{len(complete)} complete, {pruned} pruned; best {opts.metric} {best.value:.4f} (trial {best.number}); "
         f"wrote {best_path} (recmtl train {best_path} --out RUN), {opts.out / 'trials.csv'}, "
         f"{len(plots)} plot(s) in {opts.out / 'plots'}")
    return {"best_value": best.value, "best_params": best.params, "best_trial": best.number,
            "best_config": str(best_path), "complete": len(complete), "pruned": pruned, "plots": plots}


def top_table(trials: list[Any], metric: str) -> str:
    names = sorted({k for t in trials for k in t.params})
    rows = [["trial", metric, "seconds", *names]]
    for t in trials:
        seconds = t.duration.total_seconds() if t.duration else float("nan")
        rows.append([str(t.number), f"{t.value:.4f}", f"{seconds:.0f}",
                     *[_short(t.params[n]) if n in t.params else "-" for n in names]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_plots(study: Any, folder: Path, echo: Any) -> list[str]:
    """Optuna's optimisation history, parameter importances and parallel coordinates as PNGs (matplotlib), and
    the interactive HTML plots (``write_html_plots``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import warnings

        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as vis
    except ImportError:
        echo("no plots: matplotlib is not installed (pip install 'recmtl[tune]')")
        return []
    written = []
    for name, plot in [("history", vis.plot_optimization_history), ("importances", vis.plot_param_importances),
                       ("parallel_coordinate", vis.plot_parallel_coordinate)]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = plot(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            path = folder / f"{name}.png"
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=100)
            plt.close(fig)
            written.append(str(path))
        except Exception as exc:  # e.g. importances need two completed trials with varying parameters
            echo(f"no {name} plot: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return written + write_html_plots(study, folder, echo)


def write_html_plots(study: Any, folder: Path, echo: Any) -> list[str]:
    """Optuna's interactive plots (plotly): ``history``, ``importances``, ``parallel_coordinate`` and ``slice`` as
    HTML sharing one ``plotly.min.js`` in ``folder`` (viewable offline)."""
    try:
        import plotly  # noqa: F401
        from optuna import visualization as vis
    except ImportError:
        echo("no HTML plots: plotly is not installed (pip install 'recmtl[tune]')")
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in [("history", vis.plot_optimization_history), ("importances", vis.plot_param_importances),
                       ("parallel_coordinate", vis.plot_parallel_coordinate), ("slice", vis.plot_slice)]:
        try:
            fig = plot(study)
            path = folder / f"{name}.html"
            with atomic_path(path) as tmp:
                fig.write_html(str(tmp), include_plotlyjs="directory", full_html=True)
            written.append(str(path))
        except Exception as exc:  # e.g. importances need two completed trials with varying parameters
            echo(f"no {name} HTML plot: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return written

