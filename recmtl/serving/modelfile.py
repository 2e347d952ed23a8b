"""What a model file must not hold before onnxruntime opens it: tensors whose data lives in other files.

An ONNX tensor can keep its data "externally", at a path named in the model (``TensorProto.external_data``,
``data_location = EXTERNAL``); onnxruntime reads that path when it loads the model, and older versions follow it
outside the model's folder (``../../etc/...``, absolute paths, symlinks). A recmtl export is always one
self-contained file, so scoring and serving refuse any model with external data before loading it.

The check reads the protobuf wire format directly (the serving image has no ``onnx`` package): it walks only
the fields that can hold tensors (graph initializers, sparse initializers, node attributes, subgraphs,
functions, training graphs) and skips every other field, tensor payloads included, by its length.
"""
from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

from recmtl.errors import DataError

# ONNX message -> {field number: message type} for the fields that can hold a TensorProto (onnx/onnx.proto)
_CHILDREN: dict[str, dict[int, str]] = {
    "Model": {7: "Graph", 20: "TrainingInfo", 25: "Function"},
    "TrainingInfo": {1: "Graph", 2: "Graph"},
    "Graph": {1: "Node", 5: "Tensor", 15: "SparseTensor"},
    "Node": {5: "Attribute"},
    "Function": {7: "Node", 11: "Attribute"},
    "Attribute": {5: "Tensor", 6: "Graph", 10: "Tensor", 11: "Graph", 22: "SparseTensor", 23: "SparseTensor"},
    "SparseTensor": {1: "Tensor", 2: "Tensor"},
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_MAX_DEPTH = 64  # nested subgraphs; deeper is not a model anyone exported


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end or varint value) of each field of the message in buf[pos:end]."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, value
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed
            yield number, wire, pos, pos + length
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:  # groups (3, 4) are not used by ONNX
            raise _Malformed
    if pos != end:
        raise _Malformed


def _external(buf: memoryview, kind: str, pos: int, end: int, depth: int) -> Iterator[str]:
    if depth > _MAX_DEPTH:
        raise _Malformed
    if kind == "Tensor":
        name, external = "", False
        for number, wire, start, stop in _fields(buf, pos, end):
            if number == _TENSOR_NAME and wire == 2:
                name = bytes(buf[start:stop]).decode("utf-8", "replace")
            elif number == _TENSOR_EXTERNAL_DATA or (number == _TENSOR_DATA_LOCATION and wire == 0 and start == _EXTERNAL):
                external = True
        if external:
            yield name or "(unnamed)"
        return
    children = _CHILDREN[kind]
    for number, wire, start, stop in _fields(buf, pos, end):
        child = children.get(number)
        if child is not None and wire == 2:
            yield from _external(buf, child, start, stop, depth + 1)


def external_data_tensors(path: str | Path) -> list[str]:
    """Names of the tensors of an ONNX file that keep their data in other files (empty for a self-contained
    model); a DataError when the file is not a well-formed protobuf message."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) == 0:
                raise DataError(f"{path} is empty, not an ONNX model")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                buf = memoryview(mapped)
                try:
                    return list(_external(buf, "Model", 0, len(buf), 0))
                except _Malformed:
                    raise DataError(f"{path} is not an ONNX model (not a well-formed protobuf message)") from None
                finally:
                    buf.release()
    except OSError as exc:
        raise DataError(f"cannot read model {path}: {exc.strerror or exc}") from None


def check_self_contained(path: str | Path) -> None:
    """A DataError naming the tensors when the model refers to data in other files (see the module docstring)."""
    names = external_data_tensors(path)
    if names:
        shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise DataError(f"{path} keeps tensor data in other files ({shown}); recmtl scores and serves only "
                        "self-contained models (recmtl export writes one file), and never reads a model's "
                        "external data paths")
