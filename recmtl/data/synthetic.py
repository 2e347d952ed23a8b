"""Synthetic data with a known ground truth, deterministic by seed, written as Parquet.

* ``funnel``: impressions with categorical and dense features, a ``click`` label and a ``conversion``
  label that can be 1 only when click is 1 (ESMM's click -> conversion funnel, on the impression space).
  The hidden true probabilities go to ``<split>.truth.parquet`` (``click``: P(click), ``conversion``:
  P(click and convert), ``cvr``: P(convert | click)), row-aligned, so the Bayes-optimal AUC is known.
  With ``tail``: a long tail on top, ``tail_id`` (that many ids, Zipf popularity: most are rare) with strong
  per-id effects, and two heavy-tailed numbers whose effect is through their logarithm (``views``, a
  log-normal count, and ``price``, log-normal with nulls).
  With ``interactions`` > 0: FM-style pairwise products of per-id factor vectors of every pair of categorical
  fields, ``sum_{i<j} <v_i[id_i], v_j[id_j]>`` (:data:`INTERACTION_RANK` factors), scaled so that the term's
  standard deviation in the click (and conversion) logit is ``interactions``. With ``task_fields`` = N: the last
  N categorical fields move only the click logit and the N before them only the conversion logit (their other
  effect is zero; their effects as strong as ``c03``'s), a known split of which task uses which field.
* ``interests``: users with latent interests (a few topics), items with a latent topic and brand; each row a
  candidate ``item_id`` and the user's recent history ``hist`` (a list of item ids, most recent last). The click
  depends on how the candidate relates to the history (the share of history items of its topic, and whether the
  user saw this very item), the conversion after a click on another aspect (the candidate's brand among the
  history's brands); with ``text``, a ``title`` string whose words (``great``/``awful``) move the click.
  ``.truth.parquet`` holds the true probabilities, as for ``funnel``.
* ``mmoe-synthetic``: the two regression tasks of the MMoE paper (Ma et al. KDD 2018, section 4) whose
  correlation is set by ``correlation``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recmtl.errors import ConfigError
from recmtl.files import atomic_path

CHUNK_ROWS = 131_072
ROW_GROUP_ROWS = 65_536


def split_sizes(rows: int, valid_fraction: float, test_fraction: float) -> dict[str, int]:
    if rows <= 0:
        raise ConfigError(f"--rows must be positive, got {rows}")
    if not (0 <= valid_fraction < 1 and 0 <= test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ConfigError("--valid-fraction and --test-fraction must be in [0, 1) and sum to less than 1")
    n_valid, n_test = int(rows * valid_fraction), int(rows * test_fraction)
    sizes = {"train": rows - n_valid - n_test, "valid": n_valid, "test": n_test}
    return {k: v for k, v in sizes.items() if v > 0}


def _write_splits(out: Path, sizes: dict[str, int], make_chunk: Callable[[int, int], tuple[pa.Table, pa.Table | None]]) -> list[Path]:
    """Write each split by chunks (bounded memory); ``make_chunk(start, n)`` returns data and truth."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    start = 0
    for split, n in sizes.items():
        data_path, truth_path = out / f"{split}.parquet", out / f"{split}.truth.parquet"
        with atomic_path(data_path) as tmp_data, atomic_path(truth_path) as tmp_truth:
            data_writer = truth_writer = None
            done = 0
            while done < n:
                k = min(CHUNK_ROWS, n - done)
                data, truth = make_chunk(start + done, k)
                data_writer = data_writer or pq.ParquetWriter(tmp_data, data.schema)
                data_writer.write_table(data, row_group_size=ROW_GROUP_ROWS)
                if truth is not None:
                    truth_writer = truth_writer or pq.ParquetWriter(tmp_truth, truth.schema)
                    truth_writer.write_table(truth, row_group_size=ROW_GROUP_ROWS)
                done += k
            data_writer.close()
            if truth_writer is not None:
                truth_writer.close()
        if truth_writer is None:
            truth_path.unlink(missing_ok=True)
        written.append(data_path)
        start += n
    return written


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _funnel_labels(r: np.random.Generator, cols: dict[str, pa.Array], logit_click: np.ndarray,
                   logit_cvr: np.ndarray) -> tuple[pa.Table, pa.Table]:
    """The click -> conversion funnel's labels and truth table from the true logits (``funnel`` and ``interests``):
    ``click ~ Bernoulli(sigmoid(logit_click))``, ``conversion = click and Bernoulli(sigmoid(logit_cvr))``, drawn
    from ``r`` in that order; returns ``(data, truth)``: ``cols`` plus the labels, and the true ``click``,
    ``conversion`` (P(click) x P(convert | click)) and ``cvr`` probabilities as float32."""
    n = len(logit_click)
    p_click, p_cvr = _sigmoid(logit_click), _sigmoid(logit_cvr)
    click = (r.random(n) < p_click).astype(np.int8)
    conversion = (click.astype(bool) & (r.random(n) < p_cvr)).astype(np.int8)
    data = pa.table({**cols, "click": click, "conversion": conversion})
    truth = pa.table({"click": p_click.astype(np.float32), "conversion": (p_click * p_cvr).astype(np.float32),
                      "cvr": p_cvr.astype(np.float32)})
    return data, truth


