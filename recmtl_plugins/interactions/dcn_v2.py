"""DCN-v2: the cross network of Wang et al., "DCN V2: Improved Deep & Cross Network and Practical Lessons for
Web-scale Learning to Rank Systems", WWW 2021.

Each of ``num_layers`` cross layers computes ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` on the flat vector ``x_0``
(explicit feature crosses of growing order). ``W_l`` is low-rank ``U_l V_l^T`` (``rank: r``; ``auto``, the default:
``max(1, d // 8)`` for a ``d``-wide flat vector), full-rank (``rank: null``, the paper's first form), or a mixture
of ``num_experts`` low-rank experts ``U_i tanh(C_i tanh(V_i^T x_l))`` mixed by a softmax gate on ``x_l`` (the
paper's DCN-Mix). ``structure: stacked`` feeds the cross output to the tower (the tower is
the deep part on top); ``parallel`` runs a deep MLP (``deep_units``) on ``x_0`` beside the cross network and gives
the tower both outputs, concatenated.

``init: identity`` (default) starts every cross layer at ``x_{l+1} = x_l``: ``W_l`` (full-rank), ``U_l`` (low-rank
and the experts) and ``b_l`` are zero, so a stacked block starts as the plain MLP. ``init: random`` is torch's
default initialisation of ``W_l`` (and scaled normals for ``U_l``, ``V_l``, ``C_l``). The formula is the paper's
either way. ``l2`` adds ``l2 * sum(W^2)`` over the cross weights to the training loss
(``regularization()``; off by default: 1e-4 closed the plain funnel's conversion loss but lost most of the
pairwise gain, RESULTS.md, "l2 and dropout on dcn_v2's cross weights"); ``cross_dropout`` drops units of
each layer's cross term ``W_l x_l + b_l`` in training (the residual ``x_l`` is kept). ``gate: true`` scales each
layer's cross term by a learned scalar ``g_l`` that starts at 0; ``lr_scale`` trains the cross layers at that
multiple of the optimiser's learning rate (``lr_scales()``); both off by default (RESULTS.md, "a zero-initialised
gate, a lower learning rate"). ``weight_decay`` is decoupled (AdamW-style) decay of the cross weights only,
``W <- W - lr * weight_decay * W`` each step at their learning rate, whatever the optimiser
(``optimizer_groups()``); ``gate_l1`` adds ``gate_l1 * sum(|g_l|)`` to the loss (with ``gate``);
``cross_fields`` / ``exclude_fields`` restrict the cross layers to the flat vector's columns of those fields (the
block is built with ``field_columns``), the other columns pass through unchanged; all off by default (RESULTS.md,
"decoupled weight decay, L1 on the gates, crossing chosen fields"). The defaults (low-rank, identity) are the
measured ones: on funnel data without pairwise terms the full-rank, randomly initialised cross layers cost
0.006 conversion AUC against the plain MLP
(benchmarks/RESULTS.md, "never lose").
"""
from __future__ import annotations

import math

import torch
from torch import nn

from recmtl import Interaction, hookimpl
from recmtl.layers import check_units, fp32, mlp

STRUCTURES = ("stacked", "parallel")
INITS = ("identity", "random")


