"""Triton's model repository layout: writing one for an exported model (``recmtl export --triton``) and
finding the models of a file, a folder of ``.onnx`` files or a Triton repository (``recmtl serve``)."""
from __future__ import annotations

import shutil
from pathlib import Path

from recmtl.errors import DataError
from recmtl.files import atomic_path
from recmtl.serving.wire import WIRE_TYPES, read_model_schema


def discover_models(target: str | Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The models ``recmtl serve`` finds in ``target``, name -> ONNX file, and the names it refuses, name ->
    reason. A file is one model named by its stem; a folder holds ``NAME.onnx`` files and Triton's
    ``NAME/1/model.onnx``. In a folder a symlink is followed only to a file inside the folder (a link out of
    it is refused), and a name claimed by two files is refused (neither is served, rather than one
    shadowing the other). A DataError when the target is missing or holds no model at all."""
    path = Path(target)
    if path.is_file():
        return {path.stem: path}, {}
    if not path.is_dir():
        raise DataError(f"no such model file or folder: {path}")
    root = path.resolve()
    claims: dict[str, list[Path]] = {}
    for name, p in [(p.stem, p) for p in sorted(path.glob("*.onnx"))] + \
                   [(p.parent.parent.name, p) for p in sorted(path.glob("*/1/model.onnx"))]:  # Triton layout
        if not p.is_dir():  # a folder that happens to be named x.onnx is not a model
            claims.setdefault(name, []).append(p)
    if not claims:
        raise DataError(f"{path} holds no .onnx models")
    found: dict[str, Path] = {}
    refused: dict[str, str] = {}
    for name, paths in claims.items():
        if len(paths) > 1:
            refused[name] = (f"{len(paths)} files claim the name '{name}' ({', '.join(str(p) for p in paths)}); "
                             "rename or remove all but one")
        elif not paths[0].exists():
            refused[name] = f"{paths[0]} is a symlink to nothing"
        elif not paths[0].resolve().is_relative_to(root):
            refused[name] = f"{paths[0]} links to {paths[0].resolve()}, outside {root}: links are followed only inside the folder"
        else:
            found[name] = paths[0]
    return found, refused


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
