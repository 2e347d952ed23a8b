"""Random Loss Weighting (RLW).

Lin, Ye, Xu, Shi and Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
Learning", TMLR 2022. Every step draws fresh weights ``lambda = softmax(p)`` with ``p ~ N(0, I)``
(``distribution: normal``, the paper's default) or ``lambda ~ Dirichlet(concentration * 1)``
(``distribution: dirichlet``), and minimises ``sum_k lambda_k L_k``.

The paper's weights sum to 1; here they are multiplied by the number of tasks ``K`` so that, on average,
each task has weight 1 and the loss has the scale of equal weighting (same learning rate works). The
draws come from the balancer's own generator, seeded from the run's ``seed`` (or ``seed`` here), so a
run is reproducible and resumes with the same sequence. The per-task ``weight`` of the config is not used.
"""
from __future__ import annotations

import numpy as np
import torch

from recmtl import Balancer, hookimpl
from recmtl.gradients import LossWeightingBalancer, SeededGenerator


class RandomLossWeighting(SeededGenerator, LossWeightingBalancer):
    def __init__(self, task_names: list[str], weights: dict[str, float], distribution: str = "normal",
                 concentration: float = 1.0, seed: int | None = None) -> None:
        super().__init__(task_names, weights)
        if distribution not in ("normal", "dirichlet"):
            raise ValueError(f"distribution must be 'normal' or 'dirichlet', got '{distribution}'")
        if concentration <= 0:
            raise ValueError(f"concentration must be positive, got {concentration}")
        self.distribution = distribution
        self.concentration = float(concentration)
        if seed is None:  # drawn from the global RNG, which the run's `seed` has set
            seed = int(torch.randint(0, 2**62, ()).item())
        self.init_generator(seed)

    def sample(self) -> torch.Tensor:
        """``[K]`` weights for one step, summing to ``K``."""
        k = len(self.task_names)
        if self.distribution == "normal":
            lam = torch.softmax(torch.randn(k, generator=self.generator, dtype=torch.float64), dim=0)
        else:  # numpy draws the Dirichlet sample, seeded from our generator (torch's takes none)
            seed = int(torch.randint(0, 2**62, (), generator=self.generator).item())
            lam = torch.from_numpy(np.random.default_rng(seed).dirichlet([self.concentration] * k))
        return k * lam

    def task_weights(self, losses: dict[str, torch.Tensor]) -> list[float]:
        return self.sample().tolist()


@hookimpl
def recmtl_register_balancers() -> dict[str, type[Balancer]]:
    return {"rlw": RandomLossWeighting}
