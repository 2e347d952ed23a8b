"""Data a user brings that broke a first run: files whose int widths differ, text that is not UTF-8, a
feature thresholded into the label, a task named like its label column, kept ids beside saved predictions."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_bad_input import assert_clean_error, no_run_output

from recmtl.schema import leaks
from recmtl.schema.labels import LabelColumn


def reviews(n: int = 3000, seed: int = 0, int_type: pa.DataType = pa.int64()) -> pa.Table:
    """A task named like its label column (``recommend``), an int id, a string and a number."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 40, n)
    p = 1 / (1 + np.exp(-(user % 7 - 3) / 2))
    return pa.table({"user": pa.array(user).cast(int_type), "kind": [f"k{i % 5}" for i in range(n)],
                     "price": rng.lognormal(size=n), "recommend": (rng.random(n) < p).astype(np.int64)})


def config(path, train, validation=None, **train_opts) -> str:
    cfg = {"data": {"train": str(train), "validation": str(validation or train), "read_rows": 1000},
           "features": [{"name": "user", "kind": "categorical"}, {"name": "kind", "kind": "categorical"},
                        {"name": "price", "kind": "dense"}],
           "tasks": [{"name": "recommend"}], "tower": {"name": "shared_bottom", "bottom_units": [16], "task_units": [8]},
           "encoders": {"categorical": {"name": "embedding", "dim": 4}},
           "train": {"epochs": 1, "batch_size": 256, "progress": False, **train_opts}}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A run and its ONNX export, trained on a folder of two files: one with ``user`` as int64, one as int32."""
    from recmtl.cli import main
    tmp = tmp_path_factory.mktemp("reviews")
    (tmp / "mixed").mkdir()
    pq.write_table(reviews(seed=1), tmp / "mixed" / "a.parquet", row_group_size=700)
    pq.write_table(reviews(seed=2, int_type=pa.int32()), tmp / "mixed" / "b.parquet", row_group_size=700)
    cfg = config(tmp / "c.yaml", tmp / "mixed")
    for args in (["train", cfg, "--out", tmp / "run"], ["export", tmp / "run", "-o", tmp / "model.onnx"]):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            assert exc.code == 0, args
    return tmp


# ---- a folder whose files differ in a column's int width -----------------------------------------------------
def test_folder_with_int32_and_int64_files_trains_evaluates_and_scores(cli, model, tmp_path):
    """The fixture trained (and validated) on the mixed folder; evaluate and score read it too."""
    assert (model / "run" / "best.pt").is_file()
    r = cli("evaluate", model / "run", model / "mixed", "--json")
    assert r.code == 0, r
    assert '"rows": 6000' in r.out
    r = cli("score", model / "model.onnx", model / "mixed", "-o", tmp_path / "s.parquet", "--keep", "user", "--no-progress")
    assert r.code == 0, r
    t = pq.read_table(tmp_path / "s.parquet")
    assert t.schema.field("user").type == pa.int64() and t.num_rows == 6000


def test_files_whose_types_do_not_widen_to_one_are_refused(cli, tmp_path):
    (tmp_path / "d").mkdir()
    pq.write_table(reviews(), tmp_path / "d" / "a.parquet")
    t = reviews(seed=3)
    pq.write_table(t.set_column(0, "user", pa.array([f"u{u}" for u in t["user"].to_pylist()])), tmp_path / "d" / "b.parquet")
    r = cli("train", config(tmp_path / "c.yaml", tmp_path / "d"), "--out", tmp_path / "run")
    assert_clean_error(r, "column 'user' has type int64 in", "a.parquet but string in", "b.parquet")
    assert no_run_output(tmp_path / "run")


# ---- text that is not UTF-8 --------------------------------------------------------------------------------
def with_bad_utf8(table: pa.Table, column: str, row: int) -> pa.Table:
    """``table`` with the value of ``column`` at ``row`` replaced by latin-1 bytes in a string column."""
    values = [v.encode() for v in table[column].to_pylist()]
    values[row] = "Montréal".encode("latin-1")
    bad = pa.Array.from_buffers(pa.string(), len(values), pa.array(values, pa.binary()).buffers())
    return table.set_column(table.schema.get_field_index(column), column, bad)


def test_invalid_utf8_is_one_clear_error_in_train_evaluate_and_score(cli, model, tmp_path):
    bad = tmp_path / "bad.parquet"
    pq.write_table(with_bad_utf8(reviews(), "kind", 1234), bad, row_group_size=1000)
    needle = f"column 'kind' of {bad} holds text that is not valid UTF-8"
    r = cli("train", config(tmp_path / "c.yaml", bad), "--out", tmp_path / "run")
    assert_clean_error(r, needle, "(row 1,234 of the file)")
    assert no_run_output(tmp_path / "run")
    assert_clean_error(cli("evaluate", model / "run", bad), needle)
    out = tmp_path / "s.parquet"
    assert_clean_error(cli("score", model / "model.onnx", bad, "-o", out, "--no-progress"), needle)
    assert not out.exists()


# ---- task named like its label column: --keep ----------------------------------------------------------------
def test_score_keep_of_a_column_named_like_a_task_is_suffixed(cli, model, tmp_path):
    out = tmp_path / "s.parquet"
    r = cli("score", model / "model.onnx", model / "mixed", "-o", out, "--keep", "user", "--keep", "recommend",
            "--keep", "recommend", "--no-progress")
    assert r.code == 0, r
    assert "'recommend' is written as 'recommend__kept'" in r.err
    frame = pd.read_parquet(out)  # two columns of one name could not be read
    assert list(frame.columns) == ["user", "recommend__kept", "recommend"]
    data = pq.read_table(model / "mixed")
    assert frame["recommend__kept"].tolist() == data["recommend"].to_pylist()
    assert frame["recommend"].between(0, 1).all()


def test_kept_names():
    from recmtl.serving.score import kept_names
    assert kept_names(["id", "click"], ["click", "conversion"]) == ["id", "click__kept"]
    assert kept_names(["click", "click__kept"], ["click"]) == ["click__kept__kept", "click__kept"]


def test_evaluate_save_predictions_keeps_columns(cli, model, tmp_path):
    out = tmp_path / "p.parquet"
    r = cli("evaluate", model / "run", model / "mixed", "--save-predictions", out, "--keep", "user",
            "--keep", "kind", "--keep", "recommend")
    assert r.code == 0, r
    frame = pd.read_parquet(out)
    assert list(frame.columns) == ["user", "kind", "recommend__kept", "recommend", "recommend__label"]
    data = pq.read_table(model / "mixed")
    assert frame["user"].tolist() == data["user"].to_pylist() and frame["kind"].tolist() == data["kind"].to_pylist()
    assert (frame["recommend__kept"] == frame["recommend__label"]).all()  # row-aligned with the predictions
    scored = tmp_path / "s.parquet"
    assert cli("score", model / "model.onnx", model / "mixed", "-o", scored, "--no-progress").code == 0
    np.testing.assert_allclose(frame["recommend"], pd.read_parquet(scored)["recommend"], rtol=1e-4, atol=1e-5)
    assert_clean_error(cli("evaluate", model / "run", model / "mixed", "--keep", "user"), "--save-predictions")
    assert_clean_error(cli("evaluate", model / "run", model / "mixed", "--save-predictions", tmp_path / "q.parquet",
                           "--keep", "usr"), "column 'usr' not found", "did you mean: user")
    assert not (tmp_path / "q.parquet").exists()


# ---- the leak check: a count thresholded into the label --------------------------------------------------------
def leak_table(n: int = 5000, seed: int = 0) -> pa.Table:
    """``helpful = votes >= 3`` from a heavy-tailed count; ``history`` a legitimate strong feature (AUC ~0.9);
    ``noisy_votes`` the count with a few rows off (AUC ~0.99)."""
    rng = np.random.default_rng(seed)
    votes = rng.negative_binomial(1, 0.05, n)  # 0..~200, many distinct values
    helpful = (votes >= 3).astype(np.int64)
    history = helpful * 1.8 + rng.normal(size=n)
    noisy = np.where(rng.random(n) < 0.015, rng.permutation(votes), votes)
    return pa.table({"votes": votes, "history": history, "noisy_votes": noisy, "helpful": helpful,
                     "noise": rng.normal(size=n)})


def run_leak_check(table: pa.Table, feature: str) -> list[str]:
    from recmtl.config import FeatureConfig
    warnings: list[str] = []
    leaks.check_leaks([FeatureConfig(name=feature, kind="dense")], table, [LabelColumn("helpful", "helpful")], warnings.append)
    return warnings


def test_thresholded_count_is_refused():
    from recmtl.errors import DataError
    t = leak_table()
    assert len(np.unique(t["votes"].to_numpy())) > 64
    with pytest.raises(DataError, match="feature 'votes' alone separates the label of task 'helpful'.*AUC 1.0000"):
        run_leak_check(t, "votes")


def test_strong_legitimate_feature_passes_and_near_separation_warns():
    t = leak_table()
    y = t["helpful"].to_numpy() == 1
    assert 0.85 < leaks.separation_auc(t["history"].to_numpy(), y) < leaks.LEAK_WARN_AUC
    assert run_leak_check(t, "history") == [] and run_leak_check(t, "noise") == []
    assert leaks.LEAK_WARN_AUC <= leaks.separation_auc(t["noisy_votes"].to_numpy(), y) < leaks.LEAK_REFUSE_AUC
    (warning,) = run_leak_check(t, "noisy_votes")
    assert "feature 'noisy_votes' alone nearly separates the label of task 'helpful'" in warning
    # a count that ranks the positives low separates them as well
    with pytest.raises(Exception, match="alone separates"):
        run_leak_check(t.set_column(0, "votes", pa.array(-t["votes"].to_numpy())), "votes")


def test_thresholded_count_refused_in_train_and_warning_printed(cli, tmp_path):
    t = leak_table()
    pq.write_table(t, tmp_path / "t.parquet")
    base = {"data": {"train": str(tmp_path / "t.parquet")}, "tasks": [{"name": "helpful"}],
            "tower": {"name": "shared_bottom", "bottom_units": [8], "task_units": [4]},
            "train": {"epochs": 1, "progress": False}}
    cfg = tmp_path / "leak.yaml"
    cfg.write_text(yaml.safe_dump({**base, "features": [{"name": "votes", "kind": "dense"}]}))
    assert_clean_error(cli("train", cfg, "--out", tmp_path / "r1"), "feature 'votes' alone separates")
    assert no_run_output(tmp_path / "r1")
    cfg.write_text(yaml.safe_dump({**base, "features": [{"name": "history", "kind": "dense"},
                                                        {"name": "noisy_votes", "kind": "dense"}]}))
    r = cli("train", cfg, "--out", tmp_path / "r2")
    assert r.code == 0, r
    assert "recmtl: warning: feature 'noisy_votes' alone nearly separates" in r.err and "'history'" not in r.err


def test_small_samples_are_not_called_leaks():
    """A rare positive whose row happens to have a unique value, and a many-valued group id on few rows,
    determine the label on the sample only by chance (the shared AliExpress and Ali-CCP samples): no error.
    A copy of the label on the same rows still is one."""
    from recmtl.config import FeatureConfig
    from recmtl.errors import DataError
    rng = np.random.default_rng(0)
    n = 150
    rare = np.zeros(n, dtype=np.int64)
    rare[7] = 1
    amount = np.where(rare == 1, 0.256, rng.choice([0.0, 0.1, 0.2], n))
    group = np.repeat(np.arange(50), 3)
    grouped = (rng.random(50) < 0.6).astype(np.int64)[group]
    t = pa.table({"amount": amount, "search_id": group, "purchase": rare, "click": grouped,
                  "click_copy": 1 - grouped})
    for feature, label in [("amount", "purchase"), ("search_id", "click")]:
        leaks.check_leaks([FeatureConfig(name=feature, kind="categorical")], t, [LabelColumn(label, label)])
    with pytest.raises(DataError, match="feature 'click_copy' determines the label of task 'click'"):
        leaks.check_leaks([FeatureConfig(name="click_copy", kind="categorical")], t, [LabelColumn("click", "click")])
