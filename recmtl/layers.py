"""Building blocks shared by plugins (kept in the core so plugins never import each other)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp(input_dim: int, units: Sequence[int], dropout: float = 0.0, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear -> activation (-> dropout) for each width in ``units``; empty ``units`` is the identity."""
    layers: list[nn.Module] = []
    width = input_dim
    for u in units:
        layers += [nn.Linear(width, int(u)), activation()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(u)
    return nn.Sequential(*layers)


def check_units(name: str, units: Sequence[int]) -> list[int]:
    units = [int(u) for u in units]
    if any(u <= 0 for u in units):
        raise ValueError(f"{name} must be positive layer widths, got {units}")
    return units
