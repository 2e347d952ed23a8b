"""Issue 17: shared vocabularies, the din and transformer encoders, kind: text (tokenising and hashing in
training and in the exported graph), attention diagnostics, and the CLI end to end (train, export with parity,
score, serve, Triton)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from onnx import TensorProto, helper

from recmtl import FeatureInfo
from recmtl.config import parse_config
from recmtl.errors import ConfigError
from recmtl.schema import TextColumn
from recmtl.testing import check_encoder
from recmtl_plugins.encoders.din import DINEncoder
from recmtl_plugins.encoders.text import TextBagEncoder
from recmtl_plugins.encoders.transformer import TransformerEncoder

TRICKY = ["Hello, World! hello", "", None, "   ", "ÉCOLE straße Ünïcode naïve", "a_b-c  d.e", "İstanbul ΣΟΦΙΑ",
          "x" * 40 + " y", "one two three four five six seven eight nine ten", "emoji 🙂 ok", "tab\tnew\nline",
          "123 4.5 -6", "日本語 テキスト", "MiXeD CaSe", "!!!"]


# ---- tokenising and hashing -------------------------------------------------------------------------
def test_text_ids_words_then_bigrams_truncated_and_empty_rows():
    from sklearn.utils import murmurhash3_32
    col = TextColumn("t", hash_buckets=1000, ngrams=2, max_tokens=5)
    ids = col.token_ids(pa.array(["Hello, WORLD! a", None, "", "...", "a b c d e f"]))
    h = {w: murmurhash3_32(w, seed=0, positive=True) for w in ("hello", "world", "a")}
    uni = [h[w] % 1000 + 1 for w in ("hello", "world", "a")]
    bi = [(h["hello"] * 1_000_003 + h["world"]) % 1000 + 1, (h["world"] * 1_000_003 + h["a"]) % 1000 + 1]
    assert ids[0].tolist() == uni + bi  # lowercased, split on punctuation: 3 words then 2 bigrams
    assert (ids[1:4] == col.padding_id).all()  # null, empty and punctuation-only: no tokens
    assert (ids[4] != col.padding_id).all() and len(set(ids[4].tolist())) == 5  # truncated: the 5 first words
    words = TextColumn("t", 1000, ngrams=1, max_tokens=8).token_ids(pa.array(["a b a"]))
    assert words[0, :3].tolist() == [uni[2], ids[4, 1], uni[2]] and (words[0, 3:] == 1001).all()


def _text_graph(col: TextColumn) -> ort.InferenceSession:
    from recmtl.export.graph import _Graph, core_input, text_ids
    g = _Graph()
    text_ids(g, [col], col.max_tokens)
    out = helper.make_tensor_value_info(core_input("text"), TensorProto.INT64, ["batch", 1, col.max_tokens])
    graph = helper.make_graph(g.nodes, "t", g.inputs, [out], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 2),
                                                    helper.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("ngrams,max_tokens", [(2, 6), (2, 40), (1, 4)])
def test_graph_tokenises_and_hashes_bit_for_bit(ngrams, max_tokens):
    """Punctuation, Unicode (accents, sharp s, Greek, CJK, emoji), whitespace, empty strings and nulls."""
    col = TextColumn("t", hash_buckets=997, ngrams=ngrams, max_tokens=max_tokens)
    sess = _text_graph(col)
    want = col.token_ids(pa.array(TRICKY, pa.string()))
    got = sess.run(None, {"t": np.array(["" if t is None else t for t in TRICKY], dtype=object)})[0]
    np.testing.assert_array_equal(got[:, 0], want)
    # a batch where no row has a word, and a single row
    empty = sess.run(None, {"t": np.array(["", " ;; "], dtype=object)})[0]
    assert (empty == col.padding_id).all() and empty.shape == (2, 1, max_tokens)
    np.testing.assert_array_equal(sess.run(None, {"t": np.array([TRICKY[4]], dtype=object)})[0][:, 0], want[4:5])


# ---- encoders ---------------------------------------------------------------------------------------
def test_encoder_contracts():
    for params in ({}, {"normalization": "softmax"}, {"include_target": False, "attention_units": [8, 4]}):
        check_encoder(DINEncoder, **params)
    for params in ({}, {"output": "mean", "num_layers": 2, "num_heads": 4}):
        check_encoder(TransformerEncoder, **params)
    check_encoder(TextBagEncoder)
    with pytest.raises(ValueError, match="normalization"):
        DINEncoder([FeatureInfo("s", "sequence", 5, {"max_length": 3})], normalization="max")
    with pytest.raises(ValueError, match="num_heads"):
        TransformerEncoder([FeatureInfo("s", "sequence", 5, {"max_length": 3})], dim=6, num_heads=4)


def _seq_features():
    return [FeatureInfo("hist", "sequence", 10, {"max_length": 4, "target": 0, "target_cardinality": 10, "shared": True})]


@pytest.mark.parametrize("cls", [DINEncoder, TransformerEncoder])
def test_attention_ignores_padding_and_depends_on_the_candidate(cls):
    torch.manual_seed(0)
    enc = cls(_seq_features(), dim=4, **({"dropout": 0.0} if cls is TransformerEncoder else {})).eval()
    x = torch.tensor([[[3, 5, 10, 10]], [[3, 5, 10, 10]]])
    cand = {"categorical": torch.tensor([[3], [7]])}
    out = enc(x, cand)
    assert not torch.allclose(out[0], out[1])  # the same history, another candidate: another interest
    if cls is DINEncoder:  # the shared table: the candidate's embedding is the history's row
        torch.testing.assert_close(out[0, 4:], enc.tables[0].weight[3])
    empty = enc(torch.full((1, 1, 4), 10), {"categorical": torch.tensor([[3]])})
    assert torch.isfinite(empty).all()
    if cls is DINEncoder:
        assert (empty[0, :4] == 0).all()  # no items: interest zero
    stats = enc.diagnostics()["attention"]["hist"]
    assert stats["rows_by_position"] == [2, 2] and len(stats["mean_by_position"]) == 2
    assert enc.diagnostics() == {}  # reset after each call


# ---- config and data errors -------------------------------------------------------------------------
def _raw(features):
    return {"data": {"train": "x.parquet"}, "features": features, "tasks": [{"name": "click"}]}


@pytest.mark.parametrize("features,message", [
    ([{"name": "h", "kind": "sequence", "target": "nope"}], "target 'nope' is not a feature"),
    ([{"name": "d", "kind": "dense"}, {"name": "h", "kind": "sequence", "vocabulary": "d"}],
     "vocabulary 'd' is a dense feature; expected a categorical feature"),
    ([{"name": "i", "kind": "categorical", "target": "i"}], "vocabulary/target apply to sequence features only"),
    ([{"name": "i", "kind": "categorical"}, {"name": "h", "kind": "sequence", "vocabulary": "i", "min_count": 2}],
     "shares the vocabulary of 'i'"),
    ([{"name": "i", "kind": "categorical", "max_tokens": 3}], "ngrams/max_tokens apply to text features only"),
    ([{"name": "t", "kind": "text", "min_count": 3}], "fits no vocabulary"),
])
def test_config_errors_name_the_feature(features, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(_raw(features))


def test_text_defaults():
    cfg = parse_config(_raw([{"name": "t", "kind": "text"}]))
    f = cfg.features[0]
    assert (f.ngrams, f.max_tokens, f.hash_buckets) == (2, 64, 100_000)


# ---- end to end -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interests_dir(tmp_path_factory):
    from recmtl.data.synthetic import interests
    out = tmp_path_factory.mktemp("interests")
    interests(out, rows=5000, seed=1, items=200, topics=10, history=12, text=True, test_fraction=0.0, valid_fraction=0.2)
    return out


def _config(path, data, encoder: dict, text: bool = True):
    features = [{"name": "item_id", "kind": "categorical"},
                {"name": "hist", "kind": "sequence", "max_length": 8, "vocabulary": "item_id", "target": "item_id"}]
    features += [{"name": "title", "kind": "text", "hash_buckets": 512, "max_tokens": 10}] if text else []
    cfg = {"seed": 0, "data": {"train": str(data / "train.parquet"), "validation": str(data / "valid.parquet"),
                               "shuffle_buffer": 4096, "read_rows": 2048},
           "features": features,
           "tasks": [{"name": "click"}, {"name": "conversion", "head": "esmm", "params": {"ctr_task": "click"}}],
           "encoders": {"categorical": {"name": "embedding", "dim": 4}, "sequence": encoder,
                        "text": {"name": "text_bag", "dim": 4}},
           "tower": {"name": "shared_bottom", "bottom_units": [16], "task_units": [8]},
           "optimizer": {"lr": 0.01},
           "train": {"batch_size": 256, "epochs": 1, "progress": False, "threads": 1}}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_din_with_text_trains_exports_scores_and_serves(cli, interests_dir, tmp_path):
    cfg = _config(tmp_path / "c.yaml", interests_dir, {"name": "din", "dim": 4})
    r = cli("train", cfg, "--out", tmp_path / "run")
    assert r.code == 0, r
    _check_memory_estimate(r.err, tmp_path / "run")
    schema = json.loads((tmp_path / "run" / "schema.json").read_text())
    hist = schema["sequence"][0]
    assert hist["vocabulary"] == "item_id" and hist["vocab_file"] == schema["categorical"][0]["vocab_file"]
    assert schema["text"][0]["max_tokens"] == 10
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    att = history[-1]["diagnostics"]["encoders"]["sequence"]["attention"]["hist"]
    assert len(att["mean_by_position"]) == 8 and att["rows_by_position"][0] > 0
    r = cli("report", tmp_path / "run", "-o", tmp_path / "report")
    assert r.code == 0 and (tmp_path / "report" / "attention.png").is_file(), r
    assert "Sequence attention" in (tmp_path / "report" / "index.html").read_text()

    model = tmp_path / "m.onnx"
    r = cli("export", tmp_path / "run", "-o", model)  # the parity check runs inside
    assert r.code == 0 and "parity" in r.out, r
    meta = json.loads({p.key: p.value for p in onnx.load(str(model)).metadata_props}["recmtl.schema"])
    inputs = {i["name"]: i for i in meta["inputs"]}
    assert inputs["title"]["kind"] == "text" and inputs["title"]["dtype"] == "string"

    r = cli("score", model, interests_dir / "valid.parquet", "-o", tmp_path / "s.parquet", "--no-progress")
    assert r.code == 0, r
    r = cli("evaluate", tmp_path / "run", interests_dir / "valid.parquet", "--save-predictions", tmp_path / "p.parquet")
    assert r.code == 0, r
    scored = pq.read_table(tmp_path / "s.parquet")
    torch_scores = pq.read_table(tmp_path / "p.parquet")
    for task in ("click", "conversion"):
        np.testing.assert_allclose(scored[task].to_numpy(), torch_scores[task].to_numpy(), atol=1e-5)

    from starlette.testclient import TestClient

    from recmtl.serving.app import create_app
    rows = pq.read_table(interests_dir / "valid.parquet").slice(0, 16).to_pylist()
    rows[0]["title"], rows[1]["title"], rows[2]["hist"] = None, "", None  # null/empty text and history are valid
    instances = [{k: r[k] for k in ("item_id", "hist", "title")} for r in rows]
    with TestClient(create_app(model)) as client:
        r = client.post("/v1/models/m/predict", json={"instances": instances})
        assert r.status_code == 200, r.text
        got = [p["click"] for p in r.json()["predictions"]]
        np.testing.assert_allclose(got[3:], scored["click"].to_numpy()[3:16], atol=1e-6)
        bad = client.post("/v1/models/m/predict", json={"instances": [{**instances[3], "title": 5}]})
        assert bad.status_code == 400 and "title" in bad.json()["error"]
    from recmtl.serving.triton import write_triton_repo
    config = (write_triton_repo(model, tmp_path / "triton", "m") / "config.pbtxt").read_text()
    assert '{ name: "title" data_type: TYPE_STRING dims: [ 1 ] reshape: { shape: [ ] } }' in config
    assert '{ name: "hist" data_type: TYPE_INT64 dims: [ 8 ] }' in config


def _check_memory_estimate(err: str, run_dir) -> None:
    """The estimate printed before training counts the text feature: its hash table among the embedding tables,
    its max_tokens int64 ids a row in the data buffers."""
    from recmtl.schema import FittedSchema
    from recmtl.training.distributed import format_bytes
    from recmtl.training.evaluate import load_run
    from recmtl.training.loop import row_bytes
    schema = FittedSchema.load(run_dir)
    assert schema.text[0].cardinality == 513  # hash_buckets 512: ids 1..512, padding 513 (a row of its own)
    text_table = (513 + 1) * 4 * 4  # dim 4, float32
    tables = sum(m.weight.numel() * 4 for m in load_run(run_dir, checkpoint="best").model.modules()
                 if isinstance(m, torch.nn.Embedding))
    line = next(x for x in err.splitlines() if x.startswith("memory per rank"))
    assert f"(embedding tables {format_bytes(tables)})" in line, line
    assert tables == text_table + 4 * schema.categorical[0].cardinality * 4  # item_id's table (shared) + the text's
    without_text = row_bytes(schema) - 8 * 10  # title: max_tokens 10
    assert f"data buffers {format_bytes((4096 + 2048) * row_bytes(schema))};" in line, line
    assert without_text == 8 * 1 + 8 * 2 + 8 + 8 * 8  # item_id, click + conversion, the row's index, hist (8 ids)


def test_transformer_exports_with_parity(cli, interests_dir, tmp_path):
    cfg = _config(tmp_path / "c.yaml", interests_dir, {"name": "transformer", "dim": 4, "num_heads": 2}, text=False)
    assert cli("train", cfg, "--out", tmp_path / "run").code == 0
    r = cli("export", tmp_path / "run", "-o", tmp_path / "m.onnx")
    assert r.code == 0 and "parity" in r.out, r


def test_bad_columns_are_data_errors(cli, interests_dir, tmp_path):
    t = pq.read_table(interests_dir / "valid.parquet").slice(0, 500)
    t = t.set_column(t.schema.get_field_index("hist"), "hist",
                     pa.array([[str(v) for v in h] for h in t["hist"].to_pylist()], pa.list_(pa.string())))
    pq.write_table(t, tmp_path / "strings.parquet")
    cfg = yaml.safe_load(_config(tmp_path / "c.yaml", interests_dir, {"name": "din"}).read_text())
    cfg["data"] = {"train": str(tmp_path / "strings.parquet")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("train", tmp_path / "c.yaml", "--out", tmp_path / "run")
    assert r.code == 2 and "shares the vocabulary of 'item_id'" in r.err and "Traceback" not in r.err, r
    cfg["features"] = cfg["features"][:1] + [{"name": "click_as_text", "kind": "text"}]
    t2 = t.append_column("click_as_text", t["item_id"])
    pq.write_table(t2, tmp_path / "ints.parquet")
    cfg["data"] = {"train": str(tmp_path / "ints.parquet")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("train", tmp_path / "c.yaml", "--out", tmp_path / "run2")
    assert r.code == 2 and "feature 'click_as_text' is text but its column has type int64; expected strings" in r.err, r


def test_shared_vocabulary_is_one_lookup_in_the_graph(interests_dir, tmp_path, cli):
    cfg = _config(tmp_path / "c.yaml", interests_dir, {"name": "din", "dim": 4}, text=False)
    assert cli("train", cfg, "--out", tmp_path / "run").code == 0
    r = cli("export", tmp_path / "run", "-o", tmp_path / "m.onnx")
    assert r.code == 0 and "parity" in r.out, r
    lookups = [n for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "LabelEncoder"]
    assert len(lookups) == 1  # item_id and hist: one vocabulary table


def test_transformer_computes_only_the_candidates_last_position_exactly(monkeypatch):
    import recmtl_plugins.encoders.transformer as tr
    torch.manual_seed(1)
    enc = TransformerEncoder(_seq_features(), dim=4, num_layers=2, dropout=0.0).eval()
    x, cand = torch.tensor([[[3, 5, 2, 10]], [[10, 10, 10, 10]]]), {"categorical": torch.tensor([[3], [7]])}
    fast = enc(x, cand)
    full_forward = tr._Block.forward
    monkeypatch.setattr(tr._Block, "forward", lambda self, h, keep, last_only=False: full_forward(self, h, keep, False))
    torch.testing.assert_close(fast, enc(x, cand))


def test_interests_generator_has_its_truth_and_history_signal(cli, tmp_path):
    r = cli("datagen", "interests", tmp_path, "--rows", "4000", "--items", "50", "--topics", "5", "--history", "6",
            "--text", "--seed", "2")
    assert r.code == 0, r
    data, truth = pq.read_table(tmp_path / "train.parquet"), pq.read_table(tmp_path / "train.truth.parquet")
    assert data.column_names == ["item_id", "hist", "title", "click", "conversion"] and len(truth) == len(data)
    assert max(len(h or []) for h in data["hist"].to_pylist()) <= 6
    click, conv = data["click"].to_numpy(), data["conversion"].to_numpy()
    assert (conv <= click).all() and 0 < click.mean() < 1
    seen = np.array([c in (h or []) for c, h in zip(data["item_id"].to_pylist(), data["hist"].to_pylist())])
    p = truth["click"].to_numpy()
    assert p[seen].mean() > p[~seen].mean() + 0.2  # the candidate in the history: much likelier clicked


# ---- din: the paper's formula, computed directly ---------------------------------------------------------
def _din_direct(enc: DINEncoder, x: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
    """Zhou et al.'s activation unit as written: per row, per history item, an MLP over the concatenation
    ``[h, t, h - t, h * t]`` (first layer ``W = [W1 W2 W3 W4]``, recovered from the encoder's ``A = W1 + W3``,
    ``B = W2 - W3``, ``C = W4`` with a random ``W3``: any split gives the same function), padding left out."""
    out_rows = []
    for r in range(x.shape[0]):
        parts = []
        for j, f in enumerate(enc.features):
            ids = [int(i) for i in x[r, j, :enc.lengths[j]] if int(i) != f.cardinality]
            h = enc.tables[j].weight[ids] if ids else torch.zeros(0, enc.widths[j])
            if str(j) not in enc.attention:
                parts.append(h.mean(0) if ids else torch.zeros(enc.widths[j]))
                continue
            table = enc.tables[j] if f.options.get("shared") else enc.target_tables[str(j)]
            t = table.weight[int(cats[r, f.options["target"]])]
            att = enc.attention[str(j)]
            w3 = torch.randn_like(att.item.weight)
            w = torch.cat([att.item.weight - w3, att.target.weight + w3, w3, att.product.weight], dim=1)
            z = torch.cat([h, t.expand_as(h), h - t, h * t], dim=1)
            s = att.rest(z @ w.t() + att.item.bias).squeeze(-1)
            if enc.normalization == "softmax":
                s = s.softmax(0)
            parts.append((s.unsqueeze(1) * h).sum(0))
            if enc.include_target:
                parts.append(t)
        out_rows.append(torch.cat(parts))
    return torch.stack(out_rows)


@pytest.mark.parametrize("params", [{}, {"normalization": "softmax"},
                                    {"include_target": False, "attention_units": [8, 4]}])
def test_din_computes_the_papers_formula_and_its_gradients(params):
    torch.manual_seed(3)
    feats = [FeatureInfo("hist", "sequence", 30, {"max_length": 6, "target": 0, "target_cardinality": 30, "shared": True}),
             FeatureInfo("cats", "sequence", 7, {"max_length": 5, "target": 1, "target_cardinality": 9}),
             FeatureInfo("tags", "sequence", 5, {"max_length": 6})]
    enc = DINEncoder(feats, dim=6, **params)
    n = 40
    x = torch.stack([torch.randint(0, f.cardinality, (n, 6)) for f in feats], dim=1)
    lengths = torch.randint(0, 7, (n, len(feats)))
    lengths[0] = 0  # a row without items
    for j, f in enumerate(feats):
        x[:, j][torch.arange(6)[None, :] >= lengths[:, j:j + 1]] = f.cardinality
    x[:, 1, 5] = 7  # past cats' max_length: ignored
    cats = torch.stack([torch.randint(0, 30, (n,)), torch.randint(0, 9, (n,))], dim=1)
    weights = torch.randn(n, enc.output_dim)
    got = enc(x, {"categorical": cats})
    (got * weights).sum().backward()
    fast = {k: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for k, p in enc.named_parameters()}
    enc.zero_grad()
    want = _din_direct(enc, x, cats)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (want * weights).sum().backward()
    for k, p in enc.named_parameters():
        torch.testing.assert_close(fast[k], p.grad.to_dense() if p.grad.is_sparse else p.grad, atol=1e-5, rtol=1e-5,
                                   msg=k)


@pytest.mark.parametrize("channels,shape", [(1, (50, 7)), (7, (50, 7)), (3, (4, 3, 5))])
def test_layers_prelu_matches_torch_and_its_gradients(channels, shape):
    from recmtl.layers import PReLU
    torch.manual_seed(0)
    fast, ref = PReLU(channels), torch.nn.PReLU(channels)
    with torch.no_grad():
        fast.weight.uniform_(-0.5, 0.5)
        ref.weight.copy_(fast.weight)
    x = torch.randn(*shape)
    x.view(-1)[:5] = 0.0  # at the kink: the gradient of x <= 0, as torch's
    g = torch.randn(*shape)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fast(xa), ref(xb)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, atol=1e-5, rtol=1e-5)
    assert fast.state_dict().keys() == ref.state_dict().keys()


def test_din_distinct_ids_match_torch_unique():
    from recmtl_plugins.encoders.din import _distinct
    for size in (50, 10_000):  # the presence-mask path and the sort path
        ids = torch.randint(0, 50, (300,))
        distinct, where = _distinct(ids, size)
        want, want_where = torch.unique(ids, return_inverse=True)
        assert torch.equal(distinct, want) and torch.equal(where, want_where)


def test_din_encoder_graph_matches_torch(tmp_path):
    """The exported graph of the encoder alone (many items per row, so repeated row indices) computes what torch
    does; the model-level parity check of a briefly trained model is too coarse to see a wrong scatter."""
    from recmtl.export.graph import OPSET
    torch.manual_seed(5)
    feats = [FeatureInfo("hist", "sequence", 30, {"max_length": 12, "target": 0, "target_cardinality": 30,
                                                  "shared": True})]
    enc = DINEncoder(feats, dim=6, init_std=0.5).eval()

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = enc

        def forward(self, x: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
            return self.enc(x, {"categorical": cats})

    x = torch.randint(0, 30, (64, 1, 12))
    x[:, 0, 9:] = 30  # padding
    cats = torch.randint(0, 30, (64, 1))
    path = tmp_path / "din.onnx"
    torch.onnx.export(Wrap(), (x, cats), str(path), input_names=["x", "cats"], output_names=["out"],
                      dynamic_axes={"x": {0: "b"}, "cats": {0: "b"}, "out": {0: "b"}}, opset_version=OPSET,
                      dynamo=False)
    got = ort.InferenceSession(str(path)).run(None, {"x": x.numpy(), "cats": cats.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, Wrap()(x, cats).numpy(), atol=1e-5, rtol=1e-5)


# ---- one table per vocabulary ----------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", [{"name": "din", "dim": 4}, {"name": "sequence_pool", "dim": 4},
                                     {"name": "transformer", "dim": 4, "num_heads": 2, "dropout": 0.0}])
def test_a_shared_categorical_is_one_table_in_training_and_in_the_graph(cli, interests_dir, tmp_path, encoder):
    import recmtl.training.model as model_module
    from recmtl.training.evaluate import load_run
    cfg = _config(tmp_path / "c.yaml", interests_dir, encoder, text=False)
    assert cli("train", cfg, "--out", tmp_path / "run").code == 0
    run = load_run(tmp_path / "run", checkpoint="best")
    model, card = run.model, run.schema.categorical[0].cardinality
    cat_table = model.encoders["categorical"].tables[0]
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings >= card]
    assert tables == [cat_table]  # the sequence encoder keeps no item table of its own
    seq = model.encoders["sequence"]
    if encoder["name"] != "sequence_pool":
        assert seq.history_table(0).table is cat_table and seq.target_table(0).table is cat_table
    unshared = model_module.MultiTaskModel(run.config, run.schema, run.registry, share=False)
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert count(unshared) - count(model) == (card + 1) * 4  # without sharing: one (card + 1) x 4 table more
    # a checkpoint saved before tables were shared still loads, into the layout it was saved from
    legacy = model_module.model_for_state(run.config, run.schema, run.registry, unshared.state_dict())
    assert count(legacy) == count(unshared)

    # the gradient of both paths reaches the one table: the candidate's embedding and the history's items
    batch = run.schema.transform(pq.read_table(interests_dir / "valid.parquet").slice(0, 64))
    inputs = {k: torch.from_numpy(v) for k, v in batch.inputs.items()}
    model.train()
    for kind in ("categorical", "sequence"):
        model.zero_grad()
        model.call_encoder(kind, inputs)[:, :4].sum().backward()  # sequence: the interest/target output, not t
        grad = cat_table.weight.grad.to_dense()
        ids = inputs["categorical"][:, 0] if kind == "categorical" else inputs["sequence"][inputs["sequence"] != card]
        assert (grad[ids.unique()].abs().sum(1) > 0).all(), kind  # every candidate / every history item

    r = cli("export", tmp_path / "run", "-o", tmp_path / "m.onnx")  # the parity check runs inside
    assert r.code == 0 and "parity" in r.out, r
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    item_tables = [i.name for i in graph.initializer if len(i.dims) == 2 and i.dims[0] >= card and i.dims[1] == 4]
    assert len(item_tables) == 1, item_tables


def test_a_run_trained_before_tables_were_shared_resumes_exports_and_evaluates(cli, interests_dir, tmp_path,
                                                                                monkeypatch):
    import functools

    import recmtl.training.loop as loop
    import recmtl.training.model as model_module
    from recmtl.rundir import BEST, RunDir
    cfg, run = _config(tmp_path / "c.yaml", interests_dir, {"name": "din", "dim": 4}, text=False), tmp_path / "run"
    with monkeypatch.context() as m:  # the layout of runs trained before one table per vocabulary
        m.setattr(loop, "MultiTaskModel", functools.partial(model_module.MultiTaskModel, share=False))
        assert cli("train", cfg, "--out", run).code == 0
    assert "encoders.sequence.tables.0.weight" in torch.load(run / "last.pt", weights_only=True)["model"]
    r = cli("train", cfg, "--out", run, "--resume", "--set", "train.epochs=2")
    assert r.code == 0 and "trained before encoders shared one embedding table" in r.out + r.err, r
    assert cli("export", run, "-o", tmp_path / "m.onnx").code == 0  # with its parity check
    assert cli("evaluate", run, interests_dir / "valid.parquet").code == 0
    # a checkpoint of neither layout: one message naming the file and the run, and what to do
    files = RunDir(run)
    state = files.load_checkpoint(BEST)
    del state["model"]["encoders.sequence.tables.0.weight"], state["model"]["encoders.categorical.tables.0.weight"]
    files.save_checkpoint(BEST, state)
    r = cli("evaluate", run, interests_dir / "valid.parquet", "--checkpoint", "best")
    assert r.code != 0 and "best.pt of" in r.err and "retrain the run" in r.err and "Traceback" not in r.err, r


def test_a_third_party_encoder_shares_tables_through_the_contract():
    """An encoder outside recmtl_plugins, on the SDK only: the model hands it the embedding encoder's rows."""
    from recmtl import Encoder, TableRows
    from recmtl.training.model import share_tables
    from recmtl_plugins.encoders.embedding import EmbeddingEncoder

    class LastItem(Encoder):
        kind = "sequence"

        def __init__(self, features):
            super().__init__(features)
            self.own = torch.nn.Embedding(features[0].cardinality + 1, 3)
            self.rows: TableRows | None = None

        def share_tables(self, tables):
            self.rows = tables.get(self.features[0].options["vocabulary"])
            del self.own

        @property
        def output_dim(self):
            return 3

        def forward(self, x):
            return self.rows(x[:, 0, 0])

    cat = EmbeddingEncoder([FeatureInfo("u", "categorical", 4), FeatureInfo("item", "categorical", 6)], dim=3)
    seq = LastItem([FeatureInfo("h", "sequence", 6, {"max_length": 2, "vocabulary": "item"})])
    share_tables(torch.nn.ModuleDict({"categorical": cat, "sequence": seq}))
    assert seq.rows.table is cat.tables[0] and seq.rows.offset == 4 and seq.rows.size == 6
    torch.testing.assert_close(seq(torch.tensor([[[2, 6]]])), cat.tables[0].weight[[6]])
    assert sum(p.numel() for p in seq.parameters()) == 0


