from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from recmtl.data.synthetic import funnel, mmoe_synthetic
from recmtl.metrics import auc


def test_funnel_is_deterministic_and_consistent(tmp_path):
    funnel(tmp_path / "a", rows=5000, seed=7, categorical=4, dense=3, cardinality=30)
    funnel(tmp_path / "b", rows=5000, seed=7, categorical=4, dense=3, cardinality=30)
    a, b = pq.read_table(tmp_path / "a" / "train.parquet"), pq.read_table(tmp_path / "b" / "train.parquet")
    assert a.equals(b)
    assert a.num_rows == 4000 and pq.read_table(tmp_path / "a" / "test.parquet").num_rows == 500
    click, conv = a["click"].to_numpy(), a["conversion"].to_numpy()
    assert ((conv == 1) <= (click == 1)).all()  # conversion only after a click
    assert 0.05 < click.mean() < 0.5 and conv.sum() > 0
    assert a["d01"].null_count > 0  # dense features have nulls
    truth = pq.read_table(tmp_path / "a" / "train.truth.parquet")
    assert truth.num_rows == a.num_rows
    # the true probabilities explain the labels (Bayes-optimal AUC well above chance)
    assert auc(click, truth["click"].to_numpy()) > 0.7
    assert (truth["conversion"].to_numpy() <= truth["click"].to_numpy() + 1e-7).all()


def test_mmoe_synthetic_correlation_controls_label_correlation(tmp_path):
    corr = {}
    for p in (1.0, 0.5, 0.0):
        mmoe_synthetic(tmp_path / str(p), rows=20000, correlation=p, seed=1)
        t = pq.read_table(tmp_path / str(p) / "train.parquet")
        assert t.num_columns == 102
        corr[p] = np.corrcoef(t["y1"].to_numpy(), t["y2"].to_numpy())[0, 1]
    assert corr[1.0] > 0.95 and corr[1.0] > corr[0.5] > corr[0.0]
    assert abs(corr[0.0]) < 0.2


def test_funnel_tail_adds_rare_ids_and_heavy_numbers_and_keeps_the_rest(tmp_path):
    from recmtl.data.synthetic import TAIL_EFFECT
    funnel(tmp_path / "plain", rows=20000, seed=5, categorical=4, dense=3, cardinality=30)
    funnel(tmp_path / "tail", rows=20000, seed=5, categorical=4, dense=3, cardinality=30, tail=5000)
    plain, tail = pq.read_table(tmp_path / "plain" / "train.parquet"), pq.read_table(tmp_path / "tail" / "train.parquet")
    assert tail.column_names == plain.column_names[:-2] + ["tail_id", "views", "price", "click", "conversion"]
    assert tail.select(plain.column_names[:-2]).equals(plain.select(plain.column_names[:-2]))  # the same features
    ids, counts = np.unique(tail["tail_id"].to_numpy(), return_counts=True)
    assert 1000 < len(ids) <= 5000 and np.mean(counts < 5) > 0.6  # most ids are rare
    views = tail["views"].to_numpy()
    assert views.dtype == np.int64 and views.min() >= 0 and views.max() > 100 * np.median(views)  # heavy tail
    assert tail["price"].null_count > 0 and float(np.nanmin(tail["price"].to_numpy(zero_copy_only=False))) > 0
    truth = pq.read_table(tmp_path / "tail" / "train.truth.parquet")
    # the per-id effects are strong: the true logit varies a lot between popular ids
    logit = np.log(truth["click"].to_numpy() / (1 - truth["click"].to_numpy()))
    top = ids[np.argsort(-counts)[:20]]
    means = [logit[tail["tail_id"].to_numpy() == i].mean() for i in top]
    assert np.std(means) > 0.5 * TAIL_EFFECT
    assert auc(tail["click"].to_numpy(), truth["click"].to_numpy()) > auc(
        plain["click"].to_numpy(), pq.read_table(tmp_path / "plain" / "train.truth.parquet")["click"].to_numpy())


def _content_digest(folder) -> str:
    """sha256 over every Parquet file's name, schema and values (not its bytes: independent of the writer)."""
    import hashlib
    from pathlib import Path
    h = hashlib.sha256()
    for p in sorted(Path(folder).glob("*.parquet")):
        t = pq.read_table(p)
        h.update(p.name.encode())
        h.update(str(t.schema).encode())
        for col in t.columns:
            h.update(repr(col.to_pylist()).encode())
    return h.hexdigest()


def test_funnel_and_interests_outputs_are_unchanged_for_a_seed(tmp_path):
    """Digests of outputs generated before the shared label-drawing helper (`_funnel_labels`): bit-identical."""
    from recmtl.data.synthetic import interests
    funnel(tmp_path / "f", rows=3000, seed=3, categorical=6, dense=3, cardinality=40)
    funnel(tmp_path / "o", rows=3000, seed=4, categorical=8, dense=3, cardinality=40, interactions=1.0, task_fields=2,
           tail=50)
    interests(tmp_path / "i", rows=3000, seed=5, items=200, topics=5, history=6, text=True)
    assert _content_digest(tmp_path / "f") == "49f0a7b9c6f06a680b4b1346c80d7f21e2a8de6027e521c8e39ada5bf2822b3f"
    assert _content_digest(tmp_path / "o") == "8690a29e1ec7fd8dda506e5f32cba53c3368074de42312b74bfabe2358bb84c4"
    assert _content_digest(tmp_path / "i") == "af1e5402b36ab63701fcb19bfd55bda2057f6ccef26d88f2bef4181db7b69999"
