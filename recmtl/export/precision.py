"""Low-precision exports (``recmtl export --precision int8|int8-static|fp16``) and their quality check.

``int8``: the dense layers (``MatMul``, and ``Gemm`` rewritten as ``MatMul`` + ``Add``) are quantised dynamically
with onnxruntime's quantisation tools (``onnxruntime.quantization.quantize_dynamic``: int8 weights, per output
channel for matrices and per tensor for batched weights such as the MMoE experts'; activations quantised per
call, so no calibration set is needed and each batch gets its own activation range); the embedding tables
(``Gather`` on a 2-D float initializer) become int8 with one fp16 scale per row (symmetric,
``scale = max |row| / 127``), dequantised in the graph right after the lookup (``Gather`` -> ``Cast`` -> ``Mul`` by
the gathered row scales) or, for a table of at most ``DEQUANTIZE_AT_LOAD_BYTES`` as float32, before it (``Cast`` ->
``Mul`` of the whole table, which onnxruntime's constant folding does once at load: the file holds int8, memory the
float32 table, and a lookup costs what the fp32 model's does); a ``Transpose`` feeding a dynamic quantisation is
moved after it (it then moves uint8). ``int8-static``: the same embedding tables, and the network's wide dense layers
(``MatMul`` / ``Gemm`` with at least ``STATIC_MIN_WIDTH`` outputs: the experts and towers; the gates and the heads'
logit layers stay fp32) quantised statically (``onnxruntime.quantization.quantize_static``, QDQ format, uint8
activations, int8 weights per tensor, ``Gemm`` kept so onnxruntime fuses it into ``QGemm`` at load): each
activation's fixed range comes from a MinMax calibration on ``CALIBRATION_ROWS`` sample rows, fed as raw inputs
so the preprocessing runs as in serving; the preprocessing nodes are excluded and stay fp32/int64.
``fp16``: the network's weights and arithmetic in float16 (``onnxruntime.transformers.float16``), the
preprocessing nodes, inputs and outputs kept float32.

The parity check of an fp32 export becomes a quality check: on labelled sample rows (the validation data by
default) the low-precision scores are compared with the fp32 graph's (which passed parity against PyTorch):
per task the largest score difference and the difference of the task's metric (AUC for probability tasks,
else its head's first metric, e.g. RMSE); a task whose metric moves by more than ``QUALITY_BOUND``
(absolute for AUC, GAUC and accuracy; relative to the fp32 value otherwise) fails the export, no file written.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
from onnx import TensorProto, helper, numpy_helper

from recmtl.export.graph import core_input
from recmtl.serving.score import Scorer
from recmtl.training.evaluate import LoadedRun, Predictions

PRECISIONS = ("fp32", "fp16", "int8", "int8-static")
#: rows of the calibration data whose activation ranges fix the int8-static model's quantisation parameters
CALIBRATION_ROWS = 2048
#: int8-static quantises dense layers with at least this many outputs (narrower ones: gates, logits stay fp32)
STATIC_MIN_WIDTH = 16
#: the largest metric change a low-precision export may show against the fp32 graph on the sample rows
QUALITY_BOUND = 0.001
#: metrics bounded in [0, 1]: compared by absolute difference (others relative to the fp32 value)
ABSOLUTE_METRICS = ("auc", "gauc", "accuracy", "macro_f1")
#: embedding tables with fewer rows stay float (their scales would cost more than they save)
MIN_EMBEDDING_ROWS = 16
#: int8 embedding tables up to this size as float32 are dequantised whole when onnxruntime loads the model (larger
#: ones row by row after each lookup, so that memory holds them as int8)
DEQUANTIZE_AT_LOAD_BYTES = 64 << 20


def quantize_embeddings(model: onnx.ModelProto, at_load_bytes: int = DEQUANTIZE_AT_LOAD_BYTES) -> int:
    """Rewrite, in place, every ``Gather`` (axis 0) on a 2-D float32 initializer of at least
    ``MIN_EMBEDDING_ROWS`` rows into an int8 table with one fp16 scale per row, dequantised in the graph: the whole
    table before the lookups when its float32 form is at most ``at_load_bytes`` (folded by onnxruntime at load),
    else the looked-up rows after each. Returns the number of tables rewritten."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    gathers: dict[str, int] = {}  # tables only Gather reads are rewritten (not a weight another op also uses)
    for node in graph.node:
        for k, name in enumerate(node.input):
            uses[name] = uses.get(name, 0) + 1
            if node.op_type == "Gather" and k == 0:
                gathers[name] = gathers.get(name, 0) + 1
    done: dict[str, tuple[str, str]] = {}
    nodes: list[onnx.NodeProto] = []
    dequantized: set[str] = set()
    for node in graph.node:
        table = node.input[0] if node.op_type == "Gather" and node.input else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        init = inits.get(table) if table else None
        if (init is None or axis != 0 or init.data_type != TensorProto.FLOAT or len(init.dims) != 2
                or init.dims[0] < MIN_EMBEDDING_ROWS or uses[table] != gathers[table]):
            nodes.append(node)
            continue
        if table not in done:
            w = numpy_helper.to_array(init).astype(np.float32)
            scale = np.abs(w).max(axis=1, keepdims=True) / 127.0
            scale = np.where(scale > 0, scale, 1.0).astype(np.float16)
            q = np.clip(np.rint(w / scale.astype(np.float32)), -127, 127).astype(np.int8)
            graph.initializer.remove(init)
            graph.initializer.extend([numpy_helper.from_array(q, f"{table}_int8"),
                                      numpy_helper.from_array(scale, f"{table}_row_scale")])
            done[table] = (f"{table}_int8", f"{table}_row_scale")
        q_name, s_name = done[table]
        out, ids = node.output[0], node.input[1]
        if 4 * init.dims[0] * init.dims[1] <= at_load_bytes:  # one float32 table, made once at load
            whole = f"{table}_dequantized"
            if whole not in dequantized:
                dequantized.add(whole)
                nodes += [helper.make_node("Cast", [q_name], [f"{whole}_q"], name=f"{whole}_cast_q", to=TensorProto.FLOAT),
                          helper.make_node("Cast", [s_name], [f"{whole}_s"], name=f"{whole}_cast_s", to=TensorProto.FLOAT),
                          helper.make_node("Mul", [f"{whole}_q", f"{whole}_s"], [whole], name=f"{whole}_mul")]
            nodes.append(helper.make_node("Gather", [whole, ids], [out], name=f"{out}_deq_gather", axis=0))
            continue
        tag = f"{out}_deq"
        nodes += [helper.make_node("Gather", [q_name, ids], [f"{tag}_q"], name=f"{tag}_gather_q", axis=0),
                  helper.make_node("Cast", [f"{tag}_q"], [f"{tag}_f"], name=f"{tag}_cast_q", to=TensorProto.FLOAT),
                  helper.make_node("Gather", [s_name, ids], [f"{tag}_s16"], name=f"{tag}_gather_s", axis=0),
                  helper.make_node("Cast", [f"{tag}_s16"], [f"{tag}_s"], name=f"{tag}_cast_s", to=TensorProto.FLOAT),
                  helper.make_node("Mul", [f"{tag}_f", f"{tag}_s"], [out], name=f"{tag}_mul")]
    del graph.node[:]
    graph.node.extend(nodes)
    # value_info of the old Gather outputs stays valid (same shape and float type)
    return len(done)


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each ``Gemm`` with an initializer weight (``alpha`` 1, no ``transA``) as ``MatMul`` (+ ``Add``
    of ``beta * C``): onnxruntime's dynamic quantisation handles ``MatMul`` only. Returns the number rewritten."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        beta = attrs.get("beta", 1.0)
        if (weight is None or attrs.get("alpha", 1.0) != 1.0 or attrs.get("transA", 0)
                or (bias is not None and beta != 1.0 and bias not in inits)):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight)
        name = f"{node.input[1]}_for_matmul"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T if attrs.get("transB", 0) else w), name))
        product = f"{node.output[0]}_matmul" if bias is not None else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}_matmul"))
        if bias is not None:
            if beta != 1.0:
                scaled = (numpy_helper.to_array(inits[bias]) * beta).astype(np.float32)
                bias = f"{bias}_beta"
                graph.initializer.append(numpy_helper.from_array(scaled, bias))
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}_bias"))
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return count


