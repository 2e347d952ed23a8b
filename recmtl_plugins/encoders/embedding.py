"""Embedding encoder for categorical features: one fused table for all features of the same width
(ids offset per feature), sparse gradients so a step costs time in the ids seen, not the vocabulary.
Output: the concatenated embeddings, ``[batch, sum of widths]``."""
from __future__ import annotations

import torch
from torch import nn

from recmtl import Encoder, FeatureInfo, hookimpl
from recmtl.layers import embedding_width_groups, fused_embedding


class EmbeddingEncoder(Encoder):
    kind = "categorical"

    def __init__(self, features: list[FeatureInfo], dim: int = 16, sparse: bool = True, init_std: float = 0.05) -> None:
        super().__init__(features)
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        widths = [int(f.options.get("embedding_dim") or dim) for f in features]
        self.groups = embedding_width_groups(widths)
        self.tables = nn.ModuleList()
        for g, (w, pos) in enumerate(self.groups):
            table, offsets = fused_embedding([features[i].cardinality for i in pos], w, sparse, init_std)
            self.register_buffer(f"offsets_{g}", torch.from_numpy(offsets), persistent=True)
            self.register_buffer(f"positions_{g}", torch.tensor(pos, dtype=torch.long), persistent=True)
            self.tables.append(table)
        self._dim = sum(widths)
        self._single = len(self.groups) == 1

    @property
    def output_dim(self) -> int:
        return self._dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._single:
            return self.tables[0](x + self.offsets_0).flatten(1)
        parts = []
        for g, table in enumerate(self.tables):
            ids = x[:, getattr(self, f"positions_{g}")] + getattr(self, f"offsets_{g}")
            parts.append(table(ids).flatten(1))
        return torch.cat(parts, dim=1)


@hookimpl
def recmtl_register_encoders() -> dict[str, type[Encoder]]:
    return {"embedding": EmbeddingEncoder}
