"""Embedding encoder for categorical features: one fused table for all features of the same width
(ids offset per feature), sparse gradients so a step costs time in the ids seen, not the vocabulary.
Offers each feature's rows to encoders of other kinds (``vocabulary_tables``: a sequence sharing the
vocabulary). Output: the concatenated embeddings, ``[batch, sum of widths]``. Field view: one field per feature, its embedding
(``[batch, n_features, widest width]``, narrower embeddings zero-padded)."""
from __future__ import annotations

import torch
from torch import nn

from recmtl import Encoder, FeatureInfo, TableRows, hookimpl
from recmtl.layers import embedding_width_groups, fused_embedding


class EmbeddingEncoder(Encoder):
    kind = "categorical"
    has_fields = True

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
        self._widths = widths
        order = [i for _, pos in self.groups for i in pos]  # fields in group order -> feature order
        self.register_buffer("field_order", torch.tensor([order.index(i) for i in range(len(features))],
                                                         dtype=torch.long), persistent=False)

    @property
    def output_dim(self) -> int:
        return self._dim

    @property
    def field_dim(self) -> int:
        return max(self._widths)

    def field_columns(self) -> list[int]:
        return [i for _, pos in self.groups for i in pos for _ in range(self._widths[i])]

    def vocabulary_tables(self) -> dict[str, TableRows]:
        """Every feature's rows in its width's fused table (a sequence sharing its vocabulary embeds with them)."""
        out = {}
        for g, (_, pos) in enumerate(self.groups):
            offsets = getattr(self, f"offsets_{g}")
            for k, i in enumerate(pos):
                out[self.features[i].name] = TableRows(self.tables[g], int(offsets[k]), self.features[i].cardinality)
        return out

    def _groups(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per width group: its features' embeddings ``[batch, n_g, w_g]``."""
        if self._single:
            return [self.tables[0](x + self.offsets_0)]
        return [table(x[:, getattr(self, f"positions_{g}")] + getattr(self, f"offsets_{g}"))
                for g, table in enumerate(self.tables)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[0]

    def fields(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[1]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self._groups(x)
        if self._single:
            return parts[0].flatten(1), parts[0]
        flat = torch.cat([p.flatten(1) for p in parts], dim=1)
        w = self.field_dim
        padded = torch.cat([nn.functional.pad(p, (0, w - p.shape[-1])) for p in parts], dim=1)
        return flat, padded[:, self.field_order]


@hookimpl
def recmtl_register_encoders() -> dict[str, type[Encoder]]:
    return {"embedding": EmbeddingEncoder}
