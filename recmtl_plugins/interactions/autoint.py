"""AutoInt: multi-head self-attention over the fields, with residual connections.

Song et al., "AutoInt: Automatic Feature Interaction Learning via Self-Attentive Neural Networks", CIKM 2019.
Each of ``num_layers`` interacting layers lets every field attend to every field with ``num_heads`` heads of
width ``attention_dim`` (scaled dot products), adds a projection of its input (the residual) and applies a ReLU:
``e_j <- ReLU(concat_h(sum_k softmax_k(<q_j, k_k>) v_k) + W_res e_j)``. The last layer's fields are flattened,
``[batch, n_fields * num_heads * attention_dim]``; with ``keep_input`` (default) concatenated to the flat vector
(AutoInt+'s deep part is the tower on top). With ``keep_input`` and ``output_scale: true`` the attention output is
multiplied by a learned scalar that starts at 0 (ReZero-style), so the tower starts on the flat vector alone, as
the plain MLP does; off by default: on funnel data it did not help (benchmarks/RESULTS.md, "never lose").

Outside ONNX export the rows run through the layers in chunks (``row_chunk(...)`` rows, about 2 MiB of attention
scores each) and are concatenated: the same numbers, but the ``[rows, heads, n_fields, n_fields]`` scores and their
softmax stay in the CPU's cache, which roughly halves the step time with many fields (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from recmtl import Interaction, hookimpl
from recmtl.layers import fp32


def row_chunk(n_fields: int, heads: int, budget: int = 1 << 19) -> int:
    """Rows per chunk: ``budget`` attention scores (float32: 2 MiB), between 64 and 4096 rows."""
    return max(64, min(4096, budget // max(1, heads * n_fields * n_fields)))


class AutoInt(Interaction):
    min_fields = 2

    def __init__(self, input_dim: int, field_names: list[str], field_dim: int, num_layers: int = 2,
                 num_heads: int = 2, attention_dim: int = 8, keep_input: bool = True,
                 output_scale: bool = False) -> None:
        super().__init__(input_dim, field_names, field_dim)
        if num_layers < 1 or num_heads < 1 or attention_dim < 1:
            raise ValueError(f"num_layers, num_heads and attention_dim must be at least 1, got "
                             f"{num_layers}, {num_heads}, {attention_dim}")
        self.heads, self.head_dim, self.keep_input = int(num_heads), int(attention_dim), bool(keep_input)
        width = self.heads * self.head_dim
        self.qkv = nn.ModuleList()
        self.residual = nn.ModuleList()
        d = self.field_dim
        for _ in range(num_layers):
            self.qkv.append(nn.Linear(d, 3 * width, bias=False))
            self.residual.append(nn.Linear(d, width, bias=False))
            d = width
        self._width = width
        # a learned scale on the attention output beside the flat vector, zero at the start
        self.scale = nn.Parameter(torch.zeros(())) if (output_scale and self.keep_input) else None
        self.chunk = row_chunk(len(self.field_names), self.heads)  # 0: no chunks (the one-shot form)

    @property
    def output_dim(self) -> int:
        return len(self.field_names) * self._width + (self.input_dim if self.keep_input else 0)

    def attend(self, e: torch.Tensor) -> torch.Tensor:
        """The interacting layers on field embeddings ``[B, n, d]`` -> flattened ``[B, n * width]``."""
        b, n = e.shape[0], e.shape[1]
        for qkv, res in zip(self.qkv, self.residual):
            q, k, v = qkv(e).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, n, dh]
            att = torch.softmax(fp32(q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim), dim=-1)  # fp32 under autocast
            out = (att @ v).transpose(1, 2).reshape(b, n, self._width)
            e = torch.relu(out + res(e))
        return e.flatten(1)

    def forward(self, x: torch.Tensor, fields: torch.Tensor | None) -> torch.Tensor:
        if self.chunk and fields.shape[0] > self.chunk and not torch.onnx.is_in_onnx_export():
            flat = torch.cat([self.attend(part) for part in fields.split(self.chunk)], dim=0)
        else:  # one shot: the exported graph (any batch size), and batches of one chunk
            flat = self.attend(fields)
        if self.scale is not None:
            flat = self.scale * flat
        return torch.cat([x, flat], dim=1) if self.keep_input else flat


@hookimpl
def recmtl_register_interactions() -> dict[str, type[Interaction]]:
    return {"autoint": AutoInt}
