"""``recmtl init`` reads the data: a profile of every column of a sample (type, distinct values, nulls, skewness,
string lengths) and a proposal with its reason: which feature kind, with which options, or why not a feature.

The rules, in the order they are tried (documented in docs/training.md, "What init proposes"):

* a pandas index column (``__index_level_0__``, or named in the pandas metadata) is skipped;
* a column always null, or holding one value and no nulls, is skipped (nothing to learn);
* a column whose name looks like an outcome (``is_click``, ``purchase``, ``play_time_ms``, ``label``; see
  :data:`OUTCOME_WORDS`, :func:`looks_like_outcome`), or a 0/1 column whose positives nest with a binary task's (a funnel stage), is
  excluded with a warning: it is probably another task's label, a leak;
* Arrow timestamps, dates and times, strings shaped like dates, and integers named like a time holding Unix
  epoch values are excluded (derived features such as hour or weekday are not built);
* strings: free text (median length >= :data:`TEXT_MIN_LENGTH`, most values with a space, many distinct) is
  ``kind: text`` (hashed words and bigrams, :data:`TEXT_HASH_BUCKETS`); near-unique strings (>= :data:`NEAR_UNIQUE` of the sampled rows
  distinct) are excluded as ids that never repeat; others are categorical;
* integers named like an id or a code (:data:`ID_WORDS`) follow the string id rules; other integers are
  categorical up to :data:`SMALL_INT` distinct values, excluded when near-unique and filling their range
  (a row number); above that they are dense unless the data says they are codes: per value, the tasks'
  labels explain more than per range of values (:func:`code_or_number`);
* floats and decimals are dense; a dense column is ``transform: log1p`` when it is heavy-tailed (sample
  skewness above :data:`HEAVY_SKEW` in absolute value) and sign(x)*log1p(|x|) is not (log-normal like: counts,
  prices, durations); a column of mostly zeros and a few large values stays heavy-tailed after the transform
  and keeps ``none``;
* a categorical column is hashed (``hash_buckets``) when it would have more than :data:`HASH_ABOVE` values;
  its ``min_count`` is raised when its vocabulary is long-tailed (:func:`propose_min_count`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recmtl.data.arrow import plain_array
from recmtl.data.parquet import ParquetSource

#: rows read to profile the columns (row groups in a seeded random order; all rows when fewer)
SAMPLE_ROWS = 200_000
#: a string/id column with at least this share of the sampled rows distinct is near-unique (an id that rarely repeats)
NEAR_UNIQUE = 0.5
#: ...and at least this many distinct values (a 3-row file is not "near-unique")
NEAR_UNIQUE_MIN = 20
#: integers with at most this many distinct values (and no id-like name) are categorical, more are numbers
SMALL_INT = 32
#: |skewness| above which a dense column may be heavy-tailed
HEAVY_SKEW = 2.0
#: free text: median length in characters
TEXT_MIN_LENGTH = 20
#: free text: the n-gram hash buckets proposed (``kind: text``)
TEXT_HASH_BUCKETS = 100_000
#: a categorical column with more estimated distinct values than this gets hash_buckets instead of a vocabulary
HASH_ABOVE = 1_000_000
HASH_BUCKETS = 1 << 20
#: long tail: a vocabulary whose values seen fewer than TAIL_COUNT times (estimated over the whole file) are at
#: least TAIL_SHARE of its distinct values gets min_count TAIL_COUNT
TAIL_COUNT = 5
TAIL_SHARE = 0.5
#: ...when it has at least this many distinct values (a handful of values has no tail)
TAIL_MIN_VALUES = 50

#: name tokens of columns that usually record what happened after the impression (a label, never a feature)
OUTCOME_WORDS = frozenset({
    "click", "clicked", "purchase", "purchased", "buy", "bought", "conversion", "converted", "convert", "order",
    "ordered", "label", "labels", "target", "outcome", "like", "liked", "share", "shared", "follow", "followed",
    "comment", "commented", "forward", "forwarded", "hate", "finish", "finished", "complete", "completed",
    "rating", "rated", "watch", "watched", "play", "played", "stay", "dwell", "engaged", "engagement", "skip",
    "skipped", "response", "responded", "churn", "churned", "cart", "carted", "favorite", "favourite", "fav",
})
#: name tokens of aggregates over the past (``follow_user_num``, ``click_count_7d``): features, not outcomes
AGGREGATE_WORDS = frozenset({
    "num", "number", "count", "counts", "cnt", "total", "sum", "avg", "mean", "rate", "ratio", "ctr", "cvr",
    "range", "hist", "history", "historical", "prev", "previous", "past", "last", "days", "day", "week", "month",
    "user", "users", "item", "items", "score", "prob", "pred", "predicted", "per", "before", "recent", "level",
})
#: name tokens of integer columns that are identifiers or codes (categorical however many values they have)
ID_WORDS = frozenset({"id", "ids", "key", "uuid", "guid", "code", "zip", "zipcode", "postcode", "type", "category",
                      "categorical", "cat", "class", "group", "kind", "status", "flag", "sku", "index", "idx"})
TIME_WORDS = frozenset({"time", "timestamp", "ts", "date", "datetime", "created", "updated", "epoch"})
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?$")
_INDEX = re.compile(r"^__index_level_\d+__$")


def name_tokens(name: str) -> list[str]:
    """``playTimeMs`` / ``play_time_ms`` / ``Play Time`` -> ``["play", "time", "ms"]``."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [t.lower() for t in re.split(r"[^A-Za-z0-9]+", spaced) if t]