def _names(key: str, value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a list of feature (field) names, got {value!r}")
    return list(value)


def crossed_fields(field_names: list[str], cross_fields: list[str] | None, exclude_fields: list[str]) -> list[str]:
    """The fields the cross layers act on: ``cross_fields`` (all fields when None) less ``exclude_fields``; a name
    that is not a field, or no field left, is a ValueError naming it."""
    for key, names in (("cross_fields", _names("cross_fields", cross_fields) or []),
                       ("exclude_fields", _names("exclude_fields", exclude_fields) or [])):
        unknown = [n for n in names if n not in field_names]
        if unknown:
            raise ValueError(f"{key} names {', '.join(map(repr, unknown))}, not a field of the inputs "
                             f"(fields: {', '.join(field_names)})")
    chosen = [n for n in (field_names if cross_fields is None else cross_fields) if n not in set(exclude_fields or [])]
    if not chosen:
        raise ValueError("cross_fields / exclude_fields leave no field to cross")
    return chosen


class DCNv2(Interaction):
    uses_fields = False
    uses_field_columns = True

    @classmethod
    def check_fields(cls, field_names: list[str], params: dict) -> None:
        """``cross_fields`` and ``exclude_fields`` name fields of the config (before any data is read)."""
        crossed_fields(field_names, params.get("cross_fields"), params.get("exclude_fields") or [])

    def __init__(self, input_dim: int, field_names: list[str], field_dim: int, num_layers: int = 3,
                 structure: str = "stacked", rank: int | str | None = "auto", num_experts: int = 1,
                 deep_units: list[int] = (256, 128), dropout: float = 0.0, init: str = "identity",
                 l2: float = 0.0, cross_dropout: float = 0.0, gate: bool = False, lr_scale: float = 1.0,
                 weight_decay: float = 0.0, gate_l1: float = 0.0, cross_fields: list[str] | None = None,
                 exclude_fields: list[str] = (), field_columns: list[int] | None = None) -> None:
        super().__init__(input_dim, field_names, field_dim)
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be stacked or parallel, got {structure!r}")
        if rank not in ("auto", None) and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise ValueError(f"rank must be a positive number, auto (input width // 8) or null (full-rank), got {rank!r}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {num_experts}")
        if init not in INITS:
            raise ValueError(f"init must be identity or random, got {init!r}")
        if not l2 >= 0:
            raise ValueError(f"l2 must be a non-negative number, got {l2!r}")
        if not 0 <= cross_dropout < 1:
            raise ValueError(f"cross_dropout must be in [0, 1), got {cross_dropout!r}")
        if not isinstance(gate, bool):
            raise ValueError(f"gate must be true or false, got {gate!r}")
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not lr_scale > 0:
            raise ValueError(f"lr_scale must be a positive number, got {lr_scale!r}")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
            raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
        if isinstance(gate_l1, bool) or not isinstance(gate_l1, (int, float)) or not gate_l1 >= 0:
            raise ValueError(f"gate_l1 must be a non-negative number, got {gate_l1!r}")
        if gate_l1 > 0 and not gate:
            raise ValueError("gate_l1 penalises the gates: set gate: true too")
        exclude_fields = list(exclude_fields or [])
        cols = None  # the columns of the flat vector the cross layers act on (None: all)
        if cross_fields is not None or exclude_fields:
            chosen = set(crossed_fields(self.field_names, cross_fields, exclude_fields))
            if field_columns is None or len(field_columns) != self.input_dim:
                raise ValueError("cross_fields / exclude_fields need field_columns, the field of each of the "
                                 f"{self.input_dim} input columns")
            cols = [c for c, f in enumerate(field_columns) if self.field_names[f] in chosen]
        if rank == "auto":
            rank = max(1, (self.input_dim if cols is None else len(cols)) // 8)
        if num_experts > 1 and rank is None:
            raise ValueError("a mixture of experts (num_experts > 1) is one of low-rank experts: set rank too")
        d = self.input_dim if cols is None else len(cols)
        # the crossed columns, gathered, and their way back into the flat vector (not saved: rebuilt from the config)
        scatter = None
        if cols is not None:
            scatter = torch.zeros(d, self.input_dim)
            scatter[torch.arange(d), torch.tensor(cols)] = 1.0
        self.register_buffer("cols", None if cols is None else torch.tensor(cols), persistent=False)
        self.register_buffer("scatter", scatter, persistent=False)
        self.structure, self.rank, self.num_experts = structure, rank, int(num_experts)
        self.num_layers = int(num_layers)
        self.bias = nn.Parameter(torch.zeros(self.num_layers, self.num_experts, d))
        if rank is None:
            self.full = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(self.num_layers))
        else:
            k, r = self.num_experts, int(rank)
            self.v = nn.Parameter(torch.randn(self.num_layers, k, d, r) / math.sqrt(d))
            self.u = nn.Parameter(torch.randn(self.num_layers, k, r, d) / math.sqrt(r))
            if k > 1:
                self.c = nn.Parameter(torch.randn(self.num_layers, k, r, r) / math.sqrt(r))
                self.gate = nn.ModuleList(nn.Linear(d, k) for _ in range(self.num_layers))
        # gate: the zero gates give the identity start; W_l / U_l keep their random draw (at zero, no gradient
        # would reach either the gate or the weights)
        if init == "identity" and not gate:  # W_l = U_l = 0 (and b_l = 0): every cross layer starts as x_{l+1} = x_l
            with torch.no_grad():
                if rank is None:
                    for layer in self.full:
                        layer.weight.zero_()
                else:
                    self.u.zero_()
        self.init = init
        self.gates = nn.Parameter(torch.zeros(self.num_layers)) if gate else None
        self.lr_scale = float(lr_scale)
        self.l2 = float(l2)
        self.weight_decay, self.gate_l1 = float(weight_decay), float(gate_l1)
        self.cross_dropout = nn.Dropout(float(cross_dropout))
        deep_units = check_units("deep_units", deep_units)
        self.deep = mlp(self.input_dim, deep_units, dropout) if structure == "parallel" else None
        self._deep_out = (deep_units[-1] if deep_units else self.input_dim) if structure == "parallel" else 0

    @property
    def output_dim(self) -> int:
        return self.input_dim + self._deep_out

    def cross(self, x0: torch.Tensor, xl: torch.Tensor, layer: int) -> torch.Tensor:
        """One cross layer: ``xl + g * x0 * (W xl + b)`` (``g`` is 1 without ``gate``)."""
        if self.num_experts == 1:
            if self.rank is None:
                term = self.full[layer](xl) + self.bias[layer, 0]
            else:
                term = (xl @ self.v[layer, 0]) @ self.u[layer, 0] + self.bias[layer, 0]
            term = x0 * self.cross_dropout(term)
            return xl + (self.gates[layer] * term if self.gates is not None else term)
        low = torch.tanh(torch.einsum("bd,kdr->kbr", xl, self.v[layer]))
        low = torch.tanh(torch.einsum("kbr,krs->kbs", low, self.c[layer]))
        experts = x0.unsqueeze(0) * self.cross_dropout(torch.einsum("kbr,krd->kbd", low, self.u[layer])
                                                        + self.bias[layer].unsqueeze(1))
        gate = torch.softmax(fp32(self.gate[layer](xl)), dim=-1)  # [B, K]; fp32 under bf16 autocast
        term = torch.einsum("bk,kbd->bd", gate, experts)
        return xl + (self.gates[layer] * term if self.gates is not None else term)

    def cross_weights(self) -> list[torch.Tensor]:
        """The cross layers' weight matrices (``W_l``, or ``U_l``, ``V_l`` and ``C_l``; not the biases)."""
        if self.rank is None:
            return [layer.weight for layer in self.full]
        return [self.u, self.v] + ([self.c] if self.num_experts > 1 else [])

    def regularization(self) -> torch.Tensor:
        """``l2`` times the sum of squares of the cross weights plus ``gate_l1`` times the sum of the gates'
        absolute values (zero without either)."""
        reg = torch.zeros(())
        if self.l2 > 0:
            reg = reg + self.l2 * sum(w.pow(2).sum() for w in self.cross_weights())
        if self.gate_l1 > 0 and self.gates is not None:
            reg = reg + self.gate_l1 * self.gates.abs().sum()
        return reg

    def lr_scales(self) -> list[tuple[list[nn.Parameter], float]]:
        """The cross layers' parameters (weights, biases, gates) at ``lr_scale`` x the optimiser's rate."""
        if self.lr_scale == 1.0:
            return []
        deep = {id(p) for p in self.deep.parameters()} if self.deep is not None else set()
        return [([p for p in self.parameters() if id(p) not in deep], self.lr_scale)]

    def optimizer_groups(self) -> list[tuple[list[nn.Parameter], dict[str, float]]]:
        """The cross weights at ``lr_scale`` with decoupled ``weight_decay``, then the other cross-layer
        parameters (biases, gates) at ``lr_scale``; nothing when both are off."""
        groups = []
        if self.weight_decay > 0:
            groups.append((list(self.cross_weights()), {"lr_scale": self.lr_scale, "weight_decay": self.weight_decay}))
        return groups + [(params, {"lr_scale": scale}) for params, scale in self.lr_scales()]

    def forward(self, x: torch.Tensor, fields: torch.Tensor | None) -> torch.Tensor:
        x0 = x if self.cols is None else x.index_select(1, self.cols)
        xl = x0
        for layer in range(self.num_layers):
            xl = self.cross(x0, xl, layer)
        if self.cols is not None:  # the crosses back into their columns; the other columns pass through
            xl = x + (xl - x0) @ self.scatter
        return torch.cat([xl, self.deep(x)], dim=1) if self.deep is not None else xl


@hookimpl
def recmtl_register_interactions() -> dict[str, type[Interaction]]:
    return {"dcn_v2": DCNv2}