def test_a_missing_lowercasing_locale_is_one_clear_error(cli, tmp_path):
    """The text graph's StringNormalizer needs its locale installed where it is scored (C.UTF-8: built into glibc
    >= 2.35, so LC_ALL=POSIX does not reproduce it here): a locale this machine lacks stands in for it."""
    node = helper.make_node("StringNormalizer", ["title"], ["y"], case_change_action="LOWER", locale="xx_YY.UTF-8")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("title", TensorProto.STRING, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.STRING, [None])])
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    pq.write_table(pa.table({"title": ["Hello"]}), tmp_path / "d.parquet")
    r = cli("score", model, tmp_path / "d.parquet", "-o", tmp_path / "s.parquet")
    assert r.code == 2 and "Traceback" not in r.err, r
    assert "lowercased in the graph with the locale 'xx_YY.UTF-8', which this machine's C library does not have" in r.err
    assert "LOCPATH" in r.err and "not an ONNX model" not in r.err, r
    from recmtl.serving.app import create_app
    with pytest.raises(Exception, match="locale 'xx_YY.UTF-8'"):
        create_app(model)


@pytest.mark.parametrize("pooling", ["mean", "sum", "max"])
def test_sequence_pool_pools_the_shared_rows(pooling):
    from recmtl.training.model import share_tables
    from recmtl_plugins.encoders.embedding import EmbeddingEncoder
    from recmtl_plugins.encoders.sequence import SequencePoolEncoder
    torch.manual_seed(0)
    cat = EmbeddingEncoder([FeatureInfo("a", "categorical", 5), FeatureInfo("item", "categorical", 10)], dim=4)
    seq = SequencePoolEncoder([FeatureInfo("h", "sequence", 10, {"max_length": 4, "vocabulary": "item"}),
                               FeatureInfo("g", "sequence", 3, {"max_length": 4})], dim=4, pooling=pooling)
    share_tables(torch.nn.ModuleDict({"categorical": cat, "sequence": seq}))
    assert seq.tables[0].weight.shape == (4, 4)  # only g's 3 ids and its padding row are its own
    x = torch.tensor([[[1, 2, 10, 10], [0, 3, 3, 3]], [[10, 10, 10, 10], [2, 3, 3, 3]]])
    out = seq(x)
    h = cat.tables[0].weight[[5 + 1, 5 + 2]]  # item's ids 1 and 2: rows 6 and 7 of the fused table
    want = {"mean": h.mean(0), "sum": h.sum(0), "max": h.amax(0)}[pooling]
    torch.testing.assert_close(out[0, :4], want)
    assert (out[1, :4] == 0).all()  # no items: zeros
    torch.testing.assert_close(out[0, 4:], seq.tables[0].weight[0])  # g: its own table, id 0 then padding
