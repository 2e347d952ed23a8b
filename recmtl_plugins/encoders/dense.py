"""Dense encoder: the standardised numeric features as they are, ``[batch, n_features]``."""
from __future__ import annotations

import torch

from recmtl import Encoder, FeatureInfo, hookimpl


class DenseEncoder(Encoder):
    kind = "dense"

    def __init__(self, features: list[FeatureInfo]) -> None:
        super().__init__(features)

    @property
    def output_dim(self) -> int:
        return len(self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@hookimpl
def recmtl_register_encoders() -> dict[str, type[Encoder]]:
    return {"dense": DenseEncoder}
