"""Pooled embeddings for sequence features (list columns, e.g. a user's recently clicked item ids).

One fused embedding table (per embedding width) holds every sequence feature's ids, offset per feature, with
sparse gradients like the ``embedding`` encoder (so ``SparseAdam`` updates only the rows of the batch). A
row's item embeddings are pooled over its non-padding positions: ``mean`` (the YouTube DNN's averaged watch
history, Covington et al. RecSys 2016), ``sum`` or ``max``; a row with no items pools to zeros.

Input: LongTensor ``[batch, n_features, length]`` of ids in ``[0, cardinality)`` (0: null, unseen or rare
items), the padding positions holding the feature's ``cardinality``. Output ``[batch, sum of widths]``
(``n_features * dim`` when no feature sets its own ``embedding_dim``). Field view: one field per feature, its pooled
embedding (``[batch, n_features, widest width]``, narrower ones zero-padded). A feature sharing a categorical
feature's vocabulary (``vocabulary: ITEM``) pools that feature's rows of the ``embedding`` encoder when it offers
them at the same width (``share_tables``: one table per vocabulary); its rows in the fused table are then never
used (nor updated: sparse gradients).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from recmtl import Encoder, FeatureInfo, TableRows, hookimpl
from recmtl.layers import embedding_width_groups, fused_embedding

POOLINGS = ("mean", "sum", "max")


class SequencePoolEncoder(Encoder):
    kind = "sequence"
    has_fields = True

    def __init__(self, features: list[FeatureInfo], dim: int = 16, pooling: str = "mean", sparse: bool = True,
                 init_std: float = 0.05) -> None:
        super().__init__(features)
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.pooling = pooling
        self._sparse, self._init_std = sparse, init_std
        widths = [int(f.options.get("embedding_dim") or dim) for f in features]
        self.groups = embedding_width_groups(widths)
        self.tables = nn.ModuleList()
        for g, (w, pos) in enumerate(self.groups):
            cards = np.array([features[i].cardinality for i in pos], dtype=np.int64)
            # each feature's rows: its ids 0..cardinality-1 and one padding row (never pooled)
            table, offsets = fused_embedding(cards + 1, w, sparse, init_std)
            self.register_buffer(f"offsets_{g}", torch.from_numpy(offsets)[None, :, None], persistent=True)
            self.register_buffer(f"padding_{g}", torch.from_numpy(cards)[None, :, None], persistent=True)
            self.register_buffer(f"positions_{g}", torch.tensor(pos, dtype=torch.long), persistent=True)
            self.tables.append(table)
        self._dim = sum(widths)
        self._single = len(self.groups) == 1
        self._widths = widths
        order = [i for _, pos in self.groups for i in pos]  # fields in group order -> feature order
        self.register_buffer("field_order", torch.tensor([order.index(i) for i in range(len(features))],
                                                         dtype=torch.long), persistent=False)
        self._borrowed: dict[int, TableRows] = {}  # feature position -> another encoder's rows (share_tables)

    def share_tables(self, tables: Mapping[str, TableRows]) -> None:
        """Pool a feature sharing a categorical feature's vocabulary with that feature's rows."""
        for i, f in enumerate(self.features):
            rows = tables.get(f.options.get("vocabulary")) if isinstance(f.options.get("vocabulary"), str) else None
            if rows is not None and rows.size == f.cardinality and rows.width == self._widths[i]:
                self._borrowed[i] = rows
        for g, (w, pos) in enumerate(self.groups):  # the fused tables without the borrowed features' rows
            if any(i in self._borrowed for i in pos):
                sizes = [0 if i in self._borrowed else self.features[i].cardinality + 1 for i in pos]
                table, offsets = fused_embedding(sizes, w, self._sparse, self._init_std)
                self.tables[g] = table
                getattr(self, f"offsets_{g}").copy_(torch.from_numpy(offsets)[None, :, None])

    @property
    def output_dim(self) -> int:
        return self._dim

    @property
    def field_dim(self) -> int:
        return max(self._widths)

    def field_columns(self) -> list[int]:
        return [i for _, pos in self.groups for i in pos for _ in range(self._widths[i])]

    def _pool(self, ids: torch.Tensor, g: int) -> torch.Tensor:
        """``ids [batch, F, L]`` of group ``g`` -> ``[batch, F, width]``; a borrowed feature pools only its items,
        looked up in the other encoder's rows."""
        mask = ids != getattr(self, f"padding_{g}")  # [B, F, L]
        pos = self.groups[g][1]
        borrowed = [k for k, i in enumerate(pos) if i in self._borrowed]
        if not borrowed:
            return self._pooled(self.tables[g](ids + getattr(self, f"offsets_{g}")), mask)
        parts: dict[int, torch.Tensor] = {}
        own = [k for k in range(len(pos)) if k not in borrowed]
        if own:
            sel = torch.tensor(own, dtype=torch.long, device=ids.device)
            pooled = self._pooled(self.tables[g](ids[:, sel] + getattr(self, f"offsets_{g}")[:, sel]), mask[:, sel])
            parts.update({k: pooled[:, n] for n, k in enumerate(own)})
        for k in borrowed:
            rows, cols = mask[:, k].nonzero(as_tuple=True)
            items = self._borrowed[pos[k]](ids[:, k][rows, cols])  # [N, w]
            if self.pooling == "max":  # the items in their places (padding zeros, masked), then as the others
                emb = torch.zeros(*ids[:, k].shape, items.shape[1], dtype=items.dtype,
                                  device=items.device).index_put((rows, cols), items)
                parts[k] = self._pooled(emb.unsqueeze(1), mask[:, k:k + 1])[:, 0]
                continue
            sums = torch.zeros(ids.shape[0], items.shape[1], dtype=items.dtype, device=items.device)
            parts[k] = sums.scatter_add(0, rows.unsqueeze(1).expand_as(items), items)
            if self.pooling == "mean":
                parts[k] = parts[k] / mask[:, k].sum(1, keepdim=True).clamp_min(1).to(items.dtype)
        return torch.stack([parts[k] for k in range(len(pos))], dim=1)

    def _pooled(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``emb [batch, F, L, width]``, ``mask [batch, F, L]`` -> ``[batch, F, width]``."""
        mask = mask.unsqueeze(-1)  # [B, F, L, 1]
        if self.pooling == "max":
            pooled = emb.masked_fill(~mask, float("-inf")).amax(dim=2)
            pooled = torch.where(mask.any(dim=2), pooled, torch.zeros_like(pooled))
        else:
            pooled = (emb * mask.to(emb.dtype)).sum(dim=2)
            if self.pooling == "mean":
                pooled = pooled / mask.sum(dim=2).clamp_min(1).to(emb.dtype)
        return pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[0]

    def fields(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[1]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._single:
            pooled = self._pool(x, 0)
            return pooled.flatten(1), pooled
        parts = [self._pool(x[:, getattr(self, f"positions_{g}")], g) for g in range(len(self.tables))]
        w = self.field_dim
        padded = torch.cat([nn.functional.pad(p, (0, w - p.shape[-1])) for p in parts], dim=1)
        return torch.cat([p.flatten(1) for p in parts], dim=1), padded[:, self.field_order]


@hookimpl
def recmtl_register_encoders() -> dict[str, type[Encoder]]:
    return {"sequence_pool": SequencePoolEncoder}
