"""Image columns -> float tensors ``[n, channels, height, width]``, outside any model graph (no torch).

One function serves training (``recmtl.schema``), ``recmtl score`` and ``recmtl serve``, so the exported
model sees exactly the pixels the PyTorch model saw. A Parquet image column holds either

* encoded images (``binary``: PNG, JPEG or anything Pillow reads; in JSON requests a base64 ``string``),
  converted to the configured mode (1 channel: ``L``, 3: ``RGB``, 4: ``RGBA``) and scaled by 1/255; or
* fixed-shape number arrays (``list``/``fixed_size_list``, possibly nested) of ``channels * height * width``
  values in channels-first (C, H, W) order: ``uint8`` values are scaled by 1/255, other numbers are used
  as they are (so pre-scaled floats stay as they are).

A null image becomes all zeros. An image of another size is an error, never silently resized.
"""
from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recmtl.data.arrow import plain_array
from recmtl.errors import DataError

MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def is_image_type(typ: pa.DataType) -> str | None:
    """``"bytes"`` for encoded images, ``"array"`` for number lists, None for anything else."""
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        return "bytes"
    while pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        typ = typ.value_type
        if pa.types.is_integer(typ) or pa.types.is_floating(typ):
            return "array"
    return None


def _decode_one(data: bytes, name: str, row: int, channels: int, height: int, width: int) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size != (width, height):
                raise DataError(f"image column '{name}', row {row}: {img.size[0]}x{img.size[1]} pixels, "
                                f"the model expects width {width} x height {height}")
            pixels = np.asarray(img.convert(MODES[channels]), dtype=np.float32)
    except DataError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ... for damaged data
        raise DataError(f"image column '{name}', row {row}: not a readable image ({type(exc).__name__}: {exc})") from None
    pixels = pixels.reshape(height, width, channels)
    return pixels.transpose(2, 0, 1) / np.float32(255.0)


def decode_images(arr: pa.Array | pa.ChunkedArray, name: str, channels: int, height: int, width: int) -> np.ndarray:
    """An Arrow image column -> float32 ``[n, channels, height, width]`` (see the module docstring)."""
    arr = plain_array(arr)
    n = len(arr)
    out = np.zeros((n, channels, height, width), dtype=np.float32)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):  # base64 text (JSON requests)
        try:
            arr = pa.array([None if v is None else base64.b64decode(v, validate=True) for v in arr.to_pylist()],
                           type=pa.binary())
        except (binascii.Error, ValueError):
            raise DataError(f"image column '{name}' holds strings that are not base64-encoded images") from None
    kind = is_image_type(arr.type)
    if kind == "bytes":
        for i, data in enumerate(arr.to_pylist()):
            if data is not None:
                out[i] = _decode_one(data, name, i, channels, height, width)
        return out
    if kind != "array":
        raise DataError(f"image column '{name}' has type {arr.type}; expected encoded image bytes (binary) "
                        "or fixed-shape number lists")
    size = channels * height * width
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    flat, parent = arr, np.arange(n)
    while pa.types.is_list(flat.type) or pa.types.is_large_list(flat.type) or pa.types.is_fixed_size_list(flat.type):
        parent = parent[pc.list_parent_indices(flat).to_numpy(zero_copy_only=False)]
        flat = pc.list_flatten(flat)
    counts = np.bincount(parent, minlength=n)
    wrong = np.flatnonzero(valid & (counts != size))
    if len(wrong):
        raise DataError(f"image column '{name}', row {wrong[0]}: {counts[wrong[0]]} values; an image array must hold "
                        f"channels*height*width = {channels}*{height}*{width} = {size} values (C, H, W order)")
    if flat.null_count:
        raise DataError(f"image column '{name}': null values inside an image array")
    values = flat.to_numpy(zero_copy_only=False)
    pixels = values.astype(np.float32).reshape(-1, channels, height, width)
    if values.dtype == np.uint8:
        pixels /= np.float32(255.0)
    if pixels.shape[0] == n:
        return pixels
    out[valid] = pixels
    return out
