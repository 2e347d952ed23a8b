"""Synthetic data with a known ground truth, deterministic by seed, written as Parquet.

* ``funnel``: impressions with categorical and dense features, a ``click`` label and a ``conversion``
  label that can be 1 only when click is 1 (ESMM's click -> conversion funnel, on the impression space).
  The hidden true probabilities go to ``<split>.truth.parquet`` (``click``: P(click), ``conversion``:
  P(click and convert), ``cvr``: P(convert | click)), row-aligned, so the Bayes-optimal AUC is known.
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
from recmtl.io import atomic_path

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


def funnel(out: str | Path, rows: int, seed: int = 0, categorical: int = 26, dense: int = 13,
           cardinality: int = 1000, correlation: float = 0.5, null_rate: float = 0.05,
           valid_fraction: float = 0.1, test_fraction: float = 0.1) -> list[Path]:
    """Write ``train/valid/test.parquet`` and their ``.truth.parquet`` files into ``out``."""
    if categorical < 2 or dense < 2:
        raise ConfigError("funnel needs at least 2 categorical and 2 dense features")
    if cardinality < 2:
        raise ConfigError("--cardinality must be at least 2")
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

    def make_chunk(start: int, n: int) -> tuple[pa.Table, pa.Table]:
        r = np.random.default_rng([seed, 2, start])
        logit_click = np.full(n, -1.9)
        logit_cvr = np.full(n, -1.6)
        cols: dict[str, pa.Array] = {}
        for name, card, ec, ev in zip(cat_names, cards, click_effects, cvr_effects):
            ids = np.minimum((card * r.random(n) ** 1.6).astype(np.int64), card - 1)  # skewed popularity
            logit_click += ec[ids]
            logit_cvr += ev[ids]
            cols[name] = pa.array(np.char.add("v", ids.astype(str)) if name in string_cols else ids)
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
        p_click, p_cvr = _sigmoid(logit_click), _sigmoid(logit_cvr)
        click = (r.random(n) < p_click).astype(np.int8)
        conversion = (click.astype(bool) & (r.random(n) < p_cvr)).astype(np.int8)
        data = pa.table({**cols, "click": click, "conversion": conversion})
        truth = pa.table({"click": p_click.astype(np.float32), "conversion": (p_click * p_cvr).astype(np.float32),
                          "cvr": p_cvr.astype(np.float32)})
        return data, truth

    return _write_splits(Path(out), sizes, make_chunk)


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
