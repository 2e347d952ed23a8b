"""FM: the factorisation machine's second-order term as bi-interaction pooling over the fields.

Rendle, "Factorization Machines", ICDM 2010; as the FM component of DeepFM (Guo et al., IJCAI 2017) and the
bi-interaction pooling of NFM (He & Chua, SIGIR 2017): ``0.5 * ((sum_j e_j)^2 - sum_j e_j^2)``, the sum of the
element-wise products of every pair of field embeddings, ``[batch, field_dim]``, in time linear in the fields.
With ``keep_input`` (default) it is concatenated to the flat vector, so the tower sees both.

The sum grows with the number of pairs ``n (n - 1) / 2`` and the embeddings' norms, the flat vector does not.
``normalize`` rescales the pairwise term before it reaches the tower: ``none`` (default) as is; ``batch`` a
BatchNorm over its ``field_dim`` units (NFM's choice: batch statistics in training, running ones in evaluation
and export); ``layer`` a LayerNorm per row; ``pairs`` divides it by the number of pairs (the mean pairwise
product). ``scale: true`` then multiplies it by a learned scalar that starts at 0 (ReZero-style, as autoint's
``output_scale``), so the tower starts on the flat vector alone, as the plain MLP does. benchmarks/RESULTS.md,
"Census-income at the full training data", has the measurements.
"""
from __future__ import annotations

import torch
from torch import nn

from recmtl import Interaction, hookimpl
from recmtl.layers import fp32

NORMALIZE = ("none", "batch", "layer", "pairs")


class FM(Interaction):
    min_fields = 2

    def __init__(self, input_dim: int, field_names: list[str], field_dim: int, keep_input: bool = True,
                 normalize: str = "none", scale: bool = False) -> None:
        super().__init__(input_dim, field_names, field_dim)
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
        if not isinstance(scale, bool):
            raise ValueError(f"scale must be true or false, got {scale!r}")
        self.keep_input = bool(keep_input)
        self.scale = nn.Parameter(torch.zeros(())) if scale else None
        self.normalize = normalize
        n = len(self.field_names)
        self.num_pairs = n * (n - 1) // 2
        self.norm: nn.Module | None = (nn.BatchNorm1d(self.field_dim) if normalize == "batch"
                                       else nn.LayerNorm(self.field_dim) if normalize == "layer" else None)

    @property
    def output_dim(self) -> int:
        return self.field_dim + (self.input_dim if self.keep_input else 0)

    def forward(self, x: torch.Tensor, fields: torch.Tensor | None) -> torch.Tensor:
        fields = fp32(fields)  # a difference of two large sums: in bf16 (8-bit mantissa) it cancels badly
        total = fields.sum(dim=1)
        pairs = 0.5 * (total * total - (fields * fields).sum(dim=1))  # [B, d]
        if self.normalize == "pairs":
            pairs = pairs / max(1, self.num_pairs)
        elif isinstance(self.norm, nn.BatchNorm1d) and self.training and pairs.shape[0] == 1:
            pairs = nn.functional.batch_norm(pairs, self.norm.running_mean, self.norm.running_var, self.norm.weight,
                                             self.norm.bias, training=False, eps=self.norm.eps)  # one row: no batch statistics
        elif self.norm is not None:
            pairs = self.norm(pairs)
        if self.scale is not None:
            pairs = self.scale * pairs
        return torch.cat([x, pairs], dim=1) if self.keep_input else pairs


@hookimpl
def recmtl_register_interactions() -> dict[str, type[Interaction]]:
    return {"fm": FM}