def funnel(out: str | Path, rows: int, seed: int = 0, categorical: int = 26, dense: int = 13,
           cardinality: int = 1000, correlation: float = 0.5, null_rate: float = 0.05,
           valid_fraction: float = 0.1, test_fraction: float = 0.1, tail: int = 0, interactions: float = 0.0,
           task_fields: int = 0) -> list[Path]:
    """Write ``train/valid/test.parquet`` and their ``.truth.parquet`` files into ``out``. ``tail`` > 0 adds the
    long-tail columns (:data:`TAIL_EXPONENT`, :data:`TAIL_EFFECT`); every other column is the same as without
    them (only the labels and the true probabilities change)."""
    if tail < 0:
        raise ConfigError(f"--tail must be 0 (off) or a number of ids, got {tail}")
    if categorical < 2 or dense < 2:
        raise ConfigError("funnel needs at least 2 categorical and 2 dense features")
    if cardinality < 2:
        raise ConfigError("--cardinality must be at least 2")
    if interactions < 0:
        raise ConfigError(f"--interactions must be 0 (off) or the interaction term's standard deviation, got {interactions}")
    if task_fields < 0 or 2 * task_fields > categorical - 2:
        raise ConfigError(f"--task-fields must be in [0, {(categorical - 2) // 2}] for {categorical} categorical features "
                          f"(2 * N fields after user_id and item_id), got {task_fields}")
    sizes = split_sizes(rows, valid_fraction, test_fraction)
    g = np.random.default_rng([seed, 1])
    # vocabulary sizes: user_id and item_id get the full cardinality, the rest spread from 3 to it
    cards = [cardinality, cardinality] + [
        int(round(math.exp(v))) for v in np.linspace(math.log(3), math.log(max(cardinality, 3)), categorical - 2)]
    scales = np.array([0.5, 0.5] + list(np.linspace(0.45, 0.1, categorical - 2)))
    rho = float(np.clip(correlation, -1, 1))
    click_effects = [g.normal(0, s, c) for s, c in zip(scales, cards)]
    cvr_effects = [rho * e + math.sqrt(1 - rho * rho) * g.normal(0, s, c)
                   for e, s, c in zip(click_effects, scales, cards)]
    a_click, b_click = g.normal(0, 0.35, dense), g.normal(0, 0.2, dense)
    a_cvr = rho * a_click + math.sqrt(1 - rho * rho) * g.normal(0, 0.35, dense)
    b_cvr = rho * b_click + math.sqrt(1 - rho * rho) * g.normal(0, 0.2, dense)
    cat_names = ["user_id", "item_id"] + [f"c{i:02d}" for i in range(3, categorical + 1)]
    string_cols = set(cat_names[2:5])
    dense_names = [f"d{i:02d}" for i in range(1, dense + 1)]
    add_tail = _long_tail(seed, tail, rho) if tail else None
    if task_fields:  # the last N fields: click only; the N before them: conversion only; all as strong as c03
        for j in range(categorical - task_fields, categorical):
            cvr_effects[j] = np.zeros_like(cvr_effects[j])
            click_effects[j] = click_effects[j] * (scales[2] / scales[j])
        for j in range(categorical - 2 * task_fields, categorical - task_fields):
            click_effects[j] = np.zeros_like(click_effects[j])
            cvr_effects[j] = cvr_effects[j] * (scales[2] / scales[j])
    add_pairs = _pairwise(seed, cards, interactions, rho) if interactions else None

    def make_chunk(start: int, n: int) -> tuple[pa.Table, pa.Table]:
        r = np.random.default_rng([seed, 2, start])
        logit_click = np.full(n, -1.9)
        logit_cvr = np.full(n, -1.6)
        cols: dict[str, pa.Array] = {}
        all_ids = []
        for name, card, ec, ev in zip(cat_names, cards, click_effects, cvr_effects):
            ids = np.minimum((card * r.random(n) ** 1.6).astype(np.int64), card - 1)  # skewed popularity
            logit_click += ec[ids]
            logit_cvr += ev[ids]
            all_ids.append(ids)
            cols[name] = pa.array(np.char.add("v", ids.astype(str)) if name in string_cols else ids)
        if add_pairs is not None:
            add_pairs(all_ids, logit_click, logit_cvr)
        for j, name in enumerate(dense_names):
            x = r.normal(0, 1, n)
            missing = r.random(n) < null_rate
            x_seen = np.where(missing, 0.0, x)
            logit_click += a_click[j] * x_seen + b_click[j] * (x_seen ** 2 - 1)
            logit_cvr += a_cvr[j] * x_seen + b_cvr[j] * (x_seen ** 2 - 1)
            cols[name] = pa.array(x.astype(np.float32), mask=missing)
        interaction = np.tanh(np.where(cols[dense_names[0]].is_null().to_numpy(zero_copy_only=False), 0,
                                       cols[dense_names[0]].to_numpy(zero_copy_only=False)))
        logit_click += 0.4 * interaction * np.where(cols["user_id"].to_numpy() % 2 == 0, 1, -1)
        if add_tail is not None:
            add_tail(start, n, cols, logit_click, logit_cvr)
        return _funnel_labels(r, cols, logit_click, logit_cvr)

    return _write_splits(Path(out), sizes, make_chunk)


