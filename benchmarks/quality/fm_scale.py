"""The scale of fm's pairwise term against the flat vector in trained runs (issue 16, fm on census-income).

For each run directory: the model of its best epoch on the first ``--rows`` rows of ``--data``, in evaluation
mode; a forward hook on the interaction block records its input (the flat vector) and output. Prints per run the
flat vector's RMS over its units, the pairwise term's RMS (before and after the block's ``normalize``, when the
block is fm), the field view's mean embedding norm, and the share of the first tower layer's pre-activation
energy that comes from the pairwise columns (``||x_part W_part||²`` over both parts; mmoe's experts and gates).

Usage: python benchmarks/quality/fm_scale.py RUN_DIR [RUN_DIR ...] --data valid.parquet [--rows 8192]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from recmtl.data.parquet import ParquetSource
from recmtl.training.batches import blocks, minibatches
from recmtl.training.evaluate import load_run


def rms(t: torch.Tensor) -> float:
    return float(t.pow(2).mean().sqrt())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data", required=True)
    ap.add_argument("--rows", type=int, default=8192)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("| run | flat RMS | pairwise RMS (raw) | pairwise RMS (to the tower) | raw / flat | field norm | "
          "pairwise share of the first layer's input energy |\n|---|---|---|---|---|---|---|")
    for run_dir in args.runs:
        run = load_run(run_dir, checkpoint="best")
        model = run.model
        block = model.interaction
        if block is None:
            print(f"| {run_dir.name} | (no block) | | | | | |")
            continue
        seen: dict[str, torch.Tensor] = {}

        def hook(mod, inputs, out, seen=seen):
            x, fields = inputs
            total = fields.sum(dim=1)
            seen["x"], seen["fields"], seen["out"] = x, fields, out
            seen["raw"] = 0.5 * (total * total - (fields * fields).sum(dim=1))

        handle = block.register_forward_hook(hook)
        cols = [c for t in run.config.tasks for c in t.label_columns] + run.schema.feature_columns
        source = ParquetSource(args.data, cols)
        xs, raws, outs, norms = [], [], [], []
        n = 0
        model.eval()
        with torch.no_grad():
            for batch in minibatches(blocks(source, run.schema, 65_536), 2048):
                model.run(batch.inputs)
                xs.append(seen["x"])
                raws.append(seen["raw"])
                outs.append(seen["out"][:, seen["x"].shape[1]:])
                norms.append(seen["fields"].norm(dim=2).mean())
                n += seen["x"].shape[0]
                if n >= args.rows:
                    break
        handle.remove()
        x, raw, pairs = torch.cat(xs), torch.cat(raws), torch.cat(outs)
        tower = model.tower
        w = tower.experts.weights[0] if hasattr(tower, "experts") else None
        share = ""
        if w is not None and w.shape[0] == x.shape[1] + pairs.shape[1]:
            d = x.shape[1]
            w = w.detach()
            e_flat = float((x @ w[:d]).pow(2).sum())
            e_pair = float((pairs @ w[d:]).pow(2).sum())
            share = f"{e_pair / (e_flat + e_pair):.3f}"
        print(f"| {run_dir.name} | {rms(x):.3f} | {rms(raw):.3f} | {rms(pairs):.3f} | {rms(raw) / rms(x):.1f}x | "
              f"{float(torch.stack(norms).mean()):.3f} | {share} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
