"""Behavior Sequence Transformer for sequence features (BST, Chen et al., DLP-KDD 2019).

A sequence feature with ``target: ITEM`` becomes the tokens ``[history items..., candidate]``, each embedding
plus a learned position (recency) embedding (0: the candidate, 1: the most recent item, 2: the one before,
...); ``num_layers`` self-attention blocks (``num_heads`` heads, layer norm first unless ``norm_first: false``, feed-forward of
``ffn_dim`` = 4 x dim by default, LeakyReLU as in the paper) with a key padding mask; the output is the
candidate's position (``output: target``) or the mean over the row's items and the candidate (``mean``).
A feature without a target attends over its items only and is mean-pooled. As in ``din``, history and
candidate share one table when the sequence shares the target's vocabulary, the ``embedding`` encoder's rows of
those categorical features when it offers them at the same width (``share_tables``). Only the items are embedded
(padding positions hold zeros, masked as keys).

Input ``[batch, n_features, length]`` ids (padding: the feature's cardinality) and, through ``inputs``, the
categorical ids. Output ``[batch, sum over features of dim]``. Diagnostics: the candidate's attention (last
block, mean over heads) by history position (1 = the most recent item), over the evaluation passes' rows.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from recmtl import Encoder, FeatureInfo, hookimpl
from recmtl.layers import AttentionStats, HistoryTables, fp32

OUTPUTS = ("target", "mean")


class _Block(nn.Module):
    """Multi-head self-attention with a key padding mask, then a feed-forward layer, each with a residual;
    layer norm before each (``norm_first``, stable without a learning-rate warm-up: Xiong et al., ICML 2020) or
    after (the original Transformer's and BST's)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, norm_first: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.norm_first = norm_first
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.LeakyReLU(), nn.Linear(ffn_dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, d]``, ``keep [B, T]`` (False: padding) -> new ``x`` and the attention ``[B, heads, T', T]``;
        with ``last_only`` only the last position is computed (T' = 1: the candidate's output, linear in T)."""
        b, t, d = x.shape
        y = self.norm1(x) if self.norm_first else x
        q, k, v = self.qkv(y).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if last_only:
            q, x = q[:, :, -1:], x[:, -1:]
        scores = fp32(q @ k.transpose(-1, -2)) * self.scale  # the softmax in fp32 under bf16 autocast
        scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
        att = scores.softmax(dim=-1)
        mixed = (self.drop(att) @ v).transpose(1, 2).reshape(b, q.shape[2], d)
        if self.norm_first:
            x = x + self.drop(self.out(mixed))
            return x + self.drop(self.ffn(self.norm2(x))), att
        x = self.norm1(x + self.drop(self.out(mixed)))
        return self.norm2(x + self.drop(self.ffn(x))), att


class TransformerEncoder(HistoryTables, Encoder):
    kind = "sequence"
    uses_inputs = True

    def __init__(self, features: list[FeatureInfo], dim: int = 16, num_layers: int = 1, num_heads: int = 2,
                 ffn_dim: int | None = None, dropout: float = 0.1, output: str = "target", norm_first: bool = True,
                 sparse: bool = True, init_std: float = 0.05) -> None:
        super().__init__(features)
        if dim < 1 or num_layers < 1 or num_heads < 1:
            raise ValueError(f"dim, num_layers and num_heads must be positive, got {dim}, {num_layers}, {num_heads}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.output = output
        self.widths = [int(f.options.get("embedding_dim") or dim) for f in features]
        for f, w in zip(features, self.widths):
            if w % num_heads:
                raise ValueError(f"feature '{f.name}': embedding width {w} is not divisible by num_heads={num_heads}")
        self.lengths = [int(f.options["max_length"]) for f in features]
        self.tables, self.positions, self.blocks = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.target_tables = nn.ModuleDict()
        for j, (f, w, length) in enumerate(zip(features, self.widths, self.lengths)):
            table = nn.Embedding(f.cardinality + 1, w, sparse=sparse)  # the last row: padding
            nn.init.normal_(table.weight, std=init_std)
            self.tables.append(table)
            if "target" in f.options and not f.options.get("shared"):
                t = nn.Embedding(int(f.options["target_cardinality"]), w, sparse=sparse)
                nn.init.normal_(t.weight, std=init_std)
                self.target_tables[str(j)] = t
            pos = nn.Embedding(length + 1, w)
            nn.init.normal_(pos.weight, std=init_std)
            self.positions.append(pos)
            self.blocks.append(nn.ModuleList(_Block(w, num_heads, int(ffn_dim or 4 * w), dropout, norm_first)
                                             for _ in range(num_layers)))
        self._dim = sum(self.widths)
        self.stats = AttentionStats([f.name for f in features if "target" in f.options], max(self.lengths))

    @property
    def output_dim(self) -> int:
        return self._dim

    def forward(self, x: torch.Tensor, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        parts = []
        for j, f in enumerate(self.features):
            length = self.lengths[j]
            ids = x[:, j, :length]
            keep = ids != f.cardinality
            recency = (keep.sum(1, keepdim=True) - torch.arange(length, device=ids.device)[None, :]).clamp(1, length)
            rows, cols = keep.nonzero(as_tuple=True)
            items = self.history_table(j)(ids[rows, cols])
            h = torch.zeros(*ids.shape, items.shape[1], dtype=items.dtype, device=items.device).index_put((rows, cols), items)
            h = h + self.positions[j](recency)  # [B, L, w]
            has_target = "target" in f.options
            if has_target:
                t_ids = inputs["categorical"][:, int(f.options["target"])]
                t = self.target_table(j)(t_ids) + self.positions[j].weight[0]
                h = torch.cat([h, t.unsqueeze(1)], dim=1)
                keep = torch.cat([keep, torch.ones_like(keep[:, :1])], dim=1)
            att = None
            last_only = has_target and self.output == "target"  # the last block: the candidate's position only
            for i, block in enumerate(self.blocks[j]):
                h, att = block(h, keep, last_only and i == len(self.blocks[j]) - 1)
            if has_target and not self.training:  # statistics of the evaluation passes (validation rows)
                self.stats.add(f.name, att[:, :, -1, :length].mean(1), keep[:, :length].to(att.dtype))
            if has_target and self.output == "target":
                parts.append(h[:, -1])
            else:
                keepf = keep.unsqueeze(-1).to(h.dtype)
                parts.append((h * keepf).sum(1) / keepf.sum(1).clamp_min(1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def diagnostics(self) -> dict[str, Any]:
        return self.stats.result()


@hookimpl
def recmtl_register_encoders() -> dict[str, type[Encoder]]:
    return {"transformer": TransformerEncoder}
