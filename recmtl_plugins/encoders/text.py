"""fastText-style bag of n-grams for text features (Joulin et al., EACL 2017): each row's hashed unigram and
bigram ids (``kind: text``) embedded in one sparse table per feature and mean-pooled over the row's tokens; a
null or empty text pools to zeros.

Input ``[batch, n_features, max_tokens]`` ids in ``[1, cardinality)``, padding ``cardinality``. Output
``[batch, sum of widths]`` (``n_features * dim`` unless a feature sets its own ``embedding_dim``).
"""
from __future__ import annotations

import torch
from torch import nn

from recmtl import Encoder, FeatureInfo, hookimpl


class TextBagEncoder(Encoder):
    kind = "text"

    def __init__(self, features: list[FeatureInfo], dim: int = 16, sparse: bool = True, init_std: float = 0.05) -> None:
        super().__init__(features)
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.widths = [int(f.options.get("embedding_dim") or dim) for f in features]
        self.lengths = [int(f.options["max_length"]) for f in features]
        self.tables = nn.ModuleList()
        for f, w in zip(features, self.widths):
            table = nn.Embedding(f.cardinality + 1, w, sparse=sparse)  # the last row: padding (never pooled)
            nn.init.normal_(table.weight, std=init_std)
            self.tables.append(table)

    @property
    def output_dim(self) -> int:
        return sum(self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for j, f in enumerate(self.features):
            ids = x[:, j, :self.lengths[j]]
            keep = (ids != f.cardinality).unsqueeze(-1)
            emb = self.tables[j](ids) * keep.to(torch.float32)
            parts.append(emb.sum(1) / keep.sum(1).clamp_min(1).to(emb.dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@hookimpl
def recmtl_register_encoders() -> dict[str, type[Encoder]]:
    return {"text_bag": TextBagEncoder}
