"""The exported ONNX graph: the torch model on preprocessed tensors (``torch.onnx.export``), with the preprocessing
in front of it, one function per column kind, each the in-graph twin of its numpy transform in
``recmtl.schema.columns`` (``categorical_ids``, ``dense_values`` with a dense column's fill, clip, ``log1p`` and
standardisation, ``image_values``, ``sequence_ids``, ``text_ids``; ``ids_nodes`` for the vocabulary lookup or hashing they
share). The raw inputs are in the wire format of ``recmtl.serving.wire``.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import recmtl
from recmtl.calibration import EPS, FUSED_OUTPUT, AttributeCalibrators, Fusion, ScoreMap, TaskCalibrator
from recmtl.schema import CategoricalColumn, DenseColumn, FittedSchema, ImageColumn, SequenceColumn, TextColumn
from recmtl.schema.columns import BIGRAM_MULTIPLIER, TEXT_SEPARATOR
from recmtl.serving.wire import INT_NULL, PAD_INT, PAD_STRING
from recmtl.training.evaluate import LoadedRun
from recmtl.training.model import MultiTaskModel, example_input

OPSET = 17
ML_OPSET = 2


class _Core(nn.Module):
    """The model on preprocessed tensors, returning one score tensor per task; for the tasks in ``raw`` the head's
    raw output (a logit, which the score map behind the core acts on) instead."""

    def __init__(self, model: MultiTaskModel, kinds: list[str], raw: set[str] = frozenset()) -> None:
        super().__init__()
        self.model = model
        self.kinds = kinds
        self.raw = set(raw)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs, scores = self.model.run(dict(zip(self.kinds, tensors)))
        return tuple(outputs[t] if t in self.raw else scores[t] for t in self.model.task_names)


def core_input(kind: str) -> str:
    """The graph tensor between preprocessing and the model for a feature kind (never a column name)."""
    return f"recmtl_{kind}_preprocessed"


def ids_nodes(col: Any, raw: str, out: str, const: Any, padding: bool) -> tuple[list[onnx.NodeProto], bool]:
    """Twin of ``CategoricalColumn.ids`` / ``SequenceColumn.sequence_ids``: nodes mapping raw values (any shape) to ids
    ``out``; with ``padding``
    (a sequence feature) the padding sentinel maps to the padding id ``col.cardinality``. Returns the nodes
    and whether they use the com.microsoft domain."""
    nodes: list[onnx.NodeProto] = []
    uses_ms = False
    is_int = col.value_type == "int"
    if col.hash_buckets:
        buckets = const(f"{out}_buckets", np.array(col.hash_buckets, dtype=np.int64))
        if is_int:
            hashed = raw
        else:  # the same MurmurHash3 (seed 0, unsigned) as training
            uses_ms = True
            nodes.append(helper.make_node("MurmurHash3", [raw], [f"{out}_h32"], domain="com.microsoft", seed=0, positive=1))
            nodes.append(helper.make_node("Cast", [f"{out}_h32"], [f"{out}_h64"], to=TensorProto.INT64))
            hashed = f"{out}_h64"
        nodes.append(helper.make_node("Mod", [hashed, buckets], [f"{out}_mod"], fmod=0))
        nodes.append(helper.make_node("Add", [f"{out}_mod", const("pre_one", np.array(1, dtype=np.int64))], [f"{out}_id"]))
        if is_int:
            nodes.append(helper.make_node("Equal", [raw, const("pre_int_null", np.array(INT_NULL, dtype=np.int64))],
                                          [f"{out}_missing"]))
        else:  # string Equal needs opset 19: mark "" with a one-key LabelEncoder instead
            nodes.append(helper.make_node("LabelEncoder", [raw], [f"{out}_is_empty"], domain="ai.onnx.ml",
                                          keys_strings=[""], values_int64s=[1], default_int64=0))
            nodes.append(helper.make_node("Cast", [f"{out}_is_empty"], [f"{out}_missing"], to=TensorProto.BOOL))
        zero = const("pre_zero", np.array(0, dtype=np.int64))
        if not padding:
            nodes.append(helper.make_node("Where", [f"{out}_missing", zero, f"{out}_id"], [out]))
            return nodes, uses_ms
        nodes.append(helper.make_node("Where", [f"{out}_missing", zero, f"{out}_id"], [f"{out}_nopad"]))
        if is_int:
            nodes.append(helper.make_node("Equal", [raw, const("pre_int_pad", np.array(PAD_INT, dtype=np.int64))],
                                          [f"{out}_is_pad"]))
        else:
            nodes.append(helper.make_node("LabelEncoder", [raw], [f"{out}_pad01"], domain="ai.onnx.ml",
                                          keys_strings=[PAD_STRING], values_int64s=[1], default_int64=0))
            nodes.append(helper.make_node("Cast", [f"{out}_pad01"], [f"{out}_is_pad"], to=TensorProto.BOOL))
        pad_id = const(f"{out}_pad_id", np.array(col.cardinality, dtype=np.int64))
        nodes.append(helper.make_node("Where", [f"{out}_is_pad", pad_id, f"{out}_nopad"], [out]))
        return nodes, uses_ms
    # vocabulary lookup; unseen, rare and missing values get the default id 0
    vocab = [int(v) for v in col.vocab] if is_int else [str(v) for v in col.vocab]
    ids = list(range(1, len(vocab) + 1))
    if padding:
        vocab.append(PAD_INT if is_int else PAD_STRING)
        ids.append(col.cardinality)
    if not vocab:
        vocab, ids = [INT_NULL if is_int else ""], [0]
    keys = {"keys_int64s": vocab} if is_int else {"keys_strings": vocab}
    nodes.append(helper.make_node("LabelEncoder", [raw], [out], domain="ai.onnx.ml",
                                  values_int64s=ids, default_int64=0, **keys))
    return nodes, uses_ms


class _Graph:
    """The preprocessing part of the graph being built: nodes, constants (initializers) and raw inputs."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.uses_ms = False  # nodes of the com.microsoft domain (MurmurHash3)
        self._names: set[str] = set()

    def const(self, name: str, value: np.ndarray) -> str:
        if name not in self._names:
            self._names.add(name)
            self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, **attrs))

    def stack(self, columns: list[str], out: str) -> None:
        """1-D columns [B] each -> ``out`` [F, B]: one Concat and a Reshape (cheaper than F Unsqueezes)."""
        shape = self.const(f"{out}_shape", np.array([len(columns), -1], dtype=np.int64))
        self.node("Concat", columns, [f"{out}_flat"], axis=0)
        self.node("Reshape", [f"{out}_flat", shape], [out])

    def concat_features(self, columns: list[str], out: str) -> None:
        """Per-feature tensors with a feature axis 1 -> ``out`` (Identity for one feature)."""
        if len(columns) > 1:
            self.node("Concat", columns, [out], axis=1)
        else:
            self.node("Identity", columns, [out])

    def lookup(self, col: Any, raw: str, out: str, padding: bool) -> None:
        nodes, uses_ms = ids_nodes(col, raw, out, self.const, padding)
        self.nodes += nodes
        self.uses_ms |= uses_ms