#: factors per id of the ``interactions`` term of ``funnel``
INTERACTION_RANK = 4


def _pairwise(seed: int, cards: list[int], strength: float, rho: float) -> Callable[..., None]:
    """The FM-style term of ``funnel``: returns ``add(ids, logit_click, logit_cvr)`` adding
    ``sum_{i<j} <v_i[id_i], v_j[id_j]>`` (standard deviation ``strength``; conversion's factors correlated ``rho`` with
    click's) to the logits in place, from its own random stream so that the other columns do not change."""
    g = np.random.default_rng([seed, 8])
    click = [g.normal(0, 1, (c, INTERACTION_RANK)) for c in cards]
    cvr = [rho * v + math.sqrt(1 - rho * rho) * g.normal(0, 1, v.shape) for v in click]

    def fm(factors: list[np.ndarray], ids: list[np.ndarray]) -> np.ndarray:
        e = np.stack([f[i] for f, i in zip(factors, ids)], axis=1)  # [n, F, k]
        total = e.sum(1)
        return 0.5 * ((total * total).sum(1) - (e * e).sum((1, 2)))

    # scale the factors so that the term's standard deviation is `strength` under the ids' popularity (a
    # calibration sample drawn as funnel draws ids); the term is quadratic in the factors
    sample = [np.minimum((c * g.random(20_000) ** 1.6).astype(np.int64), c - 1) for c in cards]
    for factors in (click, cvr):
        scale = math.sqrt(strength / max(float(fm(factors, sample).std()), 1e-12))
        for f in factors:
            f *= scale

    def add(ids: list[np.ndarray], logit_click: np.ndarray, logit_cvr: np.ndarray) -> None:
        logit_click += fm(click, ids)
        logit_cvr += fm(cvr, ids)

    return add


