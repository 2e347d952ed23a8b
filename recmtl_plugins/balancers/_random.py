"""A piece shared by the built-in balancers that draw random numbers (not a plugin: no hooks here)."""
from __future__ import annotations

import torch


class SeededGenerator:
    """Mixin (list it before the Balancer base): the balancer's own ``torch.Generator``, saved in and
    restored from checkpoints, so a ``--resume``d run continues the same random sequence."""

    generator: torch.Generator

    def init_generator(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(int(seed))

    def get_extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