def looks_like_outcome(name: str) -> bool:
    """A name with an outcome word and neither an aggregate nor an id word (``is_click``, ``purchase``,
    ``play_time_ms``, not ``order_id`` or ``click_count_7d``), or ``y``/``y1``-style."""
    tokens = name_tokens(name)
    if len(tokens) == 1 and re.fullmatch(r"y\d*", tokens[0]):
        return True
    return any(t in OUTCOME_WORDS for t in tokens) and not any(t in AGGREGATE_WORDS or t in ID_WORDS for t in tokens)


def looks_like_id(name: str) -> bool:
    tokens = name_tokens(name)
    return any(t in ID_WORDS for t in tokens) or name.endswith(("Id", "ID"))


def skewness(x: np.ndarray) -> float:
    """Sample skewness (0 for fewer than 3 values or a constant)."""
    if len(x) < 3:
        return 0.0
    d = x - x.mean()
    m2 = float(np.mean(d * d))
    if m2 <= 1e-24 * max(1.0, float(np.mean(x * x))):
        return 0.0
    return float(np.mean(d * d * d)) / m2 ** 1.5


def signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def heavy_tail(x: np.ndarray) -> tuple[bool, float, float]:
    """(log1p helps?, skewness, skewness after sign(x)*log1p(|x|)) of finite values ``x``: heavy-tailed
    (|skewness| > :data:`HEAVY_SKEW`) and no longer after the transform. Census-income's capital gains (95 %
    zeros; skewness 19.0, 5.0 after) trained 0.0010-0.0014 test AUC worse with the transform than without."""
    before = skewness(x)
    after = skewness(signed_log1p(x))
    return abs(before) > HEAVY_SKEW and abs(after) <= HEAVY_SKEW, before, after


def propose_min_count(counts: np.ndarray, scale: float) -> int:
    """``min_count`` for a vocabulary with these per-value ``counts`` in a sample that is ``1/scale`` of the file:
    :data:`TAIL_COUNT` when values seen fewer than that many times (estimated ``count * scale``) make up at least
    :data:`TAIL_SHARE` of the distinct values (and there are at least :data:`TAIL_MIN_VALUES`), else 1."""
    if len(counts) < TAIL_MIN_VALUES:
        return 1
    rare = float(np.mean(counts * scale < TAIL_COUNT))
    return TAIL_COUNT if rare >= TAIL_SHARE else 1


@dataclass
class Proposal:
    """One column of the data: its profile and what init proposes for it. ``feature`` is the config entry
    (None: not a feature); ``decision`` a short word for the table; ``reason`` one line, also the YAML comment."""

    name: str
    type: str
    distinct: int
    rows: int
    null_share: float
    decision: str = ""
    reason: str = ""
    feature: dict[str, Any] | None = None
    warning: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> str:
        return f"{self.distinct:,}/{self.rows:,}"