def to_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """int8 dense layers (dynamic quantisation; weights per output channel where the weight is a matrix, per tensor
    for batched weights such as the MMoE experts' ``[E, in, out]``, whose per-channel zero points onnxruntime's
    kernel rejects) and int8 embedding tables (per-row scales)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    model = onnx.ModelProto.FromString(model.SerializeToString())
    gemm_to_matmul(model)
    dims = {i.name: len(i.dims) for i in model.graph.initializer}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"recmtl_node_{i}"
    dense = [n for n in model.graph.node if n.op_type == "MatMul"]
    matrix = [n.name for n in dense if dims.get(n.input[1]) == 2]
    batched = [n.name for n in dense if dims.get(n.input[1], 0) > 2]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fp32.onnx"
        onnx.save_model(model, str(path))
        logging.disable(logging.WARNING)  # its advice to run its pre-processing first (shape inference)
        try:
            for k, (names, per_channel) in enumerate(((matrix, True), (batched, False))):
                if names:
                    out = Path(tmp) / f"int8_{k}.onnx"
                    quantize_dynamic(path, out, op_types_to_quantize=["MatMul"], nodes_to_quantize=names,
                                     per_channel=per_channel, weight_type=QuantType.QInt8)
                    path = out
        finally:
            logging.disable(logging.NOTSET)
        quantized = onnx.load(str(path))
    quantize_before_transpose(quantized)
    return _int8_embeddings_and_check(quantized, model)


def quantize_before_transpose(model: onnx.ModelProto) -> int:
    """Swap, in place, each ``Transpose`` -> ``DynamicQuantizeLinear`` pair (the Transpose read by nothing else) into
    ``DynamicQuantizeLinear`` -> ``Transpose``: the same values (one scale and zero point per tensor), but the
    Transpose moves uint8 instead of float32 (the MMoE experts' ``[n, E, d]`` -> ``[E, n, d]``, which the fp32 graph
    fuses into its MatMul and the quantised one cannot). Returns the number of pairs swapped."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    graph_outputs = {o.name for o in graph.output}
    swapped = 0
    for node in graph.node:
        transpose = producer.get(node.input[0]) if node.op_type == "DynamicQuantizeLinear" else None
        if (transpose is None or transpose.op_type != "Transpose" or readers[transpose.output[0]] != 1
                or transpose.output[0] in graph_outputs):
            continue
        quantized = node.output[0]
        node.input[0], node.output[0] = transpose.input[0], f"{quantized}_before_transpose"
        transpose.input[0], transpose.output[0] = node.output[0], quantized
        swapped += 1
    if swapped:
        nodes = _topological(list(graph.node), {i.name for i in graph.input} | {i.name for i in graph.initializer})
        del graph.node[:]
        graph.node.extend(nodes)
    return swapped


