"""``recmtl export``: one self-contained ONNX file from a run directory.

Inputs are the raw feature columns (int64 or string for categorical, float32 for dense, dynamic batch);
vocabulary lookup (``ai.onnx.ml.LabelEncoder``) or hashing, null handling and standardisation run inside
the graph. An image feature is a float32 input ``[batch, C, H, W]`` with pixels scaled to [0, 1]: decoding
PNG/JPEG bytes stays outside the graph (``recmtl.data.images``, used by ``recmtl score`` and ``recmtl serve``).
A sequence feature is an int64 or string input ``[batch, max_length]``: a row's last items, the unused
positions holding the padding sentinel (``recmtl.serving.wire.PAD_INT`` = INT64_MIN + 1, ``PAD_STRING``), which
the in-graph lookup maps to the padding id; nulls inside a list are missing values as for categorical.
One output per task: ``[batch]`` (a probability for binary heads, pCTCVR for ESMM, a value for regression)
or ``[batch, K]`` (class probabilities of a multiclass head, attribute probabilities of a multilabel head,
their names in the metadata's ``classes``). The recmtl
schema, task names and versions are in ``metadata_props``. Export checks parity against PyTorch on
sample rows and writes nothing when it fails.
"""
from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import recmtl
from recmtl.data.parquet import ParquetSource
from recmtl.errors import RecmtlError
from recmtl.training.evaluate import LoadedRun, load_run
from recmtl.files import atomic_path
from recmtl.rundir import RunDir
from recmtl.training.model import MultiTaskModel, example_input
from recmtl.serving.score import Scorer
from recmtl.serving.wire import FORMAT, INT_NULL, METADATA_KEY, MISSING_VALUES, PAD_INT, PAD_STRING, ModelInput

OPSET = 17
ML_OPSET = 2
PARITY_TOLERANCE = 1e-4


class ExportError(RecmtlError):
    """Export failed (e.g. the ONNX model disagrees with PyTorch)."""


class _Core(nn.Module):
    """The model on preprocessed tensors, returning one score tensor per task."""

    def __init__(self, model: MultiTaskModel, kinds: list[str]) -> None:
        super().__init__()
        self.model = model
        self.kinds = kinds

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scores = self.model.predict(dict(zip(self.kinds, tensors)))
        return tuple(scores[t] for t in self.model.task_names)


def core_input(kind: str) -> str:
    """The graph tensor between preprocessing and the model for a feature kind (never a column name)."""
    return f"recmtl_{kind}_preprocessed"


def model_inputs(run: LoadedRun) -> list[ModelInput]:
    inputs = [ModelInput(c.name, "int64" if c.value_type == "int" else "string") for c in run.schema.categorical]
    inputs += [ModelInput(d.name, "float32") for d in run.schema.dense]
    inputs += [ModelInput(i.name, "float32", (i.channels, i.height, i.width), "image") for i in run.schema.image]
    return inputs + [ModelInput(s.name, "int64" if s.value_type == "int" else "string", (s.max_length,), "sequence")
                     for s in run.schema.sequence]