def shared_ids(g: _Graph, schema: FittedSchema) -> set[str]:
    """Sequence features sharing a categorical feature's vocabulary (``vocabulary: ITEM``): ONE lookup for the
    categorical input and the lists (their values flattened and concatenated), split back into ``pre_cat_{j}``
    (the padding sentinel, never a categorical value, maps to 0 there) and ``pre_seq_{k}_ids``. Returns the
    categorical columns done here."""
    done = set()
    for j, cat in enumerate(schema.categorical):
        seqs = [(k, s) for k, s in enumerate(schema.sequence) if s.vocabulary == cat.name]
        if not seqs:
            continue
        p = f"pre_shared_{j}"
        flat = g.const("pre_flat", np.array([-1], dtype=np.int64))
        parts = [cat.name]
        for k, s in seqs:
            g.node("Reshape", [s.name, flat], [f"{p}_seq_{k}_flat"])
            parts.append(f"{p}_seq_{k}_flat")
        g.node("Concat", parts, [f"{p}_raw"], axis=0)
        g.lookup(seqs[0][1], f"{p}_raw", f"{p}_ids", padding=True)
        g.node("Shape", [cat.name], [f"{p}_batch"])
        start = f"{p}_batch"
        g.node("Slice", [f"{p}_ids", g.const("pre_s0", np.array([0], dtype=np.int64)), start], [f"{p}_cat_ids"])
        pad = g.const(f"{p}_pad_id", np.array(cat.cardinality, dtype=np.int64))
        g.node("Equal", [f"{p}_cat_ids", pad], [f"{p}_cat_is_pad"])
        g.node("Where", [f"{p}_cat_is_pad", g.const("pre_zero", np.array(0, dtype=np.int64)), f"{p}_cat_ids"],
               [f"pre_cat_{j}"])
        for k, s in seqs:
            g.node("Mul", [f"{p}_batch", g.const(f"pre_seq_{k}_len", np.array([s.max_length], dtype=np.int64))],
                   [f"{p}_seq_{k}_n"])
            g.node("Add", [start, f"{p}_seq_{k}_n"], [f"{p}_seq_{k}_end"])
            g.node("Slice", [f"{p}_ids", start, f"{p}_seq_{k}_end"], [f"{p}_seq_{k}_slice"])
            shape = g.const(f"pre_seq_{k}_shape", np.array([-1, s.max_length], dtype=np.int64))
            g.node("Reshape", [f"{p}_seq_{k}_slice", shape], [f"pre_seq_{k}_ids"])
            start = f"{p}_seq_{k}_end"
        done.add(cat.name)
    return done


