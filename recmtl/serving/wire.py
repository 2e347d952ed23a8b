"""The exported model's input format, owned in one place: the metadata key, the null and padding sentinels,
ONE table of the input dtypes (numpy, Arrow, KServe v2, Triton, JSON), and reading the schema back.

An exported model takes one input per raw column:

* ``int64``: a categorical int column (``[batch]``) or a sequence of ints (``[batch, max_length]``); a null
  is ``INT_NULL`` (outside every vocabulary, so the OOV id), padding after a sequence's items is ``PAD_INT``;
* ``string``: a categorical string column, a sequence of strings or a text column (``[batch]``, tokenised in the
  graph); a null is ``""`` (for a text: no tokens), padding ``PAD_STRING``;
* ``float32``: a dense column (``[batch]``, null = NaN) or an image ``[batch, C, H, W]`` in [0, 1].

The recmtl schema (inputs, tasks, classes) is JSON under ``METADATA_KEY`` in the model's ``metadata_props``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from recmtl.errors import DataError

#: metadata_props key of the recmtl schema (JSON)
METADATA_KEY = "recmtl.schema"
#: version of the schema stored under METADATA_KEY
FORMAT = 1
#: a null int64 value: never in a vocabulary, so it maps to the OOV id
INT_NULL = int(np.iinfo(np.int64).min)
#: padding of int64 sequence inputs (INT64_MIN + 1; INT64_MIN itself is a null item, i.e. OOV)
PAD_INT = INT_NULL + 1
#: padding of string sequence inputs (the empty string is a null item, i.e. OOV)
PAD_STRING = "<recmtl:pad>"


@dataclass(frozen=True)
class WireType:
    """How one input dtype travels: in numpy and Arrow, in the KServe v2 / Triton protocols, in JSON."""

    name: str
    numpy: Any  # the numpy dtype of the model input
    arrow: pa.DataType  # the Arrow type of a raw column (or of a sequence's items)
    v2: str  # KServe v2 / Triton datatype of the model input
    triton: str  # data_type in a Triton config.pbtxt
    json_types: tuple[type, ...]  # Python types a JSON value of this input may have
    json_name: str  # those types in an error message
    null: Any  # what a null becomes
    padding: Any  # what fills a sequence after its items (None: no sequences of this dtype)


WIRE_TYPES: dict[str, WireType] = {
    "int64": WireType("int64", np.int64, pa.int64(), "INT64", "TYPE_INT64", (int,), "integers", INT_NULL, PAD_INT),
    "string": WireType("string", object, pa.string(), "BYTES", "TYPE_STRING", (str,), "strings", "", PAD_STRING),
    "float32": WireType("float32", np.float32, pa.float32(), "FP32", "TYPE_FP32", (int, float), "numbers", np.nan, None),
}
#: KServe v2 datatypes a client may send for numeric inputs (converted to the model's dtype)
V2_NUMERIC = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "FP64": np.float64}
#: what a null means, per input kind (stored in the metadata for clients in other languages)
MISSING_VALUES = {"int64": "any value outside the vocabulary (recmtl score passes int64 min)",
                  "string": "empty string", "float32": "NaN", "image": "all zeros",
                  "sequence": "a null list: all padding; a null item: as int64/string",
                  "text": "empty string (no tokens)"}


@dataclass(frozen=True)
class ModelInput:
    name: str
    dtype: str  # a key of WIRE_TYPES
    shape: tuple[int, ...] = ()  # per-row shape: () for a column value, (C, H, W) for an image, (L,) for a sequence
    kind: str = ""  # "categorical" | "dense" | "image" | "sequence" | "text" ("": from dtype and shape)

    @property
    def wire(self) -> WireType:
        return WIRE_TYPES[self.dtype]

    @property
    def is_image(self) -> bool:
        return self.kind == "image" or (not self.kind and bool(self.shape))

    @property
    def is_sequence(self) -> bool:
        return self.kind == "sequence"

    def arrow_type(self) -> pa.DataType:
        """The Arrow type of the raw column (binary for an image: encoded bytes)."""
        if self.is_image:
            return pa.binary()
        return pa.list_(self.wire.arrow) if self.is_sequence else self.wire.arrow

    def to_metadata(self) -> dict[str, Any]:
        if self.is_image:
            return {"name": self.name, "dtype": self.dtype, "kind": "image", "shape": list(self.shape),
                    "scale": "pixels / 255 (uint8, PNG/JPEG); float arrays as they are"}
        if self.is_sequence:
            return {"name": self.name, "dtype": self.dtype, "kind": "sequence", "shape": list(self.shape),
                    "max_length": self.shape[0], "padding": self.wire.padding,
                    "order": "a row's last max_length items, left-aligned; the rest padding"}
        if self.kind == "text":
            return {"name": self.name, "dtype": self.dtype, "kind": "text",
                    "tokens": "lowercased words and bigrams, hashed in the graph; a raw string per row"}
        return {"name": self.name, "dtype": self.dtype, "kind": "dense" if self.dtype == "float32" else "categorical"}

    @classmethod
    def from_metadata(cls, entry: dict[str, Any]) -> ModelInput:
        return cls(entry["name"], entry["dtype"], tuple(entry.get("shape") or ()), entry.get("kind", ""))


def schema_from_metadata(props: dict[str, str], path: str | Path) -> dict[str, Any]:
    """The recmtl schema from a model's metadata_props (as a dict); a clear error for a foreign model."""
    if METADATA_KEY not in props:
        raise DataError(f"{path} is an ONNX model but not a recmtl export (no '{METADATA_KEY}' metadata)")
    return json.loads(props[METADATA_KEY])