def _lookup_nodes(col: Any, raw: str, out: str, const: Any, padding: bool) -> tuple[list[onnx.NodeProto], bool]:
    """Nodes mapping raw values (any shape) to ids ``out`` as ``CategoricalColumn.ids`` does; with ``padding``
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


def _preprocessing(run: LoadedRun) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], list[onnx.ValueInfoProto], bool]:
    """Nodes that turn raw columns into the tensors ``categorical`` [B, F] int64 and ``dense`` [B, D]."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    inputs: list[onnx.ValueInfoProto] = []
    uses_ms = False

    def const(name: str, value: np.ndarray) -> str:
        if name not in {i.name for i in inits}:
            inits.append(numpy_helper.from_array(value, name))
        return name

    def axes() -> str:
        return const("pre_axes_1", np.array([1], dtype=np.int64))

    def stack(columns: list[str], out: str) -> list[onnx.NodeProto]:
        """1-D columns [B] each -> ``out`` [F, B]: one Concat and a Reshape (cheaper than F Unsqueezes)."""
        shape = const(f"{out}_shape", np.array([len(columns), -1], dtype=np.int64))
        return [helper.make_node("Concat", columns, [f"{out}_flat"], axis=0),
                helper.make_node("Reshape", [f"{out}_flat", shape], [out])]

    def transpose(x: str, out: str) -> onnx.NodeProto:
        return helper.make_node("Transpose", [x], [out], perm=[1, 0])

    cat_cols = []
    for j, col in enumerate(run.schema.categorical):
        raw, out = col.name, f"pre_cat_{j}"
        elem = TensorProto.INT64 if col.value_type == "int" else TensorProto.STRING
        inputs.append(helper.make_tensor_value_info(raw, elem, ["batch"]))
        lookup, ms = _lookup_nodes(col, raw, out, const, padding=False)
        nodes += lookup
        uses_ms |= ms
        cat_cols.append(out)
    if cat_cols:
        nodes += [*stack(cat_cols, "pre_cat_by_column"), transpose("pre_cat_by_column", core_input("categorical"))]
    dense_cols = []
    for d in run.schema.dense:
        inputs.append(helper.make_tensor_value_info(d.name, TensorProto.FLOAT, ["batch"]))
        dense_cols.append(d.name)
    if dense_cols:  # filled and standardised column by column ([D, B]: long runs per constant), then transposed
        def per_column(name: str, values: list[float]) -> str:
            return const(name, np.array(values, dtype=np.float32).reshape(-1, 1))
        fill = per_column("pre_fill", [d.fill for d in run.schema.dense])
        mean = per_column("pre_mean", [d.mean for d in run.schema.dense])
        std = per_column("pre_std", [d.std for d in run.schema.dense])
        nodes += stack(dense_cols, "pre_dense_raw")
        nodes.append(helper.make_node("IsNaN", ["pre_dense_raw"], ["pre_dense_nan"]))
        nodes.append(helper.make_node("IsInf", ["pre_dense_raw"], ["pre_dense_inf"]))
        nodes.append(helper.make_node("Or", ["pre_dense_nan", "pre_dense_inf"], ["pre_dense_missing"]))
        nodes.append(helper.make_node("Where", ["pre_dense_missing", fill, "pre_dense_raw"], ["pre_dense_filled"]))
        nodes.append(helper.make_node("Sub", ["pre_dense_filled", mean], ["pre_dense_centred"]))
        nodes.append(helper.make_node("Div", ["pre_dense_centred", std], ["pre_dense_by_column"]))
        nodes.append(transpose("pre_dense_by_column", core_input("dense")))
    image_cols = []
    for j, img in enumerate(run.schema.image):  # [batch, C, H, W] each -> "image" [batch, F, C, H, W]
        inputs.append(helper.make_tensor_value_info(img.name, TensorProto.FLOAT, ["batch", img.channels, img.height, img.width]))
        nodes.append(helper.make_node("Unsqueeze", [img.name, axes()], [f"pre_image_{j}"]))
        image_cols.append(f"pre_image_{j}")
    if image_cols:
        nodes.append(helper.make_node("Concat", image_cols, [core_input("image")], axis=1) if len(image_cols) > 1
                     else helper.make_node("Identity", image_cols, [core_input("image")]))
    seq_cols = []
    width = run.schema.sequence_width
    for j, col in enumerate(run.schema.sequence):  # [batch, L_j] raw -> ids, padded to "sequence" [batch, F, width]
        raw, out = col.name, f"pre_seq_{j}"
        elem = TensorProto.INT64 if col.value_type == "int" else TensorProto.STRING
        inputs.append(helper.make_tensor_value_info(raw, elem, ["batch", col.max_length]))
        lookup, ms = _lookup_nodes(col, raw, f"{out}_ids", const, padding=True)
        nodes += lookup
        uses_ms |= ms
        ids = f"{out}_ids"
        if col.max_length < width:
            pads = const(f"{out}_pads", np.array([0, 0, 0, width - col.max_length], dtype=np.int64))
            pad_id = const(f"{out}_pad_value", np.array(col.cardinality, dtype=np.int64))
            nodes.append(helper.make_node("Pad", [ids, pads, pad_id], [f"{out}_wide"], mode="constant"))
            ids = f"{out}_wide"
        nodes.append(helper.make_node("Unsqueeze", [ids, axes()], [out]))
        seq_cols.append(out)
    if seq_cols:
        nodes.append(helper.make_node("Concat", seq_cols, [core_input("sequence")], axis=1) if len(seq_cols) > 1
                     else helper.make_node("Identity", seq_cols, [core_input("sequence")]))
    return nodes, inits, inputs, uses_ms