def categorical_ids(g: _Graph, columns: list[CategoricalColumn], shared: set[str] = frozenset()) -> None:
    """Twin of ``CategoricalColumn.ids`` for every categorical column: raw ``[batch]`` inputs -> ids ``[batch, F]``
    (the columns in ``shared`` were looked up by ``shared_ids``)."""
    outs = []
    for j, col in enumerate(columns):
        raw, out = col.name, f"pre_cat_{j}"
        elem = TensorProto.INT64 if col.value_type == "int" else TensorProto.STRING
        g.inputs.append(helper.make_tensor_value_info(raw, elem, ["batch"]))
        if col.name not in shared:
            g.lookup(col, raw, out, padding=False)
        outs.append(out)
    g.stack(outs, "pre_cat_by_column")
    g.node("Transpose", ["pre_cat_by_column"], [core_input("categorical")], perm=[1, 0])


def dense_values(g: _Graph, columns: list[DenseColumn]) -> None:
    """Twin of ``DenseColumn.values``: raw float ``[batch]`` inputs clipped and transformed where a column says so
    (``log1p``: sign(x) * log(1 + |x|)), filled where NaN/inf and standardised, column by column as ``[D, batch]``
    (long runs per constant), then transposed to ``[batch, D]``. Columns without a clip or transform take the
    same nodes as before these existed when none has one."""
    for d in columns:
        g.inputs.append(helper.make_tensor_value_info(d.name, TensorProto.FLOAT, ["batch"]))

    def per_column(name: str, values: list[float]) -> str:
        return g.const(name, np.array(values, dtype=np.float32).reshape(-1, 1))
    fill = per_column("pre_fill", [d.fill for d in columns])
    mean = per_column("pre_mean", [d.mean for d in columns])
    std = per_column("pre_std", [d.std for d in columns])
    g.stack([d.name for d in columns], "pre_dense_raw")
    g.node("IsNaN", ["pre_dense_raw"], ["pre_dense_nan"])
    g.node("IsInf", ["pre_dense_raw"], ["pre_dense_inf"])
    g.node("Or", ["pre_dense_nan", "pre_dense_inf"], ["pre_dense_missing"])
    values = "pre_dense_raw"
    if any(d.clip_low is not None for d in columns):
        low = per_column("pre_clip_low", [-np.inf if d.clip_low is None else d.clip_low for d in columns])
        g.node("Max", [values, low], ["pre_dense_above_low"])
        values = "pre_dense_above_low"
    if any(d.clip_high is not None for d in columns):
        high = per_column("pre_clip_high", [np.inf if d.clip_high is None else d.clip_high for d in columns])
        g.node("Min", [values, high], ["pre_dense_clipped"])
        values = "pre_dense_clipped"
    if any(d.transform == "log1p" for d in columns):
        g.node("Abs", [values], ["pre_dense_abs"])
        g.node("Add", ["pre_dense_abs", g.const("pre_dense_one", np.array(1, dtype=np.float32))], ["pre_dense_abs1"])
        g.node("Log", ["pre_dense_abs1"], ["pre_dense_log_abs"])
        g.node("Sign", [values], ["pre_dense_sign"])
        g.node("Mul", ["pre_dense_sign", "pre_dense_log_abs"], ["pre_dense_log1p"])
        if all(d.transform == "log1p" for d in columns):
            values = "pre_dense_log1p"
        else:
            is_log = g.const("pre_dense_is_log1p", np.array([[d.transform == "log1p"] for d in columns]))
            g.node("Where", [is_log, "pre_dense_log1p", values], ["pre_dense_transformed"])
            values = "pre_dense_transformed"
    g.node("Where", ["pre_dense_missing", fill, values], ["pre_dense_filled"])
    g.node("Sub", ["pre_dense_filled", mean], ["pre_dense_centred"])
    g.node("Div", ["pre_dense_centred", std], ["pre_dense_by_column"])
    g.node("Transpose", ["pre_dense_by_column"], [core_input("dense")], perm=[1, 0])