def read_sample(source: ParquetSource, columns: list[str], rows: int = SAMPLE_ROWS) -> pa.Table:
    """Up to ``rows`` rows of ``columns``: row groups in a seeded random order (all rows when the file has fewer)."""
    rng = np.random.default_rng(0) if source.num_rows > rows else None
    batches, taken = [], 0
    for batch in source.batches(read_rows=65_536, rng=rng, columns=columns):
        batches.append(batch.slice(0, rows - taken))
        taken += min(batch.num_rows, rows - taken)
        if taken >= rows:
            break
    if not batches:
        return pa.table({c: pa.nulls(0, source.field(c).type) for c in columns})
    return pa.Table.from_batches(batches)


def pandas_index_columns(schema: pa.Schema) -> set[str]:
    meta = (schema.metadata or {}).get(b"pandas")
    found = {n for n in schema.names if _INDEX.match(n)}
    if meta:
        try:
            found |= {c for c in json.loads(meta).get("index_columns", []) if isinstance(c, str)}
        except (ValueError, AttributeError):
            pass
    return found


def _numbers(arr: pa.Array) -> np.ndarray:
    x = arr.drop_null().cast(pa.float64()).to_numpy(zero_copy_only=False)
    return x[np.isfinite(x)]


def _value_type(typ: pa.DataType) -> pa.DataType:
    return typ.value_type if pa.types.is_dictionary(typ) else typ


def profile_column(name: str, arr: pa.Array, total_rows: int) -> Proposal:
    """The profile of one sampled column (no decision yet)."""
    arr = plain_array(arr)
    n = len(arr)
    typ = _value_type(arr.type)
    nulls = arr.null_count
    distinct = 0
    stats: dict[str, Any] = {}
    flat_ok = not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)
                   or pa.types.is_struct(typ) or pa.types.is_map(typ) or pa.types.is_binary(typ)
                   or pa.types.is_large_binary(typ))
    if flat_ok and n:
        counts = pc.value_counts(arr.drop_null())
        distinct = len(counts)
        stats["counts"] = counts.field("counts").to_numpy()
        stats["values"] = counts.field("values")
    if pa.types.is_floating(typ) and n:
        x = arr.drop_null().to_numpy(zero_copy_only=False)
        nulls += int(np.isnan(x).sum())
    return Proposal(name, str(arr.type), distinct, n, nulls / n if n else 0.0, stats=stats)


def _dense(p: Proposal, x: np.ndarray, why: str) -> Proposal:
    heavy, before, after = heavy_tail(x)
    p.feature = {"name": p.name, "kind": "dense"}
    if heavy:
        p.feature["transform"] = "log1p"
        p.decision = "dense log1p"
        p.reason = f"{why}; heavy-tailed (skewness {before:.1f}, {after:.1f} after log1p)"
    else:
        p.decision = "dense"
        p.reason = f"{why} (skewness {before:.1f}" + (
            f"; still {after:.1f} after log1p, so left as is)" if abs(before) > HEAVY_SKEW else ")")
    return p


def _categorical(p: Proposal, why: str, total_rows: int) -> Proposal:
    scale = total_rows / p.rows if p.rows else 1.0
    estimated = p.distinct if scale <= 1 else min(total_rows, int(p.distinct * scale))
    p.feature = {"name": p.name, "kind": "categorical"}
    if estimated > HASH_ABOVE:
        p.feature["hash_buckets"] = HASH_BUCKETS
        p.decision = "hashed"
        p.reason = f"{why}; about {estimated:,} values: hash_buckets {HASH_BUCKETS:,} instead of a vocabulary"
        return p
    min_count = propose_min_count(p.stats.get("counts", np.array([])), max(scale, 1.0))
    p.decision = "categorical"
    p.reason = why
    if min_count > 1:
        rare = float(np.mean(p.stats["counts"] * max(scale, 1.0) < min_count))
        p.feature["min_count"] = min_count
        p.reason += f"; long tail ({rare:.0%} of the values seen < {min_count} times): min_count {min_count}"
    return p


def _excluded(p: Proposal, decision: str, reason: str, warning: str | None = None) -> Proposal:
    p.decision, p.reason, p.feature, p.warning = decision, reason, None, warning
    return p


