"""Dense encoder: the standardised numeric features as they are, ``[batch, n_features]``. Field view: one field of
width 1 per feature (the model projects it to the common field width)."""
from __future__ import annotations

import torch

from recmtl import Encoder, FeatureInfo, hookimpl


class DenseEncoder(Encoder):
    kind = "dense"
    has_fields = True

    def __init__(self, features: list[FeatureInfo]) -> None:
        super().__init__(features)

    @property
    def output_dim(self) -> int:
        return len(self.features)

    @property
    def field_dim(self) -> int:
        return 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def fields(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-1)


@hookimpl
def recmtl_register_encoders() -> dict[str, type[Encoder]]:
    return {"dense": DenseEncoder}
