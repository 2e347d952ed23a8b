"""Which fields each task uses: the ``[task x field]`` gate matrix of a trained run (issue 16).

* ``feature_gates`` runs: the learned per-task gates ``2·sigmoid(a)`` of the best checkpoint (what metrics.json's
  ``diagnostics.matrices.feature_gates`` holds for that epoch);
* ``pepnet`` runs (no interaction block): per task the mean of its first PPNet gate (the one on the EPNet-gated
  input) over each field's columns of the flat vector, and the shared EPNet gate the same way, averaged over the
  first ``--rows`` rows of DATA (the gates are conditioned on the prior features, so they vary by row).

Prints a markdown table (one row per task, one column per field; the ``--low`` lowest gates of each task in bold)
and, with ``--json``, writes ``{rows, cols, values}`` per matrix.

Usage: python benchmarks/quality/gate_matrix.py RUN_DIR [DATA] [--rows 5000] [--low 2] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from recmtl.data.parquet import ParquetSource
from recmtl.training.evaluate import load_run
from recmtl.training.importance import read_rows


def field_columns(model) -> list[int]:
    """The field index of each column of the model's flat vector (as ``MultiTaskModel`` builds it)."""
    columns, first = [], 0
    for e in model.encoders.values():
        columns += [first + int(c) for c in e.field_columns()]
        first += len(e.field_names) if e.has_fields else 1
    return columns


def by_field(values: torch.Tensor, columns: list[int], n_fields: int) -> list[float]:
    """Mean of ``values[col]`` over each field's columns."""
    cols = torch.tensor(columns)
    sums = torch.zeros(n_fields).index_add_(0, cols, values.double().float())
    counts = torch.zeros(n_fields).index_add_(0, cols, torch.ones(len(columns)))
    return [round(float(v), 4) for v in sums / counts]


def pepnet_matrices(model, schema, data: str, rows: int) -> dict[str, dict]:
    tower = model.tower
    columns = field_columns(model)
    if model.interaction is not None or len(columns) != tower.epnet.net[-1].out_features:
        sys.exit("gate_matrix: pepnet's gates map to fields only without an interaction block")
    sums: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_module, _inputs, output):
            sums[name] = output.detach().sum(0) + sums.get(name, 0)
        return hook

    handles = [tower.epnet.register_forward_hook(keep("EPNet (shared)"))]
    handles += [tower.ppnet[t][0].register_forward_hook(keep(t)) for t in model.task_names]
    arrays = schema.transform(read_rows(ParquetSource(data), rows), labels=False)
    n = len(next(iter(arrays.inputs.values())))
    with torch.no_grad():
        for i in range(0, n, 4096):
            model.predict({k: torch.from_numpy(v[i:i + 4096]) for k, v in arrays.inputs.items()})
    for h in handles:
        h.remove()
    names = list(model.field_names)
    order = [*model.task_names, "EPNet (shared)"]
    return {"ppnet_first_layer_gates": {"rows": order, "cols": names,
                                        "values": [by_field(sums[r] / n, columns, len(names)) for r in order]}}


def markdown(matrix: dict, low: int) -> str:
    lines = ["| task | " + " | ".join(matrix["cols"]) + " |", "|---|" + "---|" * len(matrix["cols"])]
    for row, values in zip(matrix["rows"], matrix["values"]):
        lowest = set(sorted(range(len(values)), key=values.__getitem__)[:low])
        cells = [f"**{v:.2f}**" if j in lowest else f"{v:.2f}" for j, v in enumerate(values)]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("data", nargs="?", default=None, help="Parquet rows for pepnet's gates (e.g. the test split)")
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--low", type=int, default=2, help="how many of each task's lowest gates to mark")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    run = load_run(args.run_dir, checkpoint="best", calibration=False)
    model = run.model
    if model.gates is not None:
        matrices = {"feature_gates": model.gates.matrix()}
    elif run.config.tower.name == "pepnet":
        if args.data is None:
            sys.exit("gate_matrix: a pepnet run needs DATA (rows to average its gates over)")
        matrices = pepnet_matrices(model, run.schema, args.data, args.rows)
    else:
        sys.exit(f"gate_matrix: {args.run_dir} has neither feature_gates nor a pepnet tower")
    for name, matrix in matrices.items():
        print(f"{name} ({args.run_dir}):\n{markdown(matrix, args.low)}\n")
    if args.json:
        args.json.write_text(json.dumps(matrices, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