def propose(p: Proposal, arr: pa.Array, total_rows: int, binary_labels: dict[str, np.ndarray],
            is_index: bool = False, labels: dict[str, np.ndarray] | None = None) -> Proposal:
    """Decide what column ``p`` (profiled from ``arr``) becomes. ``binary_labels``: task -> its 0/1 label in the
    same sampled rows (NaN where unlabelled), for the funnel-stage check; ``labels``: task -> its label as numbers
    (binary or regression; NaN where unlabelled), for telling integer codes from numbers."""
    labels = labels or {}
    arr = plain_array(arr)
    typ = _value_type(arr.type)
    name = p.name
    if is_index:
        return _excluded(p, "skipped", "a pandas index column (the row position of the frame it came from)")
    if p.rows and p.null_share >= 1.0:
        return _excluded(p, "skipped", "always null")
    if p.distinct == 1 and arr.null_count == 0 and (not pa.types.is_floating(typ) or p.null_share == 0):
        return _excluded(p, "skipped", f"constant (always {p.stats['values'][0].as_py()!r})")
    if looks_like_outcome(name):
        return _excluded(p, "excluded", "its name looks like an outcome (another task's label?): a leak",
                         f"column '{name}' looks like an outcome, not something known before the event; excluded. "
                         f"Pass --feature {name} to use it as a feature, --label {name} to silence this, or --task "
                         f"{name} to train it")
    nested = _nested_with(arr, binary_labels)
    if nested:
        return _excluded(p, "excluded", f"0/1 and nested with task '{nested}' (a funnel stage: another label?)",
                         f"column '{name}' is 0/1 and its positives nest with task '{nested}''s (one implies the other): "
                         f"probably another stage's label; excluded. Pass --feature {name} to use it as a feature, or "
                         f"--label {name} to silence this")
    if pa.types.is_timestamp(typ) or pa.types.is_date(typ) or pa.types.is_time(typ):
        return _excluded(p, "excluded", "a timestamp (derived features such as hour or weekday are not built; add "
                                        "them as columns)")
    if pa.types.is_boolean(typ):
        return _categorical(p, "true/false", total_rows)
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return _string(p, arr, total_rows)
    if pa.types.is_integer(typ):
        return _integer(p, arr, total_rows, labels)
    if pa.types.is_floating(typ) or pa.types.is_decimal(typ):
        return _dense(p, _numbers(arr), "a number")
    return p  # lists, binary, other types: decided by the caller (sequence, image, unsupported)


def _nested_with(arr: pa.Array, binary_labels: dict[str, np.ndarray]) -> str | None:
    """The first binary task whose positives nest with this 0/1 column's (one set contains the other; at least
    20 positives on each side, not the same column)."""
    typ = _value_type(arr.type)
    if not binary_labels or not (pa.types.is_integer(typ) or pa.types.is_boolean(typ) or pa.types.is_floating(typ)):
        return None
    x = arr.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
    seen = np.isfinite(x)
    if not seen.any() or not np.isin(x[seen], [0.0, 1.0]).all():
        return None
    for task, y in binary_labels.items():
        both = seen & np.isfinite(y)
        a, b = x[both] == 1, y[both] == 1
        if a.sum() < 20 or b.sum() < 20 or (a == b).all():
            continue
        if not (a & ~b).any() or not (b & ~a).any():
            return task
    return None


def _string(p: Proposal, arr: pa.Array, total_rows: int) -> Proposal:
    values = arr.drop_null()
    values = values.filter(pc.not_equal(values, "")) if len(values) else values
    if len(values) == 0:
        return _excluded(p, "skipped", "only empty strings")
    dates = float(pc.mean(pc.cast(pc.match_substring_regex(values, _DATE.pattern), pa.float64())).as_py())
    if dates >= 0.9:
        return _excluded(p, "excluded", "dates/timestamps as text (derived features such as hour or weekday are not "
                                        "built; add them as columns)")
    lengths = pc.utf8_length(values).to_numpy(zero_copy_only=False)
    spaced = float(pc.mean(pc.cast(pc.match_substring_regex(values, r"\s"), pa.float64())).as_py())
    median = float(np.median(lengths))
    share = p.distinct / p.rows if p.rows else 0.0
    if median >= TEXT_MIN_LENGTH and spaced >= 0.5 and p.distinct >= max(NEAR_UNIQUE_MIN, 0.1 * p.rows):
        p.decision = "text"
        p.reason = (f"free text (median {median:.0f} characters, {share:.0%} of rows distinct): hashed words and "
                    "bigrams (as categories it would memorise the rows)")
        p.feature = {"name": p.name, "kind": "text", "hash_buckets": TEXT_HASH_BUCKETS}
        return p
    if share >= NEAR_UNIQUE and p.distinct >= NEAR_UNIQUE_MIN:
        return _excluded(p, "excluded", f"id-like: {share:.0%} of the sampled rows distinct, so an id would rarely "
                                        "repeat (pass --categorical to keep it, then consider hash_buckets)")
    return _categorical(p, f"text categories ({p.distinct:,} values)", total_rows)