def image_values(g: _Graph, columns: list[ImageColumn]) -> None:
    """Twin of ``ImageColumn.values`` after decoding (which stays outside the graph, ``recmtl.data.images``):
    float ``[batch, C, H, W]`` inputs in [0, 1] -> ``[batch, F, C, H, W]``."""
    outs = []
    for j, img in enumerate(columns):
        g.inputs.append(helper.make_tensor_value_info(img.name, TensorProto.FLOAT, ["batch", img.channels, img.height, img.width]))
        g.node("Unsqueeze", [img.name, g.const("pre_axes_1", np.array([1], dtype=np.int64))], [f"pre_image_{j}"])
        outs.append(f"pre_image_{j}")
    g.concat_features(outs, core_input("image"))


def sequence_ids(g: _Graph, columns: list[SequenceColumn], width: int) -> None:
    """Twin of ``SequenceColumn.sequence_ids``: padded raw ``[batch, L_j]`` inputs -> ids, padded to
    ``[batch, F, width]``."""
    outs = []
    for j, col in enumerate(columns):
        raw, out = col.name, f"pre_seq_{j}"
        elem = TensorProto.INT64 if col.value_type == "int" else TensorProto.STRING
        g.inputs.append(helper.make_tensor_value_info(raw, elem, ["batch", col.max_length]))
        ids = f"{out}_ids"
        if not col.vocabulary:  # else shared_ids looked it up with its categorical feature
            g.lookup(col, raw, ids, padding=True)
        if col.max_length < width:
            pads = g.const(f"{out}_pads", np.array([0, 0, 0, width - col.max_length], dtype=np.int64))
            pad_id = g.const(f"{out}_pad_value", np.array(col.cardinality, dtype=np.int64))
            g.node("Pad", [ids, pads, pad_id], [f"{out}_wide"], mode="constant")
            ids = f"{out}_wide"
        g.node("Unsqueeze", [ids, g.const("pre_axes_1", np.array([1], dtype=np.int64))], [out])
        outs.append(out)
    g.concat_features(outs, core_input("sequence"))


