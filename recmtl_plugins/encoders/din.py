"""Deep Interest Network target attention for sequence features (Zhou et al., KDD 2018).

For a sequence feature with ``target: ITEM`` (a categorical feature, the candidate being scored), each history
item's embedding ``h`` gets a weight from a small MLP (PReLU) over ``[h, t, h - t, h * t]``, ``t`` the candidate's
embedding; the feature's output is the weighted sum of its items (the user's interest in this candidate) and,
with ``include_target``, ``t`` itself. ``normalization: none`` keeps the paper's un-normalised weights (padding
weighs 0), ``softmax`` normalises them over a row's items. When the sequence shares the target's vocabulary
(``vocabulary: ITEM``) history and candidate are looked up in ONE table; else the candidate has a table of its
own. Those tables are the ``embedding`` encoder's rows of the categorical features when it offers them at the same
width (``share_tables``: one table per vocabulary in the model). A sequence feature without a target is
mean-pooled. A row with no items has interest zero.

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
from recmtl.layers import AttentionStats, HistoryTables, PReLU, check_units, fp32, mlp

NORMALIZATIONS = ("none", "softmax")


def _distinct(ids: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(ids, return_inverse=True)`` for ids in ``[0, size)``; without a sort when ``size`` is small
    against the number of ids (a presence mask and a lookup table of ``size`` entries)."""
    if size > 8 * ids.numel():
        return torch.unique(ids, return_inverse=True)
    present = torch.zeros(size, dtype=torch.bool, device=ids.device)
    present[ids] = True
    distinct = present.nonzero().squeeze(1)
    position = torch.empty(size, dtype=ids.dtype, device=ids.device)
    position[distinct] = torch.arange(distinct.shape[0], dtype=ids.dtype, device=ids.device)
    return distinct, position[ids]


class _AttentionMLP(nn.Module):
    """The activation unit: an MLP over ``[h, t, h - t, h * t]`` -> one score per history item. Its first layer is
    computed as ``A h + B t + C (h * t)`` (the same linear map of the concatenation, since ``W [h, t, h - t, h * t] =
    (W1 + W3) h + (W2 - W3) t + W4 (h * t)``), the candidate's term once per row rather than once per item."""

    def __init__(self, dim: int, units: list[int]) -> None:
        super().__init__()
        first = units[0] if units else 1
        self.item, self.target = nn.Linear(dim, first), nn.Linear(dim, first, bias=False)
        self.product = nn.Linear(dim, first, bias=False)
        rest = [PReLU()] + ([mlp(first, units[1:], activation=PReLU)] if len(units) > 1 else [])
        self.rest = nn.Sequential(*rest, nn.Linear(units[-1], 1)) if units else nn.Identity()

    def forward(self, items: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``items [N, d]``: every history item of the batch (padding left out), ``t [B, d]`` the candidates,
        ``rows [N]`` each item's row -> scores ``[N]``. The per-row parts (``t``, ``B t`` plus the bias) gathered per
        item, one matrix product ``[h, h * t] [A; C]``."""
        # two gathers rather than one of a concatenation: no split, whose backward is another [N, .] concatenation
        t_items = t.index_select(0, rows)  # [N, d]
        pre_t = (self.target(t) + self.item.bias).index_select(0, rows)  # [N, first]
        weight = torch.cat([self.item.weight, self.product.weight], dim=1)  # [first, 2d]
        pre = torch.addmm(pre_t, torch.cat([items, items * t_items], dim=1), weight.t())
        return self.rest(pre).squeeze(-1)


class DINEncoder(HistoryTables, Encoder):
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

    def forward(self, x: torch.Tensor, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        parts = []
        for j, f in enumerate(self.features):
            ids = x[:, j, :self.lengths[j]]
            mask = ids != f.cardinality
            if str(j) not in self.attention:
                rows, cols = mask.nonzero(as_tuple=True)
                items = self.history_table(j)(ids[rows, cols])
                sums = torch.zeros(ids.shape[0], items.shape[1], dtype=items.dtype, device=items.device)
                sums = sums.scatter_add(0, rows.unsqueeze(1).expand_as(items), items)
                parts.append(sums / mask.sum(1, keepdim=True).clamp_min(1).to(items.dtype))
                continue
            interest, t = self._attend(j, ids, mask, inputs)
            parts.append(interest)
            if self.include_target:
                parts.append(t)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _attend(self, j: int, ids: torch.Tensor, mask: torch.Tensor,
                inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature ``j``'s interest ``sum_i w_i h_i`` ``[B, w]`` and its candidate's embedding ``t`` ``[B, w]``.
        Only the history's items are embedded and scored (gathered by ``mask``; padding costs nothing), and with
        a shared table history and candidate are ONE lookup."""
        f = self.features[j]
        b = ids.shape[0]
        rows, cols = mask.nonzero(as_tuple=True)
        item_ids, t_ids = ids[rows, cols], inputs["categorical"][:, int(f.options["target"])]
        if f.options.get("shared") and not torch.onnx.is_in_onnx_export():  # (the graph: sizes traced as constants)
            # each distinct id looked up once: the sparse gradient has a row per distinct id, not per occurrence
            distinct, where = _distinct(torch.cat([item_ids, t_ids]), f.cardinality + 1)
            rows_of, n = self.history_table(j)(distinct), item_ids.shape[0]
            items, t = rows_of.index_select(0, where[:n]), rows_of.index_select(0, where[n:])  # no split: see above
        else:
            items, t = self.history_table(j)(item_ids), self.target_table(j)(t_ids)
        scores = fp32(self.attention[str(j)](items, t, rows))  # [N]; fp32 under bf16 autocast (the softmax)
        if self.normalization == "softmax":  # over each row's items
            dense = torch.full(mask.shape, torch.finfo(scores.dtype).min, dtype=scores.dtype, device=scores.device)
            scores = dense.index_put((rows, cols), scores).softmax(dim=1)[rows, cols]
        if not self.training:  # statistics of the evaluation passes (validation rows), not of every step
            weights = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).index_put((rows, cols), scores)
            self.stats.add(f.name, weights, mask)
        interest = torch.zeros(b, items.shape[1], dtype=items.dtype, device=items.device)
        if torch.onnx.is_in_onnx_export():  # the exporter's index_add is wrong for repeated indices (rows)
            return interest.scatter_add(0, rows.unsqueeze(1).expand_as(items), scores.unsqueeze(1) * items), t
        return interest.index_add(0, rows, scores.unsqueeze(1) * items), t

    def diagnostics(self) -> dict[str, Any]:
        return self.stats.result()


@hookimpl
def recmtl_register_encoders() -> dict[str, type[Encoder]]:
    return {"din": DINEncoder}