def read_model_schema(model_path: str | Path) -> dict[str, Any]:
    """The recmtl schema stored in an ONNX file's metadata (inputs, tasks, versions); reads it with the
    ``onnx`` package (``Scorer`` reads it through onnxruntime instead)."""
    import onnx
    path = Path(model_path)
    if not path.is_file():
        raise DataError(f"no such model file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for non-ONNX bytes
        raise DataError(f"{path} is not an ONNX model: {exc}") from None
    return schema_from_metadata({p.key: p.value for p in model.metadata_props}, path)


def describe(model_path: str | Path) -> list[str]:
    """What ``recmtl inspect`` prints: size, precision (the ``recmtl.precision`` metadata) and opsets, each input
    and output with its shape and role, the metadata other than the schema."""
    import onnx
    path = Path(model_path)
    meta = read_model_schema(path)
    m = onnx.load(str(path), load_external_data=False)

    def shape(v: onnx.ValueInfoProto) -> str:
        t = v.type.tensor_type
        dims = [d.dim_param or str(d.dim_value) for d in t.shape.dim]
        return f"{onnx.TensorProto.DataType.Name(t.elem_type).lower()}[{', '.join(dims)}]"

    precision = next((p.value for p in m.metadata_props if p.key == "recmtl.precision"), "fp32")  # older: fp32
    lines = [f"{path}  {path.stat().st_size / 1e6:.2f} MB  precision {precision}  opset "
             + ", ".join(f"{o.domain or 'ai.onnx'}={o.version}" for o in m.opset_import), "inputs:"]
    kinds = {i["name"]: i["kind"] for i in meta["inputs"]}
    lines += [f"  {v.name:<24} {shape(v):<18} {kinds.get(v.name, '')}" for v in m.graph.input]
    lines.append("outputs:")
    heads = {t["name"]: f"{t['head']} ({t['score']}, label {t['label']})" for t in meta["tasks"]}
    lines += [f"  {v.name:<24} {shape(v):<18} {heads.get(v.name, '')}" for v in m.graph.output]
    lines.append("metadata:")
    for p in m.metadata_props:
        if p.key != METADATA_KEY:
            value = p.value if len(p.value) <= 200 else p.value[:200] + "..."
            lines.append(f"  {p.key}: {value}")
    return lines