def text_ids(g: _Graph, columns: list[TextColumn], width: int) -> None:
    """Twin of ``TextColumn.token_ids``: raw strings ``[batch]`` -> hashed n-gram ids ``[batch, F, width]``.
    ``StringNormalizer`` lowercases (locale C.UTF-8), the ``com.microsoft`` ``Tokenizer`` splits on the same RE2
    separator as training (pyarrow's ``split_pattern_regex``), ``MurmurHash3`` hashes each word; bigrams combine
    two words' hashes arithmetically; output column ``k`` of a row with ``c`` words is unigram ``k`` (k < c),
    else bigram ``k - c`` (k - c < c - 1), else padding."""
    g.uses_ms = True
    i64 = TensorProto.INT64
    one = g.const("pre_one", np.array(1, dtype=np.int64))
    outs = []
    for j, col in enumerate(columns):
        raw, p = col.name, f"pre_text_{j}"
        k = col.max_tokens
        g.inputs.append(helper.make_tensor_value_info(raw, TensorProto.STRING, ["batch"]))
        g.node("StringNormalizer", [raw], [f"{p}_lower"], case_change_action="LOWER", locale="C.UTF-8")
        g.node("Tokenizer", [f"{p}_lower"], [f"{p}_words0"], domain="com.microsoft", mark=0, mincharnum=1,
               pad_value=PAD_STRING, separators=[TEXT_SEPARATOR])
        g.node("Shape", [raw], [f"{p}_batch"])
        # two columns of padding after the words: index W (a padding word) and bigram W - 1 exist even when no row
        # of the batch has a word (the Tokenizer's output then has no column)
        g.node("Concat", [f"{p}_batch", g.const("pre_two_1d", np.array([2], dtype=np.int64))],
               [f"{p}_padshape"], axis=0)
        g.node("Expand", [g.const("pre_pad_string", np.array([PAD_STRING], dtype=object)), f"{p}_padshape"],
               [f"{p}_padcol"])
        g.node("Concat", [f"{p}_words0", f"{p}_padcol"], [f"{p}_words"], axis=1)  # [B, W + 2]
        g.node("MurmurHash3", [f"{p}_words"], [f"{p}_h32"], domain="com.microsoft", seed=0, positive=1)
        g.node("Cast", [f"{p}_h32"], [f"{p}_h"], to=i64)
        g.node("LabelEncoder", [f"{p}_words"], [f"{p}_ispad"], domain="ai.onnx.ml", keys_strings=[PAD_STRING],
               values_int64s=[1], default_int64=0)
        g.node("Sub", [one, f"{p}_ispad"], [f"{p}_valid"])  # 1: a word
        g.node("ReduceSum", [f"{p}_valid", g.const("pre_ax1", np.array([1], dtype=np.int64))], [f"{p}_count"],
               keepdims=1)  # c [B, 1]
        buckets = g.const(f"{p}_buckets", np.array(col.hash_buckets, dtype=np.int64))
        g.node("Mod", [f"{p}_h", buckets], [f"{p}_hmod"], fmod=0)
        g.node("Add", [f"{p}_hmod", one], [f"{p}_uni"])  # [B, W + 2]
        pad_id = g.const(f"{p}_pad_id", np.array(col.padding_id, dtype=np.int64))
        g.node("Shape", [f"{p}_words"], [f"{p}_wshape"])
        g.node("Gather", [f"{p}_wshape", one], [f"{p}_w2"], axis=0)  # W + 2 (scalar)
        g.node("Sub", [f"{p}_w2", g.const("pre_two", np.array(2, dtype=np.int64))], [f"{p}_w"])
        cols = g.const(f"{p}_cols", np.arange(k, dtype=np.int64).reshape(1, k))
        g.node("Expand", [cols, g.const(f"{p}_bk", np.array([1, k], dtype=np.int64))], [f"{p}_k1"])
        g.node("Shape", [f"{p}_count"], [f"{p}_b1"])  # [B, 1]
        g.node("Mul", [f"{p}_b1", g.const(f"{p}_b_k", np.array([1, k], dtype=np.int64))], [f"{p}_bkshape"])
        g.node("Expand", [cols, f"{p}_bkshape"], [f"{p}_k"])  # [B, K]
        g.node("Min", [f"{p}_k", f"{p}_w"], [f"{p}_uni_at"])  # column W is padding
        g.node("GatherElements", [f"{p}_uni", f"{p}_uni_at"], [f"{p}_uni_k"], axis=1)
        g.node("Less", [f"{p}_k", f"{p}_count"], [f"{p}_is_uni"])
        if col.ngrams >= 2:
            g.node("Slice", [f"{p}_h", g.const("pre_s0", np.array([0], dtype=np.int64)),
                             g.const("pre_sm1", np.array([-1], dtype=np.int64)), g.const("pre_ax1", np.array([1], dtype=np.int64))],
                   [f"{p}_h_first"])
            g.node("Slice", [f"{p}_h", g.const("pre_s1", np.array([1], dtype=np.int64)),
                             g.const("pre_smax", np.array([np.iinfo(np.int64).max], dtype=np.int64)),
                             g.const("pre_ax1", np.array([1], dtype=np.int64))], [f"{p}_h_second"])
            g.node("Mul", [f"{p}_h_first", g.const("pre_bigram_mul", np.array(BIGRAM_MULTIPLIER, dtype=np.int64))],
                   [f"{p}_h_scaled"])
            g.node("Add", [f"{p}_h_scaled", f"{p}_h_second"], [f"{p}_h2"])
            g.node("Mod", [f"{p}_h2", buckets], [f"{p}_h2mod"], fmod=0)
            g.node("Add", [f"{p}_h2mod", one], [f"{p}_bi"])  # [B, W + 1]: bigram b at column b (b < c - 1)
            g.node("Sub", [f"{p}_k", f"{p}_count"], [f"{p}_bk_raw"])
            g.node("Max", [f"{p}_bk_raw", g.const("pre_zero", np.array(0, dtype=np.int64))], [f"{p}_bk_low"])
            g.node("Sub", [f"{p}_w", one], [f"{p}_wm1"])
            g.node("Max", [f"{p}_wm1", g.const("pre_zero", np.array(0, dtype=np.int64))], [f"{p}_wm1c"])
            g.node("Min", [f"{p}_bk_low", f"{p}_wm1c"], [f"{p}_bi_at"])
            g.node("GatherElements", [f"{p}_bi", f"{p}_bi_at"], [f"{p}_bi_k"], axis=1)
            g.node("Sub", [f"{p}_count", one], [f"{p}_nbi"])
            g.node("Less", [f"{p}_bk_raw", f"{p}_nbi"], [f"{p}_is_bi"])
            g.node("Where", [f"{p}_is_bi", f"{p}_bi_k", pad_id], [f"{p}_rest"])
        else:
            g.node("Expand", [pad_id, f"{p}_bkshape"], [f"{p}_rest"])
        g.node("Where", [f"{p}_is_uni", f"{p}_uni_k", f"{p}_rest"], [f"{p}_ids"])
        ids = f"{p}_ids"
        if k < width:
            pads = g.const(f"{p}_pads", np.array([0, 0, 0, width - k], dtype=np.int64))
            g.node("Pad", [ids, pads, pad_id], [f"{p}_wide"], mode="constant")
            ids = f"{p}_wide"
        g.node("Unsqueeze", [ids, g.const("pre_axes_1", np.array([1], dtype=np.int64))], [p])
        outs.append(p)
    g.concat_features(outs, core_input("text"))


