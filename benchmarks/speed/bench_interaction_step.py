"""Cost of one training step with each interaction block (and feature gates, pepnet) relative to the plain MLP.

Builds the whole model (encoders -> [gates] -> [block] -> tower -> heads) from a trained run directory's config
and schema (e.g. one of benchmarks/quality/interactions.py's runs), then times forward + backward + Adam /
SparseAdam steps on random rows of that schema. Rounds are interleaved (each variant once per round, order
shuffled) and the median per variant is reported, so load changes on a shared machine hit all alike.

Usage: python benchmarks/speed/bench_interaction_step.py RUN_DIR [--rounds 30] [--batch 512] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from recmtl.config import parse_config
from recmtl.registry import load_registry
from recmtl.schema import FittedSchema
from recmtl.training.model import MultiTaskModel, sparse_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_timing import interleaved_medians, step_table  # noqa: E402

CHUNK = "_row_chunk"  # not a config section: overrides the built block's ``chunk`` attribute (autoint)
VARIANTS = {
    "mlp (no block)": {},
    "fm": {"interaction": {"name": "fm"}},
    "dcn_v2 (2 layers, default: rank d // 8)": {"interaction": {"name": "dcn_v2", "num_layers": 2}},
    "dcn_v2 (2 layers, full-rank)": {"interaction": {"name": "dcn_v2", "num_layers": 2, "rank": None}},
    "dcn_v2 (2 layers, rank 16, 4 experts)": {"interaction": {"name": "dcn_v2", "num_layers": 2, "rank": 16, "num_experts": 4}},
    "autoint (2 layers)": {"interaction": {"name": "autoint", "num_layers": 2}},
    # the same block without row chunks (every row's attention scores at once: the form before the chunks)
    "autoint (2 layers, one shot)": {"interaction": {"name": "autoint", "num_layers": 2}, CHUNK: 0},
    "feature_gates": {"feature_gates": {"sparsity": 0.001}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    registry = load_registry()
    raw = yaml.safe_load(open(f"{args.run_dir}/config.yaml"))
    schema = FittedSchema.load(Path(args.run_dir))
    variants = dict(VARIANTS)
    cats = {f.name for f in schema.feature_infos()["categorical"]}
    prior = ["user_id", "item_id"] if {"user_id", "item_id"} <= cats else None  # None: every categorical feature
    variants["pepnet tower (no block)"] = {"tower": {"name": "pepnet", "gate_features": prior, "task_units": [32]}}
    steps = {}
    for name, sections in variants.items():
        chunk = sections.get(CHUNK)
        sections = {k: v for k, v in sections.items() if k != CHUNK}
        cfg = parse_config({**{k: v for k, v in raw.items() if k not in ("interaction", "feature_gates")}, **sections})
        model = MultiTaskModel(cfg, schema, registry)
        if chunk is not None:
            model.interaction.chunk = chunk
        infos = schema.feature_infos()
        n = args.batch
        inputs = {"categorical": torch.stack([torch.randint(0, f.cardinality, (n,)) for f in infos["categorical"]], 1),
                  "dense": torch.randn(n, len(infos["dense"]))}
        width = sum(w for _, w, _ in model.label_slices.values())
        labels, mask = torch.randint(0, 2, (n, width)).float(), torch.ones(n, width)
        sparse = sparse_parameters(model)
        ids = {id(p) for p in sparse}
        opts = [torch.optim.Adam([p for p in model.parameters() if id(p) not in ids])]
        if sparse:
            opts.append(torch.optim.SparseAdam(sparse))

        def step(model=model, opts=opts, inputs=inputs, labels=labels, mask=mask) -> None:
            outputs, _ = model.run(inputs)
            loss = sum(model.losses(outputs, labels, mask).values())
            for o in opts:
                o.zero_grad()
            model.backward_regularization()
            loss.backward()
            for o in opts:
                o.step()

        model.train()
        step()  # warm-up
        steps[name] = (step, sum(p.numel() for p in model.parameters()))
    medians = interleaved_medians({n: step for n, (step, _) in steps.items()}, args.rounds)
    print(f"run {args.run_dir} (tower {raw['tower']['name']}), batch {args.batch}, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds")
    print(step_table(medians, {n: k for n, (_, k) in steps.items()}, "mlp (no block)", "variant", "vs MLP"))


if __name__ == "__main__":
    main()
