"""Deep Interest Network target attention for sequence features (Zhou et al., KDD 2018).

For a sequence feature with ``target: ITEM`` (a categorical feature, the candidate being scored), each history
item's embedding ``h`` gets a weight from a small MLP (PReLU) over ``[h, t, h - t, h * t]``, ``t`` the candidate's
embedding; the feature's output is the weighted sum of its items (the user's interest in this candidate) and,
with ``include_target``, ``t`` itself. ``normalization: none`` keeps the paper's un-normalised weights (padding
weighs 0), ``softmax`` normalises them over a row's items. When the sequence shares the target's vocabulary
(``vocabulary: ITEM``) history and candidate are looked up in ONE table; else the candidate has a table of its
own. A sequence feature without a target is mean-pooled. A row with no items has interest zero.

Input ``[batch, n_features, length]`` ids (padding: the feature's cardinality) and, through ``inputs``, the
categorical ids. Output ``[batch, sum over features of dim (x2 with a target and include_target)]``.
Diagnostics: the mean attention weight by history position (1 = the most recent item) per feature, over the
rows of the evaluation passes (the validation data).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from recmtl import Encoder, FeatureInfo, hookimpl
from recmtl.layers import AttentionStats, check_units, mlp

NORMALIZATIONS = ("none", "softmax")


class _AttentionMLP(nn.Module):
    """The activation unit: an MLP over ``[h, t, h - t, h * t]`` -> one score per history item. Its first layer is
    computed as ``A h + B t + C (h * t)`` (the same linear map of the concatenation, since ``W [h, t, h - t, h * t] =
    (W1 + W3) h + (W2 - W3) t + W4 (h * t)``), the candidate's term once per row rather than once per item."""

    def __init__(self, dim: int, units: list[int]) -> None:
        super().__init__()
        first = units[0] if units else 1
        self.item, self.target = nn.Linear(dim, first), nn.Linear(dim, first, bias=False)
        self.product = nn.Linear(dim, first, bias=False)
        rest = [nn.PReLU()] + ([mlp(first, units[1:], activation=nn.PReLU)] if len(units) > 1 else [])
        self.rest = nn.Sequential(*rest, nn.Linear(units[-1], 1)) if units else nn.Identity()

    def forward(self, h: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``h [B, L, d]``, ``t [B, d]``, ``mask [B, L]`` (False: padding) -> scores ``[B, L]``, 0 at padding. Only
        the items are scored (gathered, then scattered back): padding costs nothing."""
        rows, cols = mask.nonzero(as_tuple=True)
        items, targets = h[rows, cols], t[rows]
        pre = self.item(items) + self.target(t)[rows] + self.product(items * targets)
        scores = self.rest(pre).squeeze(-1)
        return torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).index_put((rows, cols), scores)


class DINEncoder(Encoder):
    kind = "sequence"
    uses_inputs = True

    def __init__(self, features: list[FeatureInfo], dim: int = 16, attention_units: list[int] = (36,),
                 normalization: str = "none", include_target: bool = True, sparse: bool = True,
                 init_std: float = 0.05) -> None:
        super().__init__(features)
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
        units = check_units("attention_units", attention_units)
        self.normalization = normalization
        self.include_target = bool(include_target)
        self.widths = [int(f.options.get("embedding_dim") or dim) for f in features]
        self.lengths = [int(f.options["max_length"]) for f in features]
        self.tables = nn.ModuleList()
        self.target_tables = nn.ModuleDict()
        self.attention = nn.ModuleDict()
        for j, (f, w) in enumerate(zip(features, self.widths)):
            table = nn.Embedding(f.cardinality + 1, w, sparse=sparse)  # the last row: padding (never pooled)
            nn.init.normal_(table.weight, std=init_std)
            self.tables.append(table)
            if "target" in f.options:
                if not f.options.get("shared"):
                    t = nn.Embedding(int(f.options["target_cardinality"]), w, sparse=sparse)
                    nn.init.normal_(t.weight, std=init_std)
                    self.target_tables[str(j)] = t
                self.attention[str(j)] = _AttentionMLP(w, units)
        self._dim = sum(w * (2 if "target" in f.options and self.include_target else 1)
                        for f, w in zip(features, self.widths))
        self.stats = AttentionStats([f.name for f in features if "target" in f.options], max(self.lengths))

    @property
    def output_dim(self) -> int:
        return self._dim

    def target_embedding(self, j: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        f = self.features[j]
        ids = inputs["categorical"][:, int(f.options["target"])]
        table = self.tables[j] if f.options.get("shared") else self.target_tables[str(j)]
        return table(ids)

    def forward(self, x: torch.Tensor, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        parts = []
        for j, f in enumerate(self.features):
            ids = x[:, j, :self.lengths[j]]
            mask = ids != f.cardinality
            h = self.tables[j](ids)  # [B, L, w]
            maskf = mask.unsqueeze(-1).to(h.dtype)
            if str(j) not in self.attention:
                parts.append((h * maskf).sum(1) / maskf.sum(1).clamp_min(1))
                continue
            t = self.target_embedding(j, inputs)  # [B, w]
            scores = self.attention[str(j)](h, t, mask)  # [B, L]
            if self.normalization == "softmax":
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(dim=1)
            weights = scores * mask.to(scores.dtype)
            if not self.training:  # statistics of the evaluation passes (validation rows), not of every step
                self.stats.add(f.name, weights, mask)
            parts.append((weights.unsqueeze(-1) * h).sum(1))
            if self.include_target:
                parts.append(t)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def diagnostics(self) -> dict[str, Any]:
        return self.stats.result()


@hookimpl
def recmtl_register_encoders() -> dict[str, type[Encoder]]:
    return {"din": DINEncoder}