def preprocessing(schema: FittedSchema) -> _Graph:
    """The nodes that turn raw columns into the model's inputs, one function per column kind."""
    g = _Graph()
    shared = shared_ids(g, schema)
    if schema.categorical:
        categorical_ids(g, schema.categorical, shared)
    if schema.dense:
        dense_values(g, schema.dense)
    if schema.image:
        image_values(g, schema.image)
    if schema.sequence:
        sequence_ids(g, schema.sequence, schema.sequence_width)
    if schema.text:
        text_ids(g, schema.text, schema.text_width)
    return g


def _logit(g: _Graph, p: str, out: str) -> str:
    """Twin of ``recmtl.calibration.logit``: ``log(p) - log(1 - p)`` of ``p`` clipped to [EPS, 1 - EPS]."""
    g.node("Clip", [p, g.const("post_eps", np.array(EPS, np.float32)), g.const("post_1_eps", np.array(1 - EPS, np.float32))],
           [f"{out}_clipped"])
    g.node("Log", [f"{out}_clipped"], [f"{out}_log_p"])
    g.node("Sub", [g.const("post_one", np.array(1, np.float32)), f"{out}_clipped"], [f"{out}_q"])
    g.node("Log", [f"{out}_q"], [f"{out}_log_q"])
    g.node("Sub", [f"{out}_log_p", f"{out}_log_q"], [out])
    return out


def _sigmoid(g: _Graph, z: str, out: str) -> None:
    """``1 / (1 + exp(-z))`` with ``Exp``: onnxruntime's float32 ``Sigmoid`` is an approximation (absolute error
    1.7e-7, relative error above 30 % below z = -15); ``Exp`` keeps the relative precision in the tails."""
    g.node("Neg", [z], [f"{out}_neg"])
    g.node("Exp", [f"{out}_neg"], [f"{out}_exp"])
    g.node("Add", [g.const("post_one", np.array(1, np.float32)), f"{out}_exp"], [f"{out}_den"])
    g.node("Reciprocal", [f"{out}_den"], [out])