def build_onnx(run: LoadedRun) -> onnx.ModelProto:
    """Export the torch model on preprocessed tensors, then put the preprocessing graph in front."""
    model = run.model.eval()
    kinds = list(model.encoders.keys())
    example = [example_input(kind, model.encoders[kind].features, 4) for kind in kinds]
    tasks = model.task_names
    with tempfile.TemporaryDirectory() as tmp:
        core_path = Path(tmp) / "core.onnx"
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated but exact for these graphs
            warnings.simplefilter("ignore", DeprecationWarning)
            names = [core_input(k) for k in kinds]
            torch.onnx.export(_Core(model, kinds).eval(), tuple(example), str(core_path), input_names=names, output_names=tasks,
                              dynamic_axes={**{k: {0: "batch"} for k in names}, **{t: {0: "batch"} for t in tasks}},
                              opset_version=OPSET, dynamo=False)
        core = onnx.load(str(core_path))
    nodes, inits, raw_inputs, uses_ms = _preprocessing(run)
    graph = core.graph
    kept_inputs = [i for i in graph.input if i.name not in {core_input(k) for k in kinds}]
    del graph.input[:]
    graph.input.extend(raw_inputs + kept_inputs)
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old_nodes)
    graph.initializer.extend(inits)
    graph.name = "recmtl"
    core.opset_import.append(helper.make_opsetid("ai.onnx.ml", ML_OPSET))
    if uses_ms:
        core.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    core.producer_name = "recmtl"
    core.producer_version = recmtl.__version__
    onnx.checker.check_model(core)
    return core


def _metadata(run: LoadedRun, inputs: list[ModelInput]) -> dict[str, str]:
    metrics = RunDir(run.run_dir).read_metrics(required=False)
    def task_entry(t: Any) -> dict[str, Any]:
        head = run.model.heads[t.name]
        entry = {"name": t.name, "label": t.label, "head": t.head,
                 "score": "probability" if t.head in ("binary", "esmm") else "value"}
        if head.label_type in ("class", "multi"):
            entry["score"] = "class probabilities" if head.label_type == "class" else "attribute probabilities"
            entry["width"] = len(head.task.classes)  # the model's dry run checked predict's width against it
            entry["classes"] = [c if isinstance(c, (int, str)) else str(c) for c in head.task.classes]
        return entry

    schema = {
        "format": FORMAT,
        "inputs": [i.to_metadata() for i in inputs],
        "missing_values": MISSING_VALUES,
        "tasks": [task_entry(t) for t in run.config.tasks],
    }
    return {
        METADATA_KEY: json.dumps(schema),
        "recmtl.version": recmtl.__version__,
        "torch.version": torch.__version__,
        "onnx.opset": str(OPSET),
        "recmtl.metrics": json.dumps({k: metrics.get(k) for k in ("monitor", "best_epoch", "validation", "test") if k in metrics}),
        "recmtl.created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def parity(run: LoadedRun, model_path: Path, sample: pa.Table) -> dict[str, float]:
    """Max abs difference per task between onnxruntime and PyTorch on ``sample`` rows."""
    scorer = Scorer(model_path)
    onnx_scores = scorer.score(sample)
    arrays = run.schema.transform(sample, labels=False)
    with torch.no_grad():
        torch_scores = run.model.predict({k: torch.from_numpy(v) for k, v in arrays.inputs.items()})
    def flat(col: pa.Array) -> np.ndarray:
        return (col.flatten() if pa.types.is_fixed_size_list(col.type) else col).to_numpy()
    return {t: float(np.max(np.abs(flat(onnx_scores.column(t)) - torch_scores[t].numpy().reshape(-1))))
            for t in run.model.task_names}


def export_run(run_dir: str | Path, output: str | Path, sample_data: str | None = None, sample_rows: int = 4096,
               plugins: list[str] = (), disabled: list[str] = ()) -> dict[str, float]:
    """Write ``output`` atomically; returns the per-task max abs difference to PyTorch."""
    run = load_run(run_dir, list(plugins), list(disabled))
    inputs = model_inputs(run)
    model = build_onnx(run)
    for key, value in _metadata(run, inputs).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    spec = sample_data or run.config.resolve(run.config.data.validation or run.config.data.train)
    source = ParquetSource(spec, run.schema.feature_columns)
    batches, rows = [], 0
    for batch in source.batches(read_rows=min(sample_rows, 65_536)):
        batches.append(batch)
        rows += batch.num_rows
        if rows >= sample_rows:
            break
    sample = pa.Table.from_batches(batches).slice(0, sample_rows)
    with atomic_path(output) as tmp:
        onnx.save_model(model, str(tmp))
        diffs = parity(run, tmp, sample)
        bad = {t: d for t, d in diffs.items() if not d <= PARITY_TOLERANCE}
        if bad:
            raise ExportError(f"ONNX scores differ from PyTorch by more than {PARITY_TOLERANCE:g} on {len(sample)} "
                              f"rows of {spec}: {bad}; no file written")
    return diffs