def _integer(p: Proposal, arr: pa.Array, total_rows: int, labels: dict[str, np.ndarray]) -> Proposal:
    name = p.name
    x = _numbers(arr)
    share = p.distinct / p.rows if p.rows else 0.0
    tokens = set(name_tokens(name))
    if tokens & TIME_WORDS and len(x) and _epoch_range(x):
        return _excluded(p, "excluded", "Unix timestamps (derived features such as hour or weekday are not built; "
                                        "add them as columns)")
    if looks_like_id(name):
        if share >= NEAR_UNIQUE and p.distinct >= NEAR_UNIQUE_MIN:
            return _excluded(p, "excluded", f"id-like: {share:.0%} of the sampled rows distinct, so an id would "
                                            "rarely repeat (pass --categorical to keep it, then consider hash_buckets)")
        return _categorical(p, f"an id or code ({p.distinct:,} values)", total_rows)
    if p.distinct <= SMALL_INT:
        return _categorical(p, f"integers with {p.distinct} values", total_rows)
    if share >= NEAR_UNIQUE and len(x) and p.distinct >= 0.5 * (x.max() - x.min() + 1):
        return _excluded(p, "excluded", f"near-unique integers filling their range ({share:.0%} of rows distinct): "
                                        "a row number or an id")
    if labels:
        verdict = code_or_number(arr, labels)
        if verdict is not None:
            per_value, per_range, code = verdict
            if code:
                return _categorical(p, f"integer codes ({p.distinct:,} values): single values explain {per_value:.4f} "
                                       f"of the label variance beyond runs of neighbouring values ({per_range:.4f})",
                                    total_rows)
            return _dense(p, x, f"a number ({p.distinct:,} integer values; runs of neighbouring values explain "
                                f"{per_range:.4f} of the label variance, single values {per_value:+.4f} more)")
    return _dense(p, x, f"a number ({p.distinct:,} integer values)")


#: an integer column is codes when its single values explain the labels CODE_GAIN times as well as runs of
#: neighbouring values do, and by more than CODE_NOISE standard errors of chance (see code_or_number)
CODE_GAIN = 1.5
CODE_NOISE = 4.0
#: a run of neighbouring values holds at least 2 values and this share of the rows
CODE_RUN_SHARE = 1 / 200


def code_or_number(arr: pa.Array, labels: dict[str, np.ndarray]) -> tuple[float, float, bool] | None:
    """Whether an integer column is a code (each value its own effect, unrelated to the next value's) or a number
    (effects vary smoothly with the value). Per task: the share of the label variance explained by runs of
    neighbouring values (in value order, each run at least 2 values and :data:`CODE_RUN_SHARE` of the rows; omega
    squared, which discounts what chance gives k groups), and what single values explain beyond their run, less
    what chance gives them (each run's own label variance per extra value: robust to label variance that changes
    with the value, as a rate does). Merging neighbours costs a number little and a code most of its signal. Returns
    (gain of single values, runs, is a code) for the task where single values gain most; None without 200
    labelled rows."""
    x = arr.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
    best: tuple[float, float, bool] | None = None
    for y in labels.values():
        keep = np.isfinite(x) & np.isfinite(y)
        if keep.sum() < 200:
            continue
        xs, ys = x[keep], y[keep]
        _, inverse = np.unique(xs, return_inverse=True)
        counts = np.bincount(inverse)
        runs = _runs(counts, max(1.0, CODE_RUN_SHARE * len(ys)))
        merged, n_runs = omega_squared(runs[inverse], ys)
        gain, extra = _gain_within_runs(inverse, runs, ys)
        noise = math.sqrt(2 * max(extra, 1)) / len(ys)  # the spread of chance's share for that many extra groups
        code = gain > CODE_NOISE * noise and gain > (CODE_GAIN - 1) * max(merged, 0.0)
        if best is None or gain > best[0]:
            best = (gain, merged, code)
    return best