def _output_width(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> int:
    """Output features of a ``MatMul`` / ``Gemm`` whose weight ``inits`` holds (0 for another weight)."""
    weight = inits.get(node.input[1]) if len(node.input) > 1 else None
    if weight is None or not weight.dims:
        return 0
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    return int(weight.dims[0] if node.op_type == "Gemm" and trans_b else weight.dims[-1])


def to_int8_static(model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]],
                   quant_format: str = "qdq", per_channel: bool = False, activation_type: str = "uint8",
                   weight_type: str = "int8", reduce_range: bool = False) -> onnx.ModelProto:
    """Statically quantised int8 dense layers (``STATIC_MIN_WIDTH`` outputs or more, outside the preprocessing)
    calibrated on ``calibration`` (raw-input feeds of the fp32 ``model``, one dict per batch) and int8
    embedding tables (per-row scales). ``quant_format``: ``qdq`` (QuantizeLinear/DequantizeLinear pairs that
    onnxruntime fuses at load) or ``qoperator`` (``QGemm`` / ``QLinearMatMul`` in the file); ``per_channel``
    applies to 2-D weights only (onnxruntime's QLinearMatMul takes one zero point per batched weight);
    ``activation_type`` / ``weight_type`` ``uint8`` or ``int8`` and ``reduce_range`` (7-bit weights) as in
    ``quantize_static`` (the defaults are what ``int8-static`` exports; the others are for the benchmark)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    if not calibration:
        raise ValueError("int8-static needs at least one calibration batch")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    pre = preprocessing_nodes(model)  # also names unnamed nodes
    inits = {i.name: i for i in model.graph.initializer}
    dense = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.name not in pre
             and _output_width(n, inits) >= STATIC_MIN_WIDTH]
    passes = [([n.name for n in dense if len(inits[n.input[1]].dims) == 2], True),
              ([n.name for n in dense if len(inits[n.input[1]].dims) > 2], False)] if per_channel \
        else [([n.name for n in dense], False)]
    fmt = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[quant_format]
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fp32.onnx"
        onnx.save_model(model, str(path))
        logging.disable(logging.WARNING)  # its advice to run its pre-processing first (shape inference)
        try:
            for k, (names, channel) in enumerate(passes):
                if names:
                    out = Path(tmp) / f"int8_static_{k}.onnx"
                    quantize_static(path, out, Reader(), quant_format=fmt, op_types_to_quantize=["MatMul", "Gemm"],
                                    nodes_to_quantize=names, nodes_to_exclude=sorted(pre), per_channel=channel,
                                    reduce_range=reduce_range, activation_type=types[activation_type],
                                    weight_type=types[weight_type],
                                    calibration_providers=["CPUExecutionProvider"])
                    path = out
        finally:
            logging.disable(logging.NOTSET)
        quantized = onnx.load(str(path))
    return _int8_embeddings_and_check(quantized, model)


def core_tensors(model: onnx.ModelProto) -> list[str]:
    """The tensors between preprocessing and the network (``core_input`` of each feature kind the graph has)."""
    pattern = core_input("KIND").split("KIND")
    return sorted({o for node in model.graph.node for o in node.output
                   if o.startswith(pattern[0]) and o.endswith(pattern[1])})


def preprocessing_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes computing the model's preprocessed inputs (``core_input``), naming unnamed nodes."""
    graph = model.graph
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"recmtl_node_{i}"
    producer = {out: node for node in graph.node for out in node.output}
    wanted = core_tensors(model)
    seen: set[str] = set()
    while wanted:
        node = producer.get(wanted.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        wanted.extend(node.input)
    return seen


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The network's float initializers and arithmetic in fp16; preprocessing, inputs and outputs stay fp32. The
    network (from the preprocessed tensors to the outputs) is cut out, converted with float32 inputs and outputs
    kept (``keep_io_types``: one Cast in, one out), and put back behind the unchanged preprocessing nodes."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    model = onnx.ModelProto.FromString(model.SerializeToString())
    pre = preprocessing_nodes(model)
    cut = core_tensors(model)
    producer = {o: node for node in model.graph.node for o in node.output}
    known = {v.name for v in model.graph.value_info}
    model.graph.value_info.extend(helper.make_tensor_value_info(name, _elem_type(model, producer, name), None)
                                  for name in cut if name not in known)
    core = onnx.utils.Extractor(model).extract_model(cut, [o.name for o in model.graph.output])
    half = convert_float_to_float16(core, keep_io_types=True, disable_shape_infer=False)
    pre_nodes = [n for n in model.graph.node if n.name in pre]
    pre_inputs = {i for n in pre_nodes for i in n.input}
    core_inits = {i.name for i in half.graph.initializer}
    if pre_inputs & core_inits:
        raise RuntimeError(f"initializers shared by preprocessing and network: {sorted(pre_inputs & core_inits)[:5]}")
    graph = model.graph
    kept_inits = [i for i in graph.initializer if i.name in pre_inputs]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + list(half.graph.initializer))
    del graph.node[:]
    graph.node.extend(_topological(pre_nodes + list(half.graph.node), {i.name for i in graph.input}
                                   | {i.name for i in graph.initializer}))
    del graph.value_info[:]
    _restore_opsets(model, half)
    onnx.checker.check_model(model)
    return model


