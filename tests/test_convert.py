"""recmtl convert (CSV -> Parquet) and recmtl split."""
from __future__ import annotations

import gzip

import pyarrow.parquet as pq


def test_convert_headerless_gz_with_null_markers_and_na_kept(cli, tmp_path):
    src = tmp_path / "in.csv.gz"
    with gzip.open(src, "wt") as f:
        f.write("73, Not in universe, NA, 0.5, - 50000.\n")
        f.write("41, Private, ?, ?, 50000+.\n")
        f.write("12, ?, Mexican, 2.25, - 50000.\n")
    out = tmp_path / "out.parquet"
    r = cli("convert", src, "-o", out, "--no-header", "--names", "age,worker,hisp,rate,income", "--null-value", "?")
    assert r.code == 0, r
    t = pq.read_table(out)
    assert t.column_names == ["age", "worker", "hisp", "rate", "income"]
    assert str(t.schema.field("age").type) == "int64" and str(t.schema.field("rate").type) == "double"
    assert t["worker"].to_pylist() == ["Not in universe", "Private", None]
    assert t["hisp"].to_pylist() == ["NA", None, "Mexican"]  # 'NA' stays a value
    assert t["income"].to_pylist() == ["- 50000.", "50000+.", "- 50000."]
    assert t["rate"].to_pylist() == [0.5, None, 2.25]


def test_convert_header_delimiter_and_types(cli, tmp_path):
    src = tmp_path / "in.tsv"
    src.write_text("id;city;score\n1;Paris;3\n2;NA;4\n")
    out = tmp_path / "o.parquet"
    r = cli("convert", src, "-o", out, "--delimiter", ";", "--type", "id=string")
    assert r.code == 0, r
    t = pq.read_table(out)
    assert t["id"].to_pylist() == ["1", "2"] and t["city"].to_pylist() == ["Paris", "NA"]


def test_convert_errors(cli, tmp_path):
    r = cli("convert", tmp_path / "nope.csv", "-o", tmp_path / "o.parquet")
    assert r.code == 2 and "no such file" in r.err
    src = tmp_path / "ragged.csv"
    src.write_text("a,b\n1,2\n3,4,5\n")
    r = cli("convert", src, "-o", tmp_path / "o.parquet")
    assert r.code == 2 and "cannot convert" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "o.parquet").exists()
    assert cli("convert", src, "-o", tmp_path / "o.parquet", "--no-header").code == 2