def _gain_within_runs(values: np.ndarray, runs: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """(share of ``y``'s variance that the value means explain beyond their run means, less chance: (values in the
    run - 1) x the run's label variance per run; number of extra groups). ``values``: each row's value index;
    ``runs``: each value's run."""
    mean = y.mean()
    ss_total = float(np.sum((y - mean) ** 2))
    if ss_total <= 0:
        return 0.0, 0
    c_v = np.bincount(values).astype(np.float64)
    s_v = np.bincount(values, weights=y)
    row_run = runs[values]
    c_r = np.bincount(row_run).astype(np.float64)
    s_r = np.bincount(row_run, weights=y)
    ss_r = np.bincount(row_run, weights=y * y)
    k_r = np.bincount(runs[c_v > 0])
    m_r = s_r / np.maximum(c_r, 1)
    present = c_v > 0
    # sum over values of c (m_v - m_run)^2 = sum s_v^2 / c_v - c_r m_r^2, per run
    between_values = np.bincount(runs[present], weights=s_v[present] ** 2 / c_v[present], minlength=len(c_r))
    extra_ss = between_values - c_r * m_r ** 2
    var_r = np.where(c_r > 1, (ss_r - c_r * m_r ** 2) / np.maximum(c_r - 1, 1), 0.0)
    chance = (k_r - 1) * var_r
    return float(np.sum(extra_ss - chance)) / ss_total, int(np.sum(k_r - 1))


def _runs(counts: np.ndarray, min_rows: float) -> np.ndarray:
    """The run of each value (given the rows per value in value order): consecutive values, at least 2 and
    ``min_rows`` rows per run; a short last run joins the one before."""
    run = np.empty(len(counts), dtype=np.int64)
    current, values, rows = 0, 0, 0.0
    for i, c in enumerate(counts):
        run[i] = current
        values += 1
        rows += c
        if values >= 2 and rows >= min_rows:
            current, values, rows = current + 1, 0, 0.0
    if values and current > 0:
        run[run == current] = current - 1
    return run


def omega_squared(groups: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """(omega squared of ``y`` by integer ``groups`` 0..k-1: the share of its variance the group means explain beyond
    chance, k)."""
    counts = np.bincount(groups)
    present = counts > 0
    sums = np.bincount(groups, weights=y)[present]
    counts = counts[present]
    n, k = len(y), len(counts)
    mean = y.mean()
    ss_total = float(np.sum((y - mean) ** 2))
    ss_between = float(np.sum(sums * sums / counts) - n * mean * mean)
    if ss_total <= 0 or n <= k:
        return 0.0, k
    ms_within = (ss_total - ss_between) / (n - k)
    return (ss_between - (k - 1) * ms_within) / (ss_total + ms_within), k


def _epoch_range(x: np.ndarray) -> bool:
    """Seconds or milliseconds since 1970 between 1995 and 2040."""
    low, high = float(x.min()), float(x.max())
    return (7.9e8 <= low and high <= 2.21e9) or (7.9e11 <= low and high <= 2.21e12)


def binary_label_sample(arr: pa.Array, positive: list[Any] | str | None) -> np.ndarray | None:
    """A task's label in the sample as 0/1 floats (NaN when unlabelled), or None when it is not binary."""
    arr = plain_array(arr)
    typ = _value_type(arr.type)
    if positive is not None and not isinstance(positive, str):
        hit = pc.is_in(arr, value_set=pa.array(positive, arr.type)) if pa.types.is_string(typ) or pa.types.is_integer(typ) \
            else None
        if hit is None:
            return None
        y = hit.cast(pa.float64()).to_numpy(zero_copy_only=False)
        return np.where(arr.is_valid().to_numpy(zero_copy_only=False), y, np.nan)
    if positive is not None or not (pa.types.is_integer(typ) or pa.types.is_boolean(typ) or pa.types.is_floating(typ)):
        return None
    y = arr.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
    seen = np.isfinite(y)
    return y if seen.any() and np.isin(y[seen], [0.0, 1.0]).all() else None


def estimate_steps(rows: int, batch: int) -> int:
    return max(1, math.ceil(rows / batch))
