"""`recmtl init` reads the data: per-column proposals with reasons (ids, free text, timestamps, pandas index
columns, heavy-tailed numbers, integer codes, constants, outcome-like columns), --positive keyed by task, and
defaults sized by the number of training rows."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from recmtl.data import profile as prof
from recmtl.data.starter import parse_positives, sized_defaults, starter_config
from recmtl.errors import ConfigError

N = 6000


def _table(n: int = N, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 300, n)
    code = rng.integers(1000, 1100, n)  # an anonymous integer code: each value its own effect
    code_effect = rng.normal(0, 1.5, 1100)
    views = np.floor(np.exp(rng.normal(2, 1.8, n))).astype(np.int64)
    logit = -1 + 0.8 * (np.log1p(views) - 2) / 1.8 + code_effect[code] + 0.3 * rng.normal(size=n)
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    purchase = (click.astype(bool) & (rng.random(n) < 0.3)).astype(np.int8)  # implies click: a funnel stage
    words = np.array(["great", "bad", "product", "would", "buy", "again", "not", "the", "colour", "size"])
    text = [" ".join(rng.choice(words, 8)) + f" #{i}" for i in range(n)]
    return pa.table({
        "__index_level_0__": np.arange(n),
        "review_id": [f"r{i:06d}" for i in range(n)],
        "review": text,
        "ts": pa.array(np.arange(n) * 1_000_000 + 1_600_000_000_000_000, pa.timestamp("us")),
        "event_time": 1_650_000_000 + rng.integers(0, 86_400 * 30, n),
        "day": [f"2024-03-{d:02d}" for d in rng.integers(1, 29, n)],
        "const": np.full(n, 7),
        "user_id": user,
        "small": rng.integers(0, 5, n),
        "code": code,
        "views": views,
        "price": pa.array(np.exp(rng.normal(3, 1.2, n)), mask=rng.random(n) < 0.1),
        "score": rng.normal(0, 1, n),
        "follow_user_num": rng.integers(0, 1000, n),
        "is_like": (rng.random(n) < 0.1).astype(np.int8),
        "rating": rng.integers(1, 6, n),
        "stage2": purchase,
        "click": click,
    })


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("init")
    pq.write_table(_table(), out / "train.parquet", row_group_size=2000)
    pq.write_table(_table(2000, 1), out / "valid.parquet")
    return out


def test_init_reads_the_data_and_says_why(cli, data, tmp_path):
    cfg_path = tmp_path / "c.yaml"
    r = cli("init", data / "train.parquet", "--task", "click", "--validation", data / "valid.parquet", "-o", cfg_path)
    assert r.code == 0, r
    table = {line.split()[0]: line for line in r.out.splitlines()[2:] if line and not line.startswith("wrote")}
    expect = {
        "__index_level_0__": "skipped", "review_id": "excluded", "review": "text", "ts": "excluded",
        "event_time": "excluded", "day": "excluded", "const": "skipped", "user_id": "categorical",
        "small": "categorical", "code": "categorical", "views": "dense log1p", "price": "dense log1p",
        "score": "dense", "follow_user_num": "dense", "is_like": "excluded", "rating": "excluded",
        "stage2": "excluded", "click": "task label",
    }
    for col, decision in expect.items():
        assert f"  {decision}  " in table[col], (col, table[col])
    assert "free text" in table["review"] and "hashed words and bigrams" in table["review"]
    assert "pandas index" in table["__index_level_0__"] and "id-like" in table["review_id"]
    assert "nested with task 'click'" in table["stage2"] and "6,000/6,000" in table["review_id"]
    assert " 9.7%  " in table["price"]  # the null share (10% drawn)
    # outcome-like columns are excluded with a warning that says how to keep them
    assert "warning: column 'is_like' looks like an outcome" in r.err and "--feature is_like" in r.err
    assert "warning: column 'stage2' is 0/1 and its positives nest with task 'click'" in r.err
    cfg = yaml.safe_load(cfg_path.read_text())
    features = {f["name"]: f for f in cfg["features"]}
    assert set(features) == {"user_id", "small", "code", "views", "price", "score", "follow_user_num", "review"}
    assert features["review"] == {"name": "review", "kind": "text", "hash_buckets": 100_000}
    assert cfg["encoders"]["text"] == {"name": "text_bag", "dim": 16}
    assert features["views"] == {"name": "views", "kind": "dense", "transform": "log1p"}
    assert features["code"]["kind"] == "categorical"
    text = cfg_path.read_text()
    assert "- {name: views, kind: dense, transform: log1p}  # a number" in text  # the reason as a comment
    assert "- {name: review, kind: text, hash_buckets: 100000}  # free text" in text
    # one task: no mixture of experts; 6,000 rows: narrow layers, dropout
    assert cfg["tower"] == {"name": "shared_bottom", "bottom_units": [128], "task_units": [32], "dropout": 0.1}
    assert "early_stopping" in cfg["train"] and cfg["train"]["batch_size"] == 64
    r = cli("train", cfg_path, "--out", tmp_path / "run", "--set", "train.epochs=1", "--set", "train.progress=false",
            "--set", "train.threads=1")
    assert r.code == 0, r
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["validation"]["click"]["auc"] > 0.6


def test_labels_features_and_forced_kinds(cli, data, tmp_path):
    r = cli("init", data / "train.parquet", "--task", "click", "--label", "stage2", "--label", "rating",
            "--feature", "is_like", "--categorical", "follow_user_num", "--dense", "small", "-o", tmp_path / "c.yaml")
    assert r.code == 0, r
    assert "stage2" not in r.err and "rating" not in r.err and "is_like" not in r.err  # asked: no warning
    features = {f["name"]: f for f in yaml.safe_load((tmp_path / "c.yaml").read_text())["features"]}
    assert "stage2" not in features and "rating" not in features
    assert features["is_like"]["kind"] == "categorical"
    assert features["follow_user_num"]["kind"] == "categorical" and features["small"]["kind"] == "dense"
    assert "no --validation" in r.err
    r = cli("init", data / "train.parquet", "--task", "click", "--dense", "review", "-o", tmp_path / "d.yaml")
    assert r.code == 2 and "--dense review: column 'review' holds string, not numbers" in r.err, r
    r = cli("init", data / "train.parquet", "--task", "click", "--label", "stage_2", "-o", tmp_path / "e.yaml")
    assert r.code == 2 and "--label stage_2: column 'stage_2' not found" in r.err and "stage2" in r.err, r


def test_two_tasks_get_a_mixture_of_experts_and_the_sibling_label_is_a_task(cli, data, tmp_path):
    r = cli("init", data / "train.parquet", "--task", "click", "--task", "stage2", "-o", tmp_path / "c.yaml")
    assert r.code == 0, r
    cfg = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert cfg["tower"]["name"] == "mmoe" and [t["name"] for t in cfg["tasks"]] == ["click", "stage2"]
    assert "nest" not in r.err  # both are tasks now


def test_positive_keyed_by_task_or_column(data):
    tasks = [("liked", "rating"), ("loved", "rating"), ("click", "click")]
    assert parse_positives(["liked=>=4", "loved=5", "loved=4"], tasks) == {"liked": ">=4", "loved": ["5", "4"]}
    assert parse_positives(["click=1"], tasks) == {"click": ["1"]}
    assert parse_positives(["liked= > 3.5"], tasks) == {"liked": ">3.5"}
    with pytest.raises(ConfigError, match="column 'rating' is the label of tasks liked, loved; key it by task"):
        parse_positives(["rating=5"], tasks)
    with pytest.raises(ConfigError, match="a threshold stands alone"):
        parse_positives(["liked=4", "liked=>4"], tasks)
    with pytest.raises(ConfigError, match="already has the threshold"):
        parse_positives(["liked=>4", "liked=5"], tasks)
    with pytest.raises(ConfigError, match="'ratin' is neither a task"):
        parse_positives(["ratin=5"], tasks)
    # a task name wins over a column of the same name: task 'rating' reads column 'click'
    assert parse_positives(["rating=1"], [("rating", "click"), ("stars", "rating")]) == {"rating": ["1"]}
    assert parse_positives(["click=1"], [("ctr", "click")]) == {"ctr": ["1"]}  # a column of one task


def test_positive_specs_in_the_written_config(data, tmp_path):
    result = starter_config(str(data / "train.parquet"), ["liked=rating", "five=rating", "click"], tmp_path / "c.yaml",
                            positives=["liked=>=4", "five=5"])
    tasks = {t["name"]: t for t in result.config["tasks"]}
    assert tasks["liked"]["positive"] == ">=4" and tasks["five"]["positive"] == [5]  # ints for an int column
    assert tasks["liked"]["head"] == tasks["five"]["head"] == "binary"
    assert "positive" not in tasks["click"]
    with pytest.raises(ConfigError, match="the threshold '>0' needs a numeric label column"):
        starter_config(str(data / "train.parquet"), ["t=day"], tmp_path / "c.yaml", positives=["t=>0"])
    with pytest.raises(ConfigError, match="holds integers"):
        starter_config(str(data / "train.parquet"), ["t=rating"], tmp_path / "c.yaml", positives=["t=high"])


@pytest.mark.parametrize(("rows", "batch", "epochs", "patience", "log_every", "dropout"), [
    (100, 64, 100, 5, 1, 0.1),
    (16_000, 64, 16, 3, 25, 0.1),
    (200_000, 1024, 21, 3, 19, 0.1),
    (800_000, 2048, 11, 3, 39, 0.1),
    (10_000_000, 2048, 10, 2, 200, 0.0),
])
def test_sized_defaults(rows, batch, epochs, patience, log_every, dropout):
    sized = sized_defaults(rows)
    assert sized.train["batch_size"] == batch and sized.train["epochs"] == epochs
    assert sized.train["early_stopping"]["patience"] == patience and sized.train["log_every"] == log_every
    assert sized.dropout == dropout


def test_profile_rules():
    assert prof.looks_like_outcome("is_click") and prof.looks_like_outcome("play_time_ms")
    assert prof.looks_like_outcome("y2") and prof.looks_like_outcome("purchase")
    assert not prof.looks_like_outcome("follow_user_num") and not prof.looks_like_outcome("click_count_7d")
    assert not prof.looks_like_outcome("duration_ms") and not prof.looks_like_outcome("user_id")
    assert not prof.looks_like_outcome("order_id") and not prof.looks_like_outcome("watch_history")
    assert prof.name_tokens("playTimeMs") == ["play", "time", "ms"]
    assert prof.looks_like_id("item_id") and prof.looks_like_id("videoId") and prof.looks_like_id("det_ind_code")
    rng = np.random.default_rng(0)
    heavy, before, after = prof.heavy_tail(np.exp(rng.normal(0, 2, 5000)))
    assert heavy and before > prof.HEAVY_SKEW and abs(after) <= prof.HEAVY_SKEW
    zeros = np.where(rng.random(5000) < 0.95, 0.0, np.exp(rng.normal(8, 1, 5000)))  # mostly zeros: stays skewed
    assert not prof.heavy_tail(zeros)[0] and prof.heavy_tail(zeros)[2] > prof.HEAVY_SKEW
    assert not prof.heavy_tail(rng.normal(0, 1, 5000))[0]
    assert not prof.heavy_tail(rng.random(5000) * 1e-3)[0]  # skewed? no: uniform
    # min_count: a long tail of values seen fewer than TAIL_COUNT times
    tail = np.array([1, 1, 1, 2, 50] * 20)
    assert prof.propose_min_count(tail, 1.0) == prof.TAIL_COUNT
    assert prof.propose_min_count(np.array([10, 20, 30, 1] * 20), 1.0) == 1
    assert prof.propose_min_count(tail, 10.0) == 1  # a 1/10 sample: counts x 10
    assert prof.propose_min_count(np.array([1, 1, 1, 2, 50]), 1.0) == 1  # 5 values: no tail


def test_integer_codes_and_numbers_are_told_apart():
    rng = np.random.default_rng(1)
    n = 40_000
    x = rng.integers(0, 400, n)
    effect = rng.normal(0, 0.15, 400)
    y_code = (rng.random(n) < 0.3 + effect[x].clip(-0.29, 0.69)).astype(float)
    y_num = (rng.random(n) < 0.1 + 0.5 * x / 400).astype(float)
    assert prof.code_or_number(pa.array(x), {"t": y_code})[2] is True
    assert prof.code_or_number(pa.array(x), {"t": y_num})[2] is False
    counts = np.floor(np.exp(rng.normal(2, 1.5, n))).astype(np.int64)  # a count with a log effect: a number
    y_cnt = (rng.random(n) < 1 / (1 + np.exp(1.5 - 0.5 * np.log1p(counts)))).astype(float)
    assert prof.code_or_number(pa.array(counts), {"t": y_cnt})[2] is False


def test_hash_buckets_for_huge_vocabularies_and_pandas_metadata(tmp_path):
    n = 4000
    ids = np.arange(n) % 1500  # repeats, so not near-unique in the sample
    t = pa.table({"item_id": ids, "y": (np.arange(n) % 2).astype(np.int8)})
    big = prof.Proposal("item_id", "int64", 1500, n, 0.0)
    arr = t.column("item_id")
    p = prof.profile_column("item_id", arr, 10_000_000)
    p = prof.propose(p, arr, 10_000_000, {})
    assert p.feature == {"name": "item_id", "kind": "categorical", "hash_buckets": prof.HASH_BUCKETS}, p
    assert big.ratio == "1,500/4,000"
    import pandas as pd
    frame = pd.DataFrame({"a": [1, 2, 3], "y": [0, 1, 0]}, index=pd.Index([5, 6, 7], name="row"))
    pq.write_table(pa.Table.from_pandas(frame), tmp_path / "p.parquet")
    result = starter_config(str(tmp_path / "p.parquet"), ["y"], tmp_path / "c.yaml")
    decisions = {p.name: p.decision for p in result.proposals}
    assert decisions["row"] == "skipped" and decisions["a"] == "categorical"