def test_split_preserves_rows(cli, funnel_dir, tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    r = cli("split", funnel_dir / "test.parquet", "-o", a, "-o", b, "--fractions", "0.5,0.5", "--seed", "1")
    assert r.code == 0, r
    n = pq.read_metadata(funnel_dir / "test.parquet").num_rows
    na, nb = pq.read_metadata(a).num_rows, pq.read_metadata(b).num_rows
    assert na + nb == n and abs(na - nb) <= 1  # exact halves
    assert cli("split", funnel_dir / "test.parquet", "-o", a, "--fractions", "0.5,0.5").code == 2


def _events(path, n=2000, seed=0):
    """Rows with a shuffled timestamp, a user id (groups of 1 to 19 rows), a user name and a payload."""
    import numpy as np
    import pyarrow as pa
    rng = np.random.default_rng(seed)
    ts = rng.permutation(n).astype("int64") * 1000 + 1_700_000_000_000
    user = np.repeat(np.arange(n), rng.integers(1, 20, n))[:n]
    rng.shuffle(user)
    t = pa.table({"ts": pa.array(ts, pa.timestamp("ms")), "user": user, "name": [f"user-{u}" for u in user],
                  "x": rng.normal(size=n)})
    pq.write_table(t, path, row_group_size=300)
    return t


def test_split_order_by_puts_the_earliest_rows_first(cli, tmp_path):
    import pyarrow.compute as pc
    src = tmp_path / "events.parquet"
    t = _events(src)
    outs = [tmp_path / f"{s}.parquet" for s in ("train", "valid", "test")]
    r = cli("split", src, *[a for o in outs for a in ("-o", o)], "--fractions", "0.8,0.1,0.1", "--order-by", "ts")
    assert r.code == 0, r
    parts = [pq.read_table(o) for o in outs]
    assert [p.num_rows for p in parts] == [1600, 200, 200]  # distinct times: exact fractions
    for early, late in zip(parts, parts[1:]):
        assert pc.max(early["ts"]).value < pc.min(late["ts"]).value
    assert sorted(sum((p["x"].to_pylist() for p in parts), [])) == sorted(t["x"].to_pylist())
    # rows keep their input order inside an output
    order = {v: i for i, v in enumerate(t["x"].to_pylist())}
    assert [order[v] for v in parts[0]["x"].to_pylist()] == sorted(order[v] for v in parts[0]["x"].to_pylist())


def test_split_order_by_keeps_equal_values_together(cli, tmp_path):
    """A day column (strings): rows of one day never straddle two outputs; the cut moves to the nearest
    day boundary."""
    import pyarrow as pa
    days = ["2026-01-01"] * 30 + ["2026-01-02"] * 45 + ["2026-01-03"] * 25
    src = tmp_path / "days.parquet"
    pq.write_table(pa.table({"day": days[::-1], "v": list(range(100))}), src)
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert cli("split", src, "-o", a, "-o", b, "--fractions", "0.6,0.4", "--order-by", "day").code == 0
    assert set(pq.read_table(a)["day"].to_pylist()) == {"2026-01-01", "2026-01-02"}  # cut at 75, nearer 60 than 30
    assert set(pq.read_table(b)["day"].to_pylist()) == {"2026-01-03"}


def test_split_group_by_keeps_each_group_in_one_output(cli, tmp_path):
    src = tmp_path / "events.parquet"
    _events(src, n=6000)
    for column in ("user", "name"):
        outs = [tmp_path / f"{column}{i}.parquet" for i in range(3)]
        r = cli("split", src, *[a for o in outs for a in ("-o", o)], "--fractions", "0.8,0.1,0.1",
                "--group-by", column, "--seed", "7")
        assert r.code == 0, r
        parts = [pq.read_table(o) for o in outs]
        groups = [set(p[column].to_pylist()) for p in parts]
        assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
        rows = [p.num_rows for p in parts]
        assert sum(rows) == 6000
        for got, want in zip(rows, (4800, 600, 600)):
            assert abs(got - want) <= 20, rows  # groups of at most 19 rows: within half a group per cut
    other = [tmp_path / f"s{i}.parquet" for i in range(2)]
    assert cli("split", src, "-o", other[0], "-o", other[1], "--group-by", "user", "--seed", "8").code == 0
    assert set(pq.read_table(other[0])["user"].to_pylist()) != set(pq.read_table(tmp_path / "user0.parquet")["user"].to_pylist())


def test_split_by_column_errors(cli, tmp_path):
    import pyarrow as pa
    src = tmp_path / "events.parquet"
    _events(src)
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    r = cli("split", src, "-o", a, "-o", b, "--order-by", "ts", "--group-by", "user")
    assert r.code == 2 and "cannot be combined" in r.err
    r = cli("split", src, "-o", a, "-o", b, "--order-by", "tss")
    assert r.code == 2 and "column 'tss' not found" in r.err and "did you mean: ts" in r.err
    r = cli("split", src, "-o", a, "-o", b, "--group-by", "x")
    assert r.code == 2 and "--group-by x" in r.err and "double" in r.err
    holes = tmp_path / "holes.parquet"
    pq.write_table(pa.table({"ts": [3, None, 1, 2]}), holes)
    r = cli("split", holes, "-o", a, "-o", b, "--order-by", "ts")
    assert r.code == 2 and "null or NaN" in r.err and "'ts'" in r.err
    one = tmp_path / "one.parquet"
    pq.write_table(pa.table({"user": [5] * 50}), one)
    r = cli("split", one, "-o", a, "-o", b, "--group-by", "user")
    assert r.code == 2 and "would get no rows" in r.err and "Traceback" not in r.err
    assert not a.exists() and not b.exists()


def test_convert_latin1_needs_and_takes_encoding(cli, tmp_path):
    src = tmp_path / "latin1.csv"
    src.write_bytes("name,city,n\nJosé,Montréal,1\nAnn,Paris,2\n".encode("latin-1"))
    out = tmp_path / "o.parquet"
    for extra in ([], ["--no-strip"], ["--type", "name=string"]):
        r = cli("convert", src, "-o", out, *extra)
        assert r.code == 2 and "--encoding" in r.err and "--type" not in r.err and "Traceback" not in r.err, r
        assert not out.exists()
    r = cli("convert", src, "-o", out, "--encoding", "latin-1")
    assert r.code == 0, r
    t = pq.read_table(out)
    assert t["name"].to_pylist() == ["José", "Ann"] and t["city"].to_pylist() == ["Montréal", "Paris"]
    assert str(t.schema.field("n").type) == "int64"
    r = cli("convert", src, "-o", out, "--encoding", "latin-42")
    assert r.code == 2 and "unknown encoding" in r.err
