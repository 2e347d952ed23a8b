"""Triton's model repository layout: writing one for an exported model (``recmtl export --triton``) and
finding the models of a file, a folder of ``.onnx`` files or a Triton repository (``recmtl serve``)."""
from __future__ import annotations

import shutil
from pathlib import Path

from recmtl.errors import DataError
from recmtl.files import atomic_path
from recmtl.serving.wire import WIRE_TYPES, read_model_schema


def discover_models(target: str | Path) -> dict[str, Path]:
    """Model name -> ONNX file: a file (named by its stem), a folder's ``*.onnx`` files and Triton's
    ``NAME/1/model.onnx``."""
    path = Path(target)
    if path.is_file():
        return {path.stem: path}
    if path.is_dir():
        found = {p.stem: p for p in sorted(path.glob("*.onnx"))}
        found.update({p.parent.parent.name: p for p in sorted(path.glob("*/1/model.onnx"))})  # Triton layout
        if not found:
            raise DataError(f"{path} holds no .onnx models")
        return found
    raise DataError(f"no such model file or folder: {path}")


def write_triton_repo(model_path: str | Path, repo: str | Path, name: str, max_batch_size: int = 1024,
                      max_queue_delay_us: int = 2000) -> Path:
    """Write ``repo/name/1/model.onnx`` and ``repo/name/config.pbtxt`` for Triton's onnxruntime backend
    (dynamic batching on; each 1-D model input/output is a ``[1]`` tensor reshaped to the batch axis)."""
    meta = read_model_schema(model_path)
    folder = Path(repo) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "1" / "model.onnx") as tmp:
        shutil.copyfile(model_path, tmp)
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size}", "input ["]
    def dims(shape: list[int] | None) -> str:  # a column value travels as [1] reshaped to the batch axis
        return f"dims: [ {', '.join(map(str, shape))} ]" if shape else "dims: [ 1 ] reshape: { shape: [ ] }"
    ins = [f'  {{ name: "{i["name"]}" data_type: {WIRE_TYPES[i["dtype"]].triton} {dims(i.get("shape"))} }}'
           for i in meta["inputs"]]
    lines.append(",\n".join(ins))
    lines.append("]")
    lines.append("output [")
    outs = [f'  {{ name: "{t["name"]}" data_type: TYPE_FP32 {dims([t["width"]] if t.get("width") else None)} }}'
            for t in meta["tasks"]]
    lines.append(",\n".join(outs))
    lines.append("]")
    lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}")
    lines.append("instance_group [ { kind: KIND_CPU count: 1 } ]")
    with atomic_path(folder / "config.pbtxt") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return folder
