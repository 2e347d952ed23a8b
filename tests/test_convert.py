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
