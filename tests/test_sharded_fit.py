"""The sharded fit pass: every rank counts its share of the row groups, the counts are merged, and N processes
fit exactly the schema one process does (vocabularies with min_count/max_size cut-offs and ties, shared and
sequence vocabularies, hashed and text features, label statistics, dense mean/std)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_distributed import env, free_port

from recmtl.config import load_config
from recmtl.data.parquet import ParquetSource
from recmtl.errors import DataError
from recmtl.registry import load_registry
from recmtl.schema import fit_schema
from recmtl.schema.fit import _Plan, _VocabCounter, check_same_data, data_fingerprint, fit_units
from recmtl.training.model import validate_plugins

SCRIPT = """
import json
import sys
from pathlib import Path
from recmtl.config import load_config
from recmtl.data.parquet import ParquetSource
from recmtl.errors import DataError
from recmtl.registry import load_registry
from recmtl.schema import fit_schema
from recmtl.training.distributed import setup
from recmtl.training.model import validate_plugins
cfg, out, changed = load_config(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
ctx = setup("cpu")
heads = validate_plugins(cfg, load_registry())
schema = fit_schema(cfg, ParquetSource(cfg.resolve(cfg.data.train), cfg.columns()), heads, None, ctx)
schema.save(out / f"rank{ctx.rank}")
(out / f"rank{ctx.rank}" / "labels.json").write_text(json.dumps(schema.label_summary, sort_keys=True))
try:  # then rank 1 sees other data: the same error on every rank, no hang
    fit_schema(cfg, ParquetSource(changed if ctx.rank == 1 else cfg.resolve(cfg.data.train), cfg.columns()), heads,
               None, ctx)
except DataError as exc:
    (out / f"error{ctx.rank}.txt").write_text(str(exc))
if ctx.rank == 1:  # and a row group rank 1 cannot read: its error on every rank
    def unreadable(self, u, read_rows=65_536, columns=None):
        raise DataError(f"failed reading row group {u} on rank 1")
    ParquetSource.unit_batches = unreadable
try:
    fit_schema(cfg, ParquetSource(cfg.resolve(cfg.data.train), cfg.columns()), heads, None, ctx)
except DataError as exc:
    (out / f"failed{ctx.rank}.txt").write_text(str(exc))
ctx.close()
"""


def _data(folder: Path, seed: int = 5) -> Path:
    """Two files, row groups of unequal sizes (some dealt whole, some left over); an id column with ties at
    the max_size cut-off, values below min_count and nulls; strings with empty ones; a sequence sharing the ids'
    vocabulary, one with its own; a hashed id, a text column, a dense column with nulls and NaN; two labels."""
    rng = np.random.default_rng(seed)
    items = np.concatenate([np.repeat([7, 3, 11], 60), np.repeat(np.arange(100, 112), 25),  # 12 tied at 25
                            np.repeat(np.arange(200, 240), 2), np.arange(1000, 1300)])       # below min_count 3
    n = 3000
    item = rng.permutation(np.concatenate([items, np.arange(2000, 2000 + n - len(items))]))
    words = np.array(["a", "b", "c", "d", "e", "", "f", "g"])
    table = pa.table({
        "item": pa.array(item, mask=(item >= 1000) & (rng.random(n) < 0.2)),  # nulls off the tied values
        "word": pa.array(rng.choice(words, n).tolist(), mask=rng.random(n) < 0.05),
        "hist": pa.array([rng.choice([3, 7, 11, 2500], rng.integers(0, 5)).tolist() for _ in range(n)],
                         pa.list_(pa.int64())),  # counted into item's vocabulary, away from its tie
        "tags": pa.array([rng.choice(words[:5], rng.integers(0, 4)).tolist() for _ in range(n)], pa.list_(pa.string())),
        "user": rng.integers(0, 10**6, n),
        "title": pa.array([" ".join(rng.choice(words[:5], 3)) for _ in range(n)]),
        "price": pa.array(np.where(rng.random(n) < 0.02, np.nan, rng.lognormal(3, 1, n)), mask=rng.random(n) < 0.05),
        "click": pa.array(rng.integers(0, 2, n), mask=rng.random(n) < 0.1),
        "watch": rng.gamma(2.0, 30.0, n),
    })
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.slice(0, 2050), folder / "a.parquet", row_group_size=600)  # 600 600 600 250
    pq.write_table(table.slice(2050), folder / "b.parquet", row_group_size=300)      # 300 300 300 50
    return folder


def _config(tmp_path: Path, data: Path) -> Path:
    cfg = {
        "data": {"train": str(data), "read_rows": 256},
        "features": [
            {"name": "item", "kind": "categorical", "min_count": 3, "max_size": 8,  # cut-off inside the 25s
             "max_distinct": 5000},  # the sketch's cap above the ~2,700 distinct values: exact
            {"name": "word", "kind": "categorical", "min_count": 2},
            {"name": "user", "kind": "categorical", "hash_buckets": 64},
            {"name": "hist", "kind": "sequence", "vocabulary": "item", "max_length": 4},
            {"name": "tags", "kind": "sequence", "max_length": 3, "max_size": 3},
            {"name": "title", "kind": "text", "hash_buckets": 128, "max_tokens": 8},
            {"name": "price", "kind": "dense", "transform": "log1p"},
        ],
        "tasks": [{"name": "click", "head": "binary"}, {"name": "watch", "head": "regression"}],
        "train": {"progress": False},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _files(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file()}


def _fit(cfg_path: Path, out: Path) -> dict[str, str]:
    cfg = load_config(cfg_path)
    schema = fit_schema(cfg, ParquetSource(cfg.resolve(cfg.data.train), cfg.columns()),
                        validate_plugins(cfg, load_registry()))
    schema.save(out)
    (out / "labels.json").write_text(json.dumps(schema.label_summary, sort_keys=True))  # not in schema.json
    return _files(out)


def test_shares_cover_every_row_group_once(tmp_path):
    src = ParquetSource(str(_data(tmp_path / "d")))
    for world in (1, 2, 3, 5):
        shares = [fit_units(src, r, world) for r in range(world)]
        assert sorted(u for s in shares for u in s) == list(range(len(src.units)))


def test_merged_shares_fit_the_one_process_schema(tmp_path):
    """The merge without processes: two ranks' counts, merged, give the same files as one pass over all."""
    cfg_path = _config(tmp_path, _data(tmp_path / "d"))
    one = _fit(cfg_path, tmp_path / "one")
    cfg = load_config(cfg_path)
    heads = validate_plugins(cfg, load_registry())
    src = ParquetSource(cfg.resolve(cfg.data.train), cfg.columns())
    for world in (2, 3):
        plan = _Plan(cfg, src, heads)
        parts = [plan.count(src, fit_units(src, r, world), cfg.data.read_rows, None) for r in range(world)]
        schema = plan.finish(parts[::-1])  # rank order does not matter
        schema.save(tmp_path / f"merged{world}")
        (tmp_path / f"merged{world}" / "labels.json").write_text(json.dumps(schema.label_summary, sort_keys=True))
        assert _files(tmp_path / f"merged{world}") == one
    # the cut-off falls inside the tie of twelve values: the lowest five tied values make it, in value order
    vocab = pq.read_table(tmp_path / "one" / "vocab" / "0000.parquet").column("value").to_pylist()
    assert set(vocab[:4]) == {3, 7, 11, 2500} and vocab[4:] == [100, 101, 102, 103]


def test_sketches_merge_exactly_below_the_cap_and_within_the_bound_above():
    rng = np.random.default_rng(0)
    values = rng.zipf(1.5, 20_000) % 5_000
    true = np.bincount(values, minlength=5_000)
    for cap in (10_000, 100):  # above the column's distinct count: exact; below: sketched
        halves = [_VocabCounter(cap), _VocabCounter(cap)]
        for i, chunk in enumerate(np.array_split(values, 20)):
            halves[i % 2].add(pa.array(chunk))
        merged = _VocabCounter(cap)
        for h in halves:
            merged.absorb(h.summary())
        whole = _VocabCounter(cap)
        whole.add(pa.array(values))
        got = merged._merge()
        est = dict(zip(got.field("values").to_pylist(), got.field("counts").to_pylist()))
        if cap == 10_000:
            assert not merged.sketched and est == {v: int(c) for v, c in enumerate(true) if c}
        else:
            assert merged.sketched and merged.decrement <= len(values) / (cap + 1)
            for v, c in est.items():
                assert true[v] - merged.decrement <= c <= true[v]
            heavy = [v for v in range(5_000) if true[v] > merged.decrement]  # every heavy hitter is kept
            assert set(heavy) <= set(est)


def test_different_data_on_the_ranks_is_one_clear_error(tmp_path):
    data = _data(tmp_path / "d")
    src = ParquetSource(str(data))
    fp = data_fingerprint(src)
    check_same_data([fp, fp])
    other = {**fp, "row_groups": [fp["row_groups"][0][:2], fp["row_groups"][1]]}
    with pytest.raises(DataError, match=r"different training data .*a.parquet has 4 row group\(s\) \(2,050 rows\) "
                                        r"on rank 0 but 2 \(1,200 rows\) on rank 1"):
        check_same_data([fp, other])
    with pytest.raises(DataError, match="column 'item' is int64 on rank 0 but string on rank 1"):
        check_same_data([fp, {**fp, "types": {**fp["types"], "item": "string"}}])


def _torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node=2",
           "--master-addr", "127.0.0.1", f"--master-port={free_port()}", str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env(), check=False)


def test_two_processes_fit_the_schema_of_one(tmp_path):
    cfg = _config(tmp_path, _data(tmp_path / "d"))
    one = _fit(cfg, tmp_path / "one")
    changed = tmp_path / "changed"  # the same rows in other row groups
    changed.mkdir()
    for name in ("a.parquet", "b.parquet"):
        pq.write_table(pq.read_table(tmp_path / "d" / name), changed / name, row_group_size=1000)
    r = _torchrun(tmp_path, cfg, tmp_path, changed)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _files(tmp_path / "rank0") == one == _files(tmp_path / "rank1")  # schema.json, vocab files, labels
    errors = [(tmp_path / f"error{k}.txt").read_text() for k in (0, 1)]
    assert errors[0] == errors[1] and "the ranks see different training data" in errors[0], errors
    assert "changed/a.parquet is seen by rank 1 only" in errors[0]
    failed = [(tmp_path / f"failed{k}.txt").read_text() for k in (0, 1)]
    assert failed[0] == failed[1] and failed[0].startswith("failed reading row group 1 on rank 1"), failed