#: words a title is built from (besides its topic's word): filler, and the two that move the click
TITLE_FILLER = ("the", "new", "best", "for", "with", "mini", "pro", "set", "pack", "home", "kids", "öko", "café")
TITLE_SENTIMENT = {"great": 1.2, "awful": -1.2}


def interests(out: str | Path, rows: int, seed: int = 0, items: int = 1000, topics: int = 20, history: int = 20,
              text: bool = False, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> list[Path]:
    """Write ``train/valid/test.parquet`` (+ ``.truth.parquet``) into ``out``: ``item_id`` (int), ``hist``
    (list of ints, up to ``history`` items, most recent last; some empty), ``title`` (with ``text``), ``click``,
    ``conversion`` (only after a click).

    Click logit: ``-2.2 + 4 * share`` (share of history items of the candidate's topic) ``+ 1.5 * seen`` (the
    candidate itself is in the history) ``+`` the title's sentiment word (``TITLE_SENTIMENT``); conversion logit
    given a click: ``-1.2 + 2.5 * [candidate's brand among the history's brands]``."""
    if items < topics or topics < 2 or history < 1:
        raise ConfigError("interests needs --topics >= 2, --items >= --topics and --history >= 1")
    sizes = split_sizes(rows, valid_fraction, test_fraction)
    g = np.random.default_rng([seed, 7])
    topic_of = g.integers(0, topics, items)
    topic_of[:topics] = np.arange(topics)  # every topic has an item
    brand_of = g.integers(0, max(items // 20, 2), items)
    by_topic = [np.flatnonzero(topic_of == t) for t in range(topics)]

    def make_chunk(start: int, n: int) -> tuple[pa.Table, pa.Table]:
        r = np.random.default_rng([seed, 8, start])
        taste = r.dirichlet(np.full(topics, 0.3), n)  # a user's interests: a few topics
        lengths = r.integers(0, history + 1, n)
        lengths[r.random(n) < 0.05] = 0
        total = int(lengths.sum())
        rows_of = np.repeat(np.arange(n), lengths)
        cum = taste.cumsum(1)
        cum[:, -1] = 1.0
        item_topic = (r.random(total)[:, None] > cum[rows_of]).sum(1)
        pick = r.random(total)
        hist_items = np.array([by_topic[t][int(u * len(by_topic[t]))] for t, u in zip(item_topic, pick)], dtype=np.int64)
        # the candidate: from the user's interests (half the time, and then sometimes a history item) or any item
        own = r.random(n) < 0.5
        cand_topic = np.where(own, (r.random(n)[:, None] > cum).sum(1), topic_of[r.integers(0, items, n)])
        cand = np.array([by_topic[t][int(u * len(by_topic[t]))] for t, u in zip(cand_topic, r.random(n))], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        repeat = (r.random(n) < 0.15) & (lengths > 0)
        cand = np.where(repeat, hist_items[np.minimum(offsets[:-1] + (r.random(n) * lengths).astype(np.int64), total - 1)]
                        if total else cand, cand)
        same_topic = topic_of[hist_items] == topic_of[cand][rows_of]
        share = np.bincount(rows_of, same_topic, minlength=n) / np.maximum(lengths, 1)
        seen = np.bincount(rows_of, hist_items == cand[rows_of], minlength=n) > 0
        brand_seen = np.bincount(rows_of, brand_of[hist_items] == brand_of[cand][rows_of], minlength=n) > 0
        logit_click = -2.2 + 4.0 * share + 1.5 * seen
        logit_cvr = -1.2 + 2.5 * brand_seen
        cols: dict[str, pa.Array] = {
            "item_id": pa.array(cand),
            "hist": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(hist_items)),
        }
        if text:
            words = np.array(list(TITLE_FILLER) + list(TITLE_SENTIMENT), dtype=object)
            sentiment = r.integers(0, 3, n)  # 0: none, 1: great, 2: awful
            titles = []
            for i in range(n):
                parts = [f"Topic{cand_topic[i]}"] + list(r.choice(words[:len(TITLE_FILLER)], r.integers(1, 5)))
                if sentiment[i]:
                    parts.insert(int(r.integers(0, len(parts) + 1)), ("GREAT!", "awful,")[sentiment[i] - 1])
                titles.append(None if r.random() < 0.03 else " ".join(parts))
            logit_click += np.select([sentiment == 1, sentiment == 2], list(TITLE_SENTIMENT.values()), 0.0)
            cols["title"] = pa.array(titles, pa.string())
        return _funnel_labels(r, cols, logit_click, logit_cvr)

    return _write_splits(Path(out), sizes, make_chunk)


#: Zipf exponent of the long-tail ids' popularity: P(k-th most popular) ~ k ** -TAIL_EXPONENT
TAIL_EXPONENT = 1.1
#: standard deviation of a long-tail id's effect on the click (and conversion) logit; user_id's is 0.5
TAIL_EFFECT = 1.0


def _long_tail(seed: int, ids: int, rho: float) -> Callable[..., None]:
    """The long-tail part of ``funnel``: returns ``add(start, n, cols, logit_click, logit_cvr)`` that adds the
    columns ``tail_id``, ``views``, ``price`` to ``cols`` and their effects to the logits (in place), from its
    own random streams so that the other columns do not change."""
    g = np.random.default_rng([seed, 6])
    weights = np.arange(1, ids + 1, dtype=np.float64) ** -TAIL_EXPONENT
    cdf = np.cumsum(weights) / weights.sum()
    id_of_rank = g.permutation(ids)  # popularity is not in id order
    click_effect = g.normal(0, TAIL_EFFECT, ids)
    cvr_effect = rho * click_effect + math.sqrt(1 - rho * rho) * g.normal(0, TAIL_EFFECT, ids)
    views_mu, views_sigma, price_mu, price_sigma = 2.5, 1.8, 3.0, 1.2

    def add(start: int, n: int, cols: dict[str, pa.Array], logit_click: np.ndarray, logit_cvr: np.ndarray) -> None:
        r = np.random.default_rng([seed, 7, start])
        rank = np.minimum(np.searchsorted(cdf, r.random(n)), ids - 1)
        tail_id = id_of_rank[rank]
        logit_click += click_effect[tail_id]
        logit_cvr += cvr_effect[tail_id]
        log_views = r.normal(views_mu, views_sigma, n)
        views = np.floor(np.expm1(np.maximum(log_views, 0.0))).astype(np.int64)  # a count: 0, 1, 2, ... up to ~1e5
        z_views = (np.log1p(views) - views_mu) / views_sigma
        log_price = r.normal(price_mu, price_sigma, n)
        z_price = (log_price - price_mu) / price_sigma
        missing = r.random(n) < 0.05
        logit_click += 0.6 * z_views - 0.4 * np.where(missing, 0.0, z_price)
        logit_cvr += rho * 0.6 * z_views + 0.5 * np.where(missing, 0.0, z_price)
        cols["tail_id"] = pa.array(tail_id.astype(np.int64))
        cols["views"] = pa.array(views)
        cols["price"] = pa.array(np.exp(log_price).astype(np.float32), mask=missing)

    return add


def mmoe_synthetic(out: str | Path, rows: int, correlation: float, seed: int = 0, dim: int = 100,
                   num_sines: int = 10, scale: float = 1.0, valid_fraction: float = 0.1,
                   test_fraction: float = 0.1) -> list[Path]:
    """The MMoE paper's synthetic regression pair: ``y_i = w_i.x + sum_k sin(a_k w_i.x + b_k) + eps``
    with ``w_1 = c u_1`` and ``w_2 = c (p u_1 + sqrt(1-p^2) u_2)`` for orthogonal unit ``u_1, u_2``;
    the Pearson correlation of the labels falls as ``p`` (``correlation``) falls."""
    if not -1 <= correlation <= 1:
        raise ConfigError(f"--correlation must be in [-1, 1], got {correlation}")
    sizes = split_sizes(rows, valid_fraction, test_fraction)
    g = np.random.default_rng([seed, 3])
    q, _ = np.linalg.qr(g.normal(size=(dim, 2)))
    u1, u2 = q[:, 0], q[:, 1]
    w1 = scale * u1
    w2 = scale * (correlation * u1 + math.sqrt(1 - correlation ** 2) * u2)
    alpha, beta = g.normal(size=num_sines), g.normal(size=num_sines)
    names = [f"x{i:03d}" for i in range(dim)]

    def target(z: np.ndarray) -> np.ndarray:
        return z + np.sin(np.outer(z, alpha) + beta).sum(1)

    def make_chunk(start: int, n: int) -> tuple[pa.Table, None]:
        r = np.random.default_rng([seed, 4, start])
        x = r.normal(size=(n, dim))
        y1 = target(x @ w1) + r.normal(0, 0.1, n)
        y2 = target(x @ w2) + r.normal(0, 0.1, n)
        cols = {name: x[:, i].astype(np.float32) for i, name in enumerate(names)}
        return pa.table({**cols, "y1": y1.astype(np.float32), "y2": y2.astype(np.float32)}), None

    return _write_splits(Path(out), sizes, make_chunk)


def task_clusters(out: str | Path, rows: int, seed: int = 0, clusters: int = 2, per_cluster: int = 2,
                  within: float = 0.9, dim: int = 50, num_sines: int = 10, valid_fraction: float = 0.1,
                  test_fraction: float = 0.1) -> list[Path]:
    """Regression tasks in clusters of related ones, built like ``mmoe_synthetic``: task ``c{k}_t{m}`` has
    ``y = w.x + sum_k sin(a_k w.x + b_k) + eps`` with ``w = within u_k + sqrt(1 - within^2) v_km`` for orthonormal
    ``u_k`` (one per cluster) and ``v_km`` (one per task), so tasks of one cluster correlate by about ``within`` and
    tasks of different clusters not at all: the grouping a task-grouping method should find."""
    if not -1 <= within <= 1:
        raise ConfigError(f"within must be in [-1, 1], got {within}")
    n_tasks = clusters * per_cluster
    if clusters < 1 or per_cluster < 1 or dim < clusters + n_tasks:
        raise ConfigError(f"task_clusters needs clusters, per_cluster >= 1 and dim >= clusters * (per_cluster + 1) "
                          f"(got {clusters}, {per_cluster}, {dim})")
    sizes = split_sizes(rows, valid_fraction, test_fraction)
    g = np.random.default_rng([seed, 5])
    q, _ = np.linalg.qr(g.normal(size=(dim, clusters + n_tasks)))
    tasks = {f"c{k + 1}_t{m + 1}": within * q[:, k] + math.sqrt(1 - within ** 2) * q[:, clusters + k * per_cluster + m]
             for k in range(clusters) for m in range(per_cluster)}
    alpha, beta = g.normal(size=num_sines), g.normal(size=num_sines)
    names = [f"x{i:03d}" for i in range(dim)]

    def make_chunk(start: int, n: int) -> tuple[pa.Table, None]:
        r = np.random.default_rng([seed, 6, start])
        x = r.normal(size=(n, dim))
        cols = {name: x[:, i].astype(np.float32) for i, name in enumerate(names)}
        for t, w in tasks.items():
            z = x @ w
            cols[t] = (z + np.sin(np.outer(z, alpha) + beta).sum(1) + r.normal(0, 0.1, n)).astype(np.float32)
        return pa.table(cols), None

    return _write_splits(Path(out), sizes, make_chunk)


# ---- images: digits with attributes, drawn shapes -------------------------------------------------
DIGIT_ATTRIBUTES = {  # attribute -> the digits that have it
    "even": (0, 2, 4, 6, 8),
    "greater_than_4": (5, 6, 7, 8, 9),
    "closed_loop": (0, 4, 6, 8, 9),  # a closed loop as usually handwritten (4 written closed)
    "prime": (2, 3, 5, 7),
    "straight_strokes": (1, 4, 7),  # drawn with straight lines only
}


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _write_table(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)


def digits_attributes(out: str | Path, seed: int = 0, valid_fraction: float = 0.15,
                      test_fraction: float = 0.15) -> list[Path]:
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 images, UCI optdigits test set; no
    download) as Parquet: ``image`` (8x8 grey PNG, the 0..16 intensities scaled to 0..255), ``digit``
    (0..9, a multiclass task) and one 0/1 column per attribute of ``DIGIT_ATTRIBUTES`` (a multilabel task
    or binary tasks), plus ``image_id`` (the index in ``load_digits``). The split is stratified by digit
    and fixed by ``seed``. Also writes ``config.yaml``: a shared CNN with a multiclass and a multilabel head."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not (0 < valid_fraction < 1 and 0 < test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ConfigError("--valid-fraction and --test-fraction must be in (0, 1) and sum to less than 1")
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    target = digits.target.astype(np.int64)
    index = np.arange(len(target))
    rest, test = train_test_split(index, test_size=test_fraction, stratify=target, random_state=seed)
    train, valid = train_test_split(rest, test_size=valid_fraction / (1 - test_fraction), stratify=target[rest],
                                    random_state=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, rows in (("train", np.sort(train)), ("valid", np.sort(valid)), ("test", np.sort(test))):
        cols: dict[str, pa.Array] = {
            "image_id": pa.array(rows),
            "image": pa.array([_png(pixels[i]) for i in rows], type=pa.binary()),
            "digit": pa.array(target[rows]),
        }
        for name, members in DIGIT_ATTRIBUTES.items():
            cols[name] = pa.array(np.isin(target[rows], members).astype(np.int8))
        _write_table(out / f"{split}.parquet", pa.table(cols))
        written.append(out / f"{split}.parquet")
    config = {
        "seed": seed,
        "data": {"train": "train.parquet", "validation": "valid.parquet", "test": "test.parquet",
                 "shuffle_buffer": 4096, "read_rows": 4096},
        "features": [{"name": "image", "kind": "image", "height": 8, "width": 8, "channels": 1}],
        "tasks": [{"name": "digit", "label": "digit", "head": "multiclass"},
                  {"name": "attributes", "label": list(DIGIT_ATTRIBUTES), "head": "multilabel"}],
        "encoders": {"image": {"name": "cnn", "channels": [32, 64], "output_dim": 128}},
        "tower": {"name": "shared_bottom", "bottom_units": [128], "task_units": [64]},
        "optimizer": {"lr": 0.002},
        "train": {"batch_size": 64, "epochs": 40, "eval_batch_size": 1024,
                  "early_stopping": {"monitor": "digit/accuracy", "patience": 8}},
    }
    _write_config(out / "config.yaml", config)
    return written


def _write_config(path: Path, config: dict) -> None:
    import yaml

    from recmtl.files import write_text
    write_text(path, "# written by `recmtl datagen`; train with: recmtl train " + path.name + " --out run\n"
               + yaml.safe_dump(config, sort_keys=False))


SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40)}
FILLS = ("solid", "striped", "outline")
BACKGROUND_MAX = 40  # background pixels are grey noise in 0..BACKGROUND_MAX on every channel


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """The vertices of a shape of circumradius ``r`` centred at (cx, cy); None for a circle."""
    if shape == "square":
        h = r / math.sqrt(2)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # pointing up
        return [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return None


def draw_shape(size: int, shape: str, colour: str, fill: str, cx: float, cy: float, r: float,
               noise: np.ndarray) -> np.ndarray:
    """One ``size x size`` RGB image (uint8 [H, W, 3]): a shape over grey background ``noise``."""
    from PIL import Image, ImageDraw
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    poly = shape_polygon(shape, cx, cy, r)
    box = [cx - r, cy - r, cx + r, cy + r]
    line = max(1, size // 16)
    if fill == "outline":
        (draw.ellipse(box, outline=255, width=line) if poly is None else draw.polygon(poly, outline=255, width=line))
    else:
        (draw.ellipse(box, fill=255) if poly is None else draw.polygon(poly, fill=255))
    on = np.asarray(mask) > 0
    if fill == "striped":  # horizontal stripes two pixels thick, inside an outline
        stripes = (np.arange(size) // 2 % 2 == 0)[:, None]
        edge = Image.new("L", (size, size), 0)
        d2 = ImageDraw.Draw(edge)
        (d2.ellipse(box, outline=255, width=line) if poly is None else d2.polygon(poly, outline=255, width=line))
        on = (on & stripes) | (np.asarray(edge) > 0)
    img = np.repeat(noise[:, :, None], 3, axis=2).astype(np.uint8)
    img[on] = COLOURS[colour]
    return img


def shapes(out: str | Path, rows: int, seed: int = 0, size: int = 32, valid_fraction: float = 0.1,
           test_fraction: float = 0.1) -> list[Path]:
    """Drawn shapes with a known class and attributes (the seed's example: a class label + colour +
    texture): ``image`` (size x size RGB PNG), ``shape`` (circle/square/triangle/diamond), ``colour``
    (red/green/blue/yellow), ``fill`` (solid/striped/outline), ``size`` (small/large) and ``large`` (0/1).
    ``<split>.truth.parquet`` holds the geometry (centre ``cx``, ``cy`` and circumradius ``radius`` in
    pixels). Also writes ``config.yaml``: one shared CNN, a multiclass head per attribute, a binary head for size."""
    if size < 16:
        raise ConfigError(f"--size must be at least 16 pixels, got {size}")
    sizes = split_sizes(rows, valid_fraction, test_fraction)
    colour_names = list(COLOURS)

    def make_chunk(start: int, n: int) -> tuple[pa.Table, pa.Table]:
        r = np.random.default_rng([seed, 5, start])
        shape_i, colour_i, fill_i = r.integers(0, len(SHAPES), n), r.integers(0, len(COLOURS), n), r.integers(0, len(FILLS), n)
        large = r.random(n) < 0.5
        radius = np.where(large, r.uniform(0.34, 0.42, n), r.uniform(0.18, 0.24, n)) * size
        margin = radius + 0.5  # the whole shape inside the image
        cx = r.uniform(margin, size - margin)
        cy = r.uniform(margin, size - margin)
        images = []
        for i in range(n):
            noise = r.integers(0, BACKGROUND_MAX + 1, (size, size))
            images.append(_png(draw_shape(size, SHAPES[shape_i[i]], colour_names[colour_i[i]], FILLS[fill_i[i]],
                                          cx[i], cy[i], radius[i], noise)))
        data = pa.table({
            "image": pa.array(images, type=pa.binary()),
            "shape": pa.array([SHAPES[i] for i in shape_i]),
            "colour": pa.array([colour_names[i] for i in colour_i]),
            "fill": pa.array([FILLS[i] for i in fill_i]),
            "size": pa.array(np.where(large, "large", "small")),
            "large": pa.array(large.astype(np.int8)),
        })
        truth = pa.table({"cx": cx.astype(np.float32), "cy": cy.astype(np.float32), "radius": radius.astype(np.float32)})
        return data, truth

    paths = _write_splits(Path(out), sizes, make_chunk)
    config = {
        "seed": seed,
        "data": {"train": "train.parquet", **({"validation": "valid.parquet"} if "valid" in sizes else {}),
                 **({"test": "test.parquet"} if "test" in sizes else {}), "shuffle_buffer": 8192, "read_rows": 4096},
        "features": [{"name": "image", "kind": "image", "height": size, "width": size, "channels": 3}],
        "tasks": [{"name": "shape", "head": "multiclass"}, {"name": "colour", "head": "multiclass"},
                  {"name": "fill", "head": "multiclass"}, {"name": "large", "head": "binary"}],
        "encoders": {"image": {"name": "cnn", "channels": [16, 32, 32], "output_dim": 64}},
        "tower": {"name": "shared_bottom", "bottom_units": [64], "task_units": [32]},
        "optimizer": {"lr": 0.003},
        "train": {"batch_size": 128, "epochs": 10, "early_stopping": {"monitor": "shape/accuracy", "patience": 3}},
    }
    _write_config(Path(out) / "config.yaml", config)
    return paths