def calibrator_nodes(g: _Graph, cal: TaskCalibrator, z: str, out: str) -> None:
    """Twin of ``TaskCalibrator.apply_logit`` on logits ``z`` ``[batch]``: ``platt`` and ``temperature`` as arithmetic on
    the logit and a sigmoid; ``isotonic`` as the piecewise-linear map through its knots (the segment found by counting
    the inner knots at or below the logit, then ``y_i + slope_i * (clip(z) - x_i)``)."""
    f32 = np.float32
    if cal.method in ("platt", "temperature"):
        a, b = (cal.params["a"], cal.params["b"]) if cal.method == "platt" else (1.0 / cal.params["temperature"], 0.0)
        g.node("Mul", [z, g.const(f"{out}_a", np.array(a, f32))], [f"{out}_az"])
        g.node("Add", [f"{out}_az", g.const(f"{out}_b", np.array(b, f32))], [f"{out}_azb"])
        _sigmoid(g, f"{out}_azb", out)
        return
    x, y = np.asarray(cal.params["x"], np.float64), np.asarray(cal.params["y"], np.float64)
    slope = np.diff(y) / np.diff(x)
    g.node("Clip", [z, g.const(f"{out}_x_first", np.array(x[0], f32)), g.const(f"{out}_x_last", np.array(x[-1], f32))],
           [f"{out}_clipped"])
    if len(x) > 2:
        g.node("Unsqueeze", [f"{out}_clipped", g.const("post_axes_1", np.array([1], np.int64))], [f"{out}_col"])
        g.node("GreaterOrEqual", [f"{out}_col", g.const(f"{out}_x_inner", x[1:-1].astype(f32))], [f"{out}_above"])
        g.node("Cast", [f"{out}_above"], [f"{out}_above_int"], to=TensorProto.INT64)
        g.node("ReduceSum", [f"{out}_above_int", g.const("post_axes_1", np.array([1], np.int64))], [f"{out}_segment"],
               keepdims=0)
        def at(name: str, values: np.ndarray) -> str:
            g.node("Gather", [g.const(f"{out}_{name}_table", values.astype(f32)), f"{out}_segment"], [f"{out}_{name}"], axis=0)
            return f"{out}_{name}"
        x_lo, y_lo, k = at("x_lo", x[:-1]), at("y_lo", y[:-1]), at("slope", slope)
    else:
        x_lo, y_lo, k = (g.const(f"{out}_{n}", np.array(v, f32)) for n, v in (("x_lo", x[0]), ("y_lo", y[0]), ("slope", slope[0])))
    g.node("Sub", [f"{out}_clipped", x_lo], [f"{out}_dx"])
    g.node("Mul", [f"{out}_dx", k], [f"{out}_dy"])
    g.node("Add", [y_lo, f"{out}_dy"], [out])


def postprocessing(smap: ScoreMap, raw: dict[str, str], final: dict[str, str]) -> _Graph:
    """Twin of ``ScoreMap.task`` for each task in ``raw`` (its core output: the logit for ``smap.logit_tasks``, else
    the probability, whose logit is taken first): the downsampling correction ``z + log(w)``, then its calibrator (per
    attribute for a multilabel task) or a sigmoid, into ``final[task]``."""
    import math
    g = _Graph()
    for j, (t, r) in enumerate(raw.items()):
        rate = smap.rates.get(t, 1.0)
        cal = smap.calibrators.get(t)
        z = r if t in smap.logit_tasks else _logit(g, r, f"post_{j}_logit")
        if rate != 1.0:
            g.node("Add", [z, g.const(f"post_{j}_log_rate", np.array(math.log(rate), np.float32))], [f"post_{j}_corrected"])
            z = f"post_{j}_corrected"
        if cal is None:
            _sigmoid(g, z, final[t])
        elif isinstance(cal, AttributeCalibrators):  # [batch, K]: one column per attribute, calibrated, concatenated
            cols = []
            for k, one in enumerate(cal.attributes.values()):
                g.node("Gather", [z, g.const(f"post_{j}_col{k}", np.array(k, np.int64))], [f"post_{j}_z{k}"], axis=1)
                calibrator_nodes(g, one, f"post_{j}_z{k}", f"post_{j}_p{k}")
                g.node("Unsqueeze", [f"post_{j}_p{k}", g.const("post_axes_1", np.array([1], np.int64))], [f"post_{j}_c{k}"])
                cols.append(f"post_{j}_c{k}")
            g.node("Concat", cols, [final[t]], axis=1)
        else:
            calibrator_nodes(g, cal, z, final[t])
    return g


def fusion_nodes(g: _Graph, fusion: Fusion, out: str) -> None:
    """Twin of ``Fusion.evaluate``: one node per operator of the parsed expression, into ``out`` ``[batch]``."""
    import ast
    ops = {ast.Add: "Add", ast.Sub: "Sub", ast.Mult: "Mul", ast.Div: "Div", ast.Pow: "Pow"}
    count = [0]

    def emit(node: ast.expr, name: str | None = None) -> str:
        count[0] += 1
        name = name or f"fuse_{count[0]}"
        if isinstance(node, ast.Constant):
            return g.const(f"fuse_c{count[0]}", np.array(float(node.value), np.float32))
        if isinstance(node, ast.Name):
            if name == out:
                g.node("Identity", [node.id], [out])
                return out
            return node.id
        if isinstance(node, ast.UnaryOp):
            g.node("Neg", [emit(node.operand)], [name])
            return name
        left, right = emit(node.left), emit(node.right)
        g.node(ops[type(node.op)], [left, right], [name])
        return name
    result = emit(fusion.tree, out)
    if result != out:  # a constant expression never gets here (it names no task)
        g.node("Identity", [result], [out])


