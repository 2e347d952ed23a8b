"""FM: the factorisation machine's second-order term as bi-interaction pooling over the fields.

Rendle, "Factorization Machines", ICDM 2010; as the FM component of DeepFM (Guo et al., IJCAI 2017) and the
bi-interaction pooling of NFM (He & Chua, SIGIR 2017): ``0.5 * ((sum_j e_j)^2 - sum_j e_j^2)``, the sum of the
element-wise products of every pair of field embeddings, ``[batch, field_dim]``, in time linear in the fields.
With ``keep_input`` (default) it is concatenated to the flat vector, so the tower sees both.
"""
from __future__ import annotations

import torch

from recmtl import Interaction, hookimpl
from recmtl.layers import fp32


class FM(Interaction):
    min_fields = 2

    def __init__(self, input_dim: int, field_names: list[str], field_dim: int, keep_input: bool = True) -> None:
        super().__init__(input_dim, field_names, field_dim)
        self.keep_input = bool(keep_input)

    @property
    def output_dim(self) -> int:
        return self.field_dim + (self.input_dim if self.keep_input else 0)

    def forward(self, x: torch.Tensor, fields: torch.Tensor | None) -> torch.Tensor:
        fields = fp32(fields)  # a difference of two large sums: in bf16 (8-bit mantissa) it cancels badly
        total = fields.sum(dim=1)
        pairs = 0.5 * (total * total - (fields * fields).sum(dim=1))  # [B, d]
        return torch.cat([x, pairs], dim=1) if self.keep_input else pairs


@hookimpl
def recmtl_register_interactions() -> dict[str, type[Interaction]]:
    return {"fm": FM}