def _elem_type(model: onnx.ModelProto, producer: dict[str, onnx.NodeProto], name: str) -> int:
    """The element type of tensor ``name``, followed back through shape-preserving nodes (Transpose, Concat,
    Identity, Reshape, Unsqueeze) to a graph input, a typed node (Cast, LabelEncoder) or an initializer."""
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    inits = {i.name: i.data_type for i in model.graph.initializer}
    seen: set[str] = set()
    while name not in seen:
        seen.add(name)
        if name in inputs:
            return inputs[name]
        if name in inits:
            return inits[name]
        node = producer.get(name)
        if node is None:
            break
        if node.op_type == "Cast":
            return next(a.i for a in node.attribute if a.name == "to")
        if node.op_type == "LabelEncoder":
            return TensorProto.INT64 if any(a.name == "values_int64s" for a in node.attribute) else TensorProto.FLOAT
        if node.op_type in ("Where", "Pad"):
            name = node.input[1] if node.op_type == "Where" else node.input[0]
        else:
            name = node.input[0]
    return TensorProto.FLOAT


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` ordered so every input is produced before it is read (stable for already ordered graphs)."""
    ready, pending, out = set(available) | {""}, list(nodes), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                out.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise RuntimeError(f"graph has a cycle or a missing input near node {rest[0].name}")
        pending = rest
    return out


def _int8_embeddings_and_check(quantized: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """The last steps of both int8 exports: int8 embedding tables, the original's opsets, the ONNX checker."""
    quantize_embeddings(quantized)
    _restore_opsets(quantized, original)
    onnx.checker.check_model(quantized)
    return quantized


def _restore_opsets(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Keep every opset import of ``original`` (the converters may drop unused domains or add their own)."""
    have = {o.domain for o in model.opset_import}
    for o in original.opset_import:
        if o.domain not in have:
            model.opset_import.append(helper.make_opsetid(o.domain, o.version))


def convert(model: onnx.ModelProto, precision: str,
            calibration: list[dict[str, np.ndarray]] | None = None) -> onnx.ModelProto:
    """The fp32 export ``model`` in ``precision`` (``fp32``: unchanged; ``int8-static`` needs ``calibration``)."""
    if precision == "int8-static":
        return to_int8_static(model, calibration or [])
    if precision == "int8":
        return to_int8(model)
    if precision == "fp16":
        return to_fp16(model)
    return model


def quality(run: LoadedRun, reference: Path, candidate: Path, sample: pa.Table) -> dict[str, dict[str, Any]]:
    """Per task on the labelled ``sample`` rows: ``max_abs`` (largest score difference of ``candidate`` to the fp32
    ``reference``), ``metric`` (its name), ``fp32`` and ``value`` (the metric of each), ``delta``, ``bound`` and
    ``ok`` (``|delta|`` within ``QUALITY_BOUND``: absolute for ``ABSOLUTE_METRICS``, relative otherwise)."""
    arrays = run.schema.transform(sample, labels=True)
    ref, got = Scorer(reference).score(sample), Scorer(candidate).score(sample)

    def scores(table: pa.Table, task: str) -> np.ndarray:
        col = table.column(task)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            return col.flatten().to_numpy().reshape(len(col), -1)
        return col.to_numpy()
    slices = run.schema.label_slices()
    tasks = run.model.task_names
    out: dict[str, dict[str, Any]] = {}
    for t in tasks:
        a, b = scores(ref, t), scores(got, t)
        pa_ = Predictions({t: a}, arrays.labels, arrays.mask, arrays.group, {}, slices)
        label, m = pa_.task_label(t)
        group = arrays.group[m] if arrays.group is not None else None
        head = run.model.heads[t]
        fp32_metrics = head.metrics(label[m], a[m], group)
        low_metrics = head.metrics(label[m], b[m], group)
        name = "auc" if "auc" in fp32_metrics else next(iter(fp32_metrics), None)
        entry: dict[str, Any] = {"max_abs": float(np.nanmax(np.abs(a - b))) if a.size else 0.0, "metric": name,
                                 "rows": int(m.sum())}
        if name is not None:
            v0, v1 = float(fp32_metrics[name]), float(low_metrics[name])
            delta = v1 - v0
            bound = QUALITY_BOUND if name in ABSOLUTE_METRICS else QUALITY_BOUND * max(abs(v0), 1e-12)
            entry.update(fp32=v0, value=v1, delta=delta, bound=bound,
                         ok=bool(abs(delta) <= bound or (np.isnan(v0) and np.isnan(v1))))
        else:  # a head without metrics: the scores only
            entry.update(ok=True)
        out[t] = entry
    return out