def precise_sigmoids(graph: onnx.GraphProto) -> int:
    """Replace every ``Sigmoid`` node of ``graph`` by ``1 / (1 + exp(-x))`` (in place, same position; returns the
    count): onnxruntime's float32 ``Sigmoid`` is an approximation whose relative error passes 30 % below x = -15, which
    an esmm head's pCTCVR (a product of sigmoids) and its calibrator's logit would inherit; ``Exp`` is exact to float32
    rounding there, as PyTorch's ``sigmoid``."""
    nodes = list(graph.node)
    if not any(n.op_type == "Sigmoid" and n.domain in ("", "ai.onnx") for n in nodes):
        return 0
    graph.initializer.append(numpy_helper.from_array(np.array(1, np.float32), "recmtl_sigmoid_one"))
    out, count = [], 0
    for n in nodes:
        if n.op_type != "Sigmoid" or n.domain not in ("", "ai.onnx"):
            out.append(n)
            continue
        count += 1
        x, y, base = n.input[0], n.output[0], f"recmtl_sigmoid_{count}"
        out += [helper.make_node("Neg", [x], [f"{base}_neg"]), helper.make_node("Exp", [f"{base}_neg"], [f"{base}_exp"]),
                helper.make_node("Add", ["recmtl_sigmoid_one", f"{base}_exp"], [f"{base}_den"]),
                helper.make_node("Reciprocal", [f"{base}_den"], [y])]
    del graph.node[:]
    graph.node.extend(out)
    return count


def build_onnx(run: LoadedRun, fusion: Fusion | None = None) -> onnx.ModelProto:
    """Export the torch model on preprocessed tensors, then put the preprocessing graph in front and the score map
    (``run.scores``: downsampling corrections, calibrators) and the optional ``fusion`` output behind."""
    model = run.model.eval()
    kinds = list(model.encoders.keys())
    example = [example_input(kind, model.encoders[kind].features, 4) for kind in kinds]
    tasks = model.task_names
    with tempfile.TemporaryDirectory() as tmp:
        core_path = Path(tmp) / "core.onnx"
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated but exact for these graphs
            warnings.simplefilter("ignore", DeprecationWarning)
            names = [core_input(k) for k in kinds]
            logits = {t for t in run.scores.mapped if t in run.scores.logit_tasks}
            torch.onnx.export(_Core(model, kinds, logits).eval(), tuple(example), str(core_path), input_names=names,
                              output_names=tasks,
                              dynamic_axes={**{k: {0: "batch"} for k in names}, **{t: {0: "batch"} for t in tasks}},
                              opset_version=OPSET, dynamo=False)
        core = onnx.load(str(core_path))
    pre = preprocessing(run.schema)
    nodes, inits, raw_inputs, uses_ms = pre.nodes, pre.inits, pre.inputs, pre.uses_ms
    graph = core.graph
    precise_sigmoids(graph)
    kept_inputs = [i for i in graph.input if i.name not in {core_input(k) for k in kinds}]
    del graph.input[:]
    graph.input.extend(raw_inputs + kept_inputs)
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old_nodes)
    graph.initializer.extend(inits)
    mapped = [t for t in tasks if t in run.scores.mapped]
    if mapped:  # the core's output t becomes recmtl_t_raw; the score map's nodes compute t from it
        raw = {t: f"recmtl_{t}_raw" for t in mapped}
        for node in graph.node:
            for io in (node.input, node.output):
                for i, name in enumerate(io):
                    if name in raw:
                        io[i] = raw[name]
        post = postprocessing(run.scores, raw, {t: t for t in mapped})
        graph.node.extend(post.nodes)
        graph.initializer.extend(post.inits)
    if fusion is not None:
        fused = _Graph()
        fusion_nodes(fused, fusion, FUSED_OUTPUT)
        graph.node.extend(fused.nodes)
        graph.initializer.extend(fused.inits)
        graph.output.append(helper.make_tensor_value_info(FUSED_OUTPUT, TensorProto.FLOAT, ["batch"]))
    graph.name = "recmtl"
    core.opset_import.append(helper.make_opsetid("ai.onnx.ml", ML_OPSET))
    if uses_ms:
        core.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    core.producer_name = "recmtl"
    core.producer_version = recmtl.__version__
    onnx.checker.check_model(core)
    return core


