"""Cost of one training step of each registered tower at census-income sizes, interleaved.

Wall times of whole training runs on a shared machine move with the load; this measures the tower alone:
forward + backward + Adam step on a ``[batch, input_dim]`` input (census-income: 32 categorical features x
16-d embeddings + 7 dense = 519) with two tasks, each tower at the sizes of benchmarks/quality/census_income.py.
Rounds are interleaved (every tower once per round, order shuffled) and the median per tower is reported,
so load changes hit every tower alike. STEM also gets the categorical ids and its embedding tables (sparse,
SparseAdam), as in training.

Usage: python benchmarks/speed/bench_tower_step.py [--rounds 30] [--batch 2048] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

# the tower sizes live with the census-income quality benchmark (benchmarks/quality/census_income.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quality"))
from census_income import TOWERS  # noqa: E402
from step_timing import interleaved_medians, step_table  # noqa: E402

from recmtl.contracts import FeatureInfo  # noqa: E402
from recmtl.registry import load_registry  # noqa: E402
from recmtl.training.model import sparse_parameters  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    registry = load_registry()
    n_cat, n_dense, dim = 32, 7, 16
    input_dim = n_cat * dim + n_dense
    features = {"categorical": [FeatureInfo(f"c{i}", "categorical", 50) for i in range(n_cat)],
                "dense": [FeatureInfo(f"d{i}", "dense") for i in range(n_dense)]}
    x = torch.randn(args.batch, input_dim)
    inputs = {"categorical": torch.randint(0, 50, (args.batch, n_cat)), "dense": torch.randn(args.batch, n_dense)}
    y = torch.randint(0, 2, (args.batch, 2)).float()
    steps = {}
    for name, spec in TOWERS.items():
        params = yaml.safe_load(spec)
        cls = registry.get("tower", params.pop("name"))
        extra = {"features": features} if cls.uses_inputs else {}
        tower = cls(input_dim, ["a", "b"], **params, **extra)
        heads = torch.nn.ModuleDict({t: torch.nn.Linear(w, 1) for t, w in tower.output_dims.items()})
        sparse = sparse_parameters(tower)
        ids = {id(p) for p in sparse}
        opts = [torch.optim.Adam([p for p in list(tower.parameters()) + list(heads.parameters()) if id(p) not in ids])]
        if sparse:
            opts.append(torch.optim.SparseAdam(sparse))

        def step(tower=tower, heads=heads, opts=opts) -> None:
            h = tower(x, inputs) if tower.uses_inputs else tower(x)
            loss = sum(torch.nn.functional.binary_cross_entropy_with_logits(heads[t](h[t]).squeeze(-1), y[:, i])
                       for i, t in enumerate(["a", "b"]))
            for o in opts:
                o.zero_grad()
            (loss + tower.regularization({})).backward()
            for o in opts:
                o.step()

        step()  # warm-up
        steps[name] = step
    medians = interleaved_medians(steps, args.rounds)
    print(f"batch {args.batch}, input {input_dim}, {args.threads} thread(s), {args.rounds} interleaved rounds")
    n_params = {n: sum(p.numel() for p in steps[n].__defaults__[0].parameters()) for n in steps}
    print(step_table(medians, n_params, "shared_bottom", "tower", "vs shared_bottom", digits=1))


if __name__ == "__main__":
    main()
