"""Building blocks shared by plugins, public so that a third-party plugin has the built-ins' power and plugins
never import each other:

* MLPs: ``mlp``, ``check_units``, ``PReLU`` (``nn.PReLU`` with a fast CPU backward);
* mixture of experts: ``Experts`` (``num_experts`` MLPs as batched matrix products, refusing experts that start
  identical), ``mix`` (gate-weighted sum), ``entropy``, ``GateStats`` (the ``Tower.diagnostics`` conventions:
  ``gate_weights``, ``gate_entropy``, ``max_entropy``, ``expert_utilisation``);
* embeddings: ``embedding_width_groups`` and ``fused_embedding`` (one table per width, ids offset per feature);
* heads: ``masked_mean`` (a loss averaged over the labelled entries);
* mixed precision: ``fp32`` (a tensor in float32, for the element-wise steps that bf16 autocast must not round:
  gates' sigmoid and softmax, sums that cancel, losses);
* sequence attention: ``AttentionStats`` (mean attention weight by history position, an encoder's diagnostics),
  ``HistoryTables`` (a history's and its candidate's embedding rows, borrowed from another encoder when shared).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from recmtl.contracts import TableRows


def mlp(input_dim: int, units: Sequence[int], dropout: float = 0.0, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear -> activation (-> dropout) for each width in ``units``; empty ``units`` is the identity."""
    layers: list[nn.Module] = []
    width = input_dim
    for u in units:
        layers += [nn.Linear(width, int(u)), activation()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(u)
    return nn.Sequential(*layers)


class _PReLUFunction(torch.autograd.Function):
    """``prelu(x, w)`` with a backward of vectorised ops (torch's ``_prelu_kernel_backward`` is a scalar loop on CPU)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.prelu(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        pos = torch.ops.aten.threshold_backward(grad, x, 0.0)  # grad where x > 0, else 0
        neg = grad - pos  # grad where x <= 0
        if weight.numel() == 1:
            grad_weight = torch.dot(neg.reshape(-1), x.reshape(-1)).reshape(weight.shape)
        else:  # one weight per channel (dim 1)
            grad_weight = (neg * x).transpose(0, 1).reshape(weight.numel(), -1).sum(1)
        shape = [1] * x.dim()
        if x.dim() > 1:
            shape[1] = weight.numel()
        return neg.mul_(weight.reshape(shape)).add_(pos), grad_weight


class PReLU(nn.PReLU):
    """``nn.PReLU`` (same parameters and state dict) whose training backward is several times faster on CPU; the
    forward, evaluation and export are torch's ``prelu``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad) \
                and not torch.onnx.is_in_onnx_export():
            return _PReLUFunction.apply(x, self.weight)
        return torch.nn.functional.prelu(x, self.weight)


def check_units(name: str, units: Sequence[int]) -> list[int]:
    units = [int(u) for u in units]
    if any(u <= 0 for u in units):
        raise ValueError(f"{name} must be positive layer widths, got {units}")
    return units


# ---- mixed precision ----------------------------------------------------------------------------
def fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32: a bf16 / fp16 tensor (an autocast matmul's output) is cast, a float32 one is returned as it
    is (no copy, and no node in an exported ONNX graph). Autocast runs matmuls in bf16 and leaves element-wise ops in
    their input's dtype, so a gate's ``sigmoid`` / ``softmax`` on a linear layer's output would be computed and
    stored with bf16's 8-bit mantissa (e.g. ``sigmoid`` rounds to exactly 1.0 above ~0.998): cast first."""
    return x if x.dtype == torch.float32 or not x.is_floating_point() else x.float()


# ---- heads --------------------------------------------------------------------------------------
def masked_mean(per_entry: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``per_entry`` over the entries where ``mask`` is 1 (0 when none is): a head's loss over its
    labelled rows."""
    return (per_entry * mask).sum() / mask.sum().clamp_min(1)


# ---- sequence attention ------------------------------------------------------------------------
class AttentionStats:
    """Running mean of attention weights by history position (1 = most recent), per feature."""

    def __init__(self, names: list[str], length: int) -> None:
        self.names = names
        self.length = length
        self.reset()

    def reset(self) -> None:
        self.sums = {n: torch.zeros(self.length, dtype=torch.float64) for n in self.names}
        self.counts = {n: torch.zeros(self.length, dtype=torch.float64) for n in self.names}

    @torch.no_grad()
    def add(self, name: str, weights: torch.Tensor, mask: torch.Tensor) -> None:
        """``weights``/``mask`` ``[batch, L]``, items left-aligned: position by recency, 1 the last item."""
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return
        mask = mask.bool()
        n_items = mask.sum(1, keepdim=True)
        recency = (n_items - torch.arange(mask.shape[1], device=mask.device)[None, :]).clamp(1, self.length) - 1
        w = (weights.detach().float() * mask).double().cpu().reshape(-1)
        idx, m = recency.cpu().reshape(-1), mask.double().cpu().reshape(-1)
        self.sums[name].index_add_(0, idx, w)
        self.counts[name].index_add_(0, idx, m)

    def result(self) -> dict[str, Any]:
        out = {}
        for n in self.names:
            if self.counts[n].sum() > 0:
                mean = self.sums[n] / self.counts[n].clamp_min(1)
                last = int(torch.nonzero(self.counts[n]).max()) + 1
                out[n] = {"mean_by_position": [round(float(v), 6) for v in mean[:last]],
                          "rows_by_position": [int(v) for v in self.counts[n][:last]]}
        self.reset()
        return {"attention": out} if out else {}


# ---- embeddings ---------------------------------------------------------------------------------
def embedding_width_groups(widths: Sequence[int]) -> list[tuple[int, list[int]]]:
    """Features grouped by embedding width, ``[(width, feature positions)]``, widths ascending: one fused table
    per group."""
    return [(w, [i for i, x in enumerate(widths) if x == w]) for w in sorted(set(widths))]


def fused_embedding(sizes: Sequence[int], width: int, sparse: bool = True, init_std: float = 0.05) -> tuple[nn.Embedding, np.ndarray]:
    """One table holding several features' rows (``sizes[i]`` rows for feature ``i``) and each feature's first
    row (its offset): one lookup for all the features of a width, sparse gradients so a step costs time in the
    ids seen, not the vocabulary."""
    sizes = np.asarray(sizes, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    table = nn.Embedding(int(sizes.sum()), int(width), sparse=sparse)
    nn.init.normal_(table.weight, std=init_std)
    return table, offsets


# ---- mixture of experts -------------------------------------------------------------------------
#: fp32 on CPU: ``Experts`` zero-pads a shared input's width (and its first weight's rows, at run time) up to a
#: multiple of this (rows of 16 bytes; more padding measured no faster); 0 turns it off. The same outputs and
#: gradients to fp32 rounding, the same parameters.
EXPERTS_PAD_MULTIPLE = 4


def input_pad(x: torch.Tensor) -> int:
    """The zero columns ``Experts`` appends to a shared input ``x`` ``[batch, in]`` before its first product:
    up to a multiple of :data:`EXPERTS_PAD_MULTIPLE` for a float32 CPU tensor outside autocast, ONNX export and
    tracing (there the product's speed does not depend on it, or the graph must stay as it is); else 0."""
    m = EXPERTS_PAD_MULTIPLE
    if (m <= 0 or x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_autocast_enabled("cpu")
            or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()):
        return 0
    return -x.shape[-1] % m


def fused_relu_linear_available(x: torch.Tensor) -> bool:
    """Whether ``Experts``' first layer runs as :class:`_ReluLinear` (one oneDNN GEMM with the bias and the ReLU
    fused): a CPU tensor under bf16 autocast, outside ONNX export and tracing, where :data:`FUSED_BF16` holds."""
    return (FUSED_BF16 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing())


def _fused_bf16_supported() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported() and torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


#: whether ``Experts`` fuses its first layer under CPU bf16 autocast: where oneDNN has bf16 and the CPU AMX tiles
#: (where it was measured faster; on other CPUs the plain autocast path stays)
FUSED_BF16 = _fused_bf16_supported()


class _ReluLinear(torch.autograd.Function):
    """``Experts``' first layer under bf16 autocast on CPU: ``relu(x @ w + b)`` for bf16 ``x`` ``[batch, in]``, ``w``
    ``[in, E * D]``, ``b`` ``[E * D]``, returned as ``[E, batch, D]``, contiguous. The forward is one oneDNN GEMM
    with the bias and the ReLU applied to its fp32 accumulator before rounding (autocast's ``x @ w + b`` rounds the
    product, adds in bf16 and takes two more passes over the output before its layout copy). The backward works
    per expert on the ``[E, batch, D]`` gradient (no layout copy of it), and the weight gradient multiplies a
    contiguous ``x.T`` (oneDNN is slower on the transposed view)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, experts: int) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x, w.t(), b, "relu", [], "")
        y = y.view(x.shape[0], experts, -1).transpose(0, 1).contiguous()
        ctx.save_for_backward(x, w, y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w, y = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(grad, y, 0.0)  # [E, B, D]
        e, d = g.shape[0], g.shape[2]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g[0] @ w[:, :d].t()
            for i in range(1, e):
                gx.addmm_(g[i], w[:, i * d:(i + 1) * d].t())
        if ctx.needs_input_grad[1]:
            xt = x.t().contiguous()
            gw = torch.cat([xt @ g[i] for i in range(e)], dim=1)
        if ctx.needs_input_grad[2]:
            gb = g.sum(1).reshape(-1)
        return gx, gw, gb, None


class Experts(nn.Module):
    """``num_experts`` MLPs, evaluated as batched matrix products.

    The input is either shared by every expert (``[batch, input_dim]``: the first layer is one matrix
    product) or one input per expert (``[num_experts, batch, input_dim]``, e.g. PLE's later levels,
    STEM's task-specific experts, cross-stitch columns). In fp32 on CPU a shared input's width is zero-padded
    at run time (:func:`input_pad`): CPU GEMMs are faster at some widths; parameters and outputs are unchanged.
    Under bf16 autocast on a CPU with AMX a shared input's first layer is one fused GEMM (:class:`_ReluLinear`).
    """

    def __init__(self, input_dim: int, num_experts: int, units: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"the number of experts must be at least 1, got {num_experts}")
        if not units:
            raise ValueError("experts need at least one layer")
        self.num_experts = num_experts
        self.units = list(units)
        widths = [input_dim] + self.units
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            bound = 1 / math.sqrt(w_in)
            shape = (w_in, num_experts * w_out) if i == 0 else (num_experts, w_in, w_out)
            self.weights.append(nn.Parameter(torch.empty(shape).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_experts, 1, w_out).uniform_(-bound, bound)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.check_distinct()

    @property
    def output_dim(self) -> int:
        return self.units[-1]

    def layer_weights(self, i: int) -> torch.Tensor:
        """Layer ``i``'s weights as ``[num_experts, in, out]`` (a view)."""
        w = self.weights[i]
        if i == 0:
            return w.view(w.shape[0], self.num_experts, -1).transpose(0, 1)
        return w

    def check_distinct(self) -> None:
        """The collapse guard: experts that start identical get identical gradients and stay identical."""
        if self.num_experts < 2:
            return
        first = self.layer_weights(0).detach().reshape(self.num_experts, -1)
        if torch.cdist(first, first).add(torch.eye(self.num_experts) * 1e9).min() <= 1e-8:
            raise ValueError("two experts start with identical weights; experts must be initialised independently")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, in]`` or ``[num_experts, batch, in]`` -> ``[num_experts, batch, units[-1]]``."""
        e = self.num_experts
        if x.dim() == 2 and torch.onnx.is_in_onnx_export():
            # one Gemm with its bias and the Relu, which onnxruntime fuses (slower in a torch training step)
            h = torch.relu(torch.addmm(self.biases[0].reshape(-1), x, self.weights[0]))
            h = h.view(x.shape[0], e, -1).transpose(0, 1)
        elif x.dim() == 2:
            w = self.weights[0]
            if pad := input_pad(x):  # zero columns times zero rows: the same product
                x, w = F.pad(x, (0, pad)), F.pad(w, (0, 0, 0, pad))
            if fused_relu_linear_available(x):  # bf16 on CPU: the bias and ReLU inside the GEMM
                dt = torch.bfloat16
                h = _ReluLinear.apply(x.to(dt), w.to(dt), self.biases[0].reshape(-1).to(dt), e)
            else:
                h = x @ w  # under autocast elsewhere a bf16 product: the bias joins it in bf16, so that the
                # activation is not promoted to fp32 here and cast back to bf16 by the next layer's product
                h = torch.relu(h.view(x.shape[0], e, -1).transpose(0, 1) + self.biases[0].to(h.dtype))
            if len(self.weights) > 1:  # [E, B, D] laid out as such: the next product's backward then needs no
                h = h.contiguous()  # strided copy of it (a slow one in bf16)
        else:
            h = torch.relu(torch.baddbmm(self.biases[0], x, self.layer_weights(0)))
        h = self.dropout(h)
        for w, bias in zip(list(self.weights)[1:], list(self.biases)[1:]):
            h = self.dropout(torch.relu(torch.baddbmm(bias, h, w)))
        return h


def mix(gates: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of expert outputs ``[E, B, D]``: gates ``[B, E]`` -> ``[B, D]``, or one gate per task
    ``[B, T, E]`` -> ``[T, B, D]``. Under ONNX export a broadcast product and a sum (onnxruntime runs them
    faster than its Einsum); einsum otherwise (faster in a torch training step)."""
    if torch.onnx.is_in_onnx_export():
        if gates.dim() == 2:
            return (gates.t().unsqueeze(-1) * experts).sum(0)
        return (gates.permute(1, 2, 0).unsqueeze(-1) * experts.unsqueeze(0)).sum(1)
    if gates.dim() == 2:
        return torch.einsum("be,ebd->bd", gates, experts)
    return torch.einsum("bte,ebd->tbd", gates, experts)


def entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of a probability matrix ``[..., n]``."""
    return -(weights * torch.log(weights.clamp_min(1e-12))).sum(-1)


class GateStats:
    """Per-gate mean weight per expert, mean entropy and top-1 share, over the evaluation rows seen.

    Training passes are not counted (dropout, and the weights move while they are summed); neither is
    tracing for ONNX export.
    """

    def __init__(self, gates: dict[str, int], expert_names: dict[str, list[str]] | None = None) -> None:
        self.sizes = dict(gates)
        self.expert_names = expert_names
        self.reset()

    def reset(self) -> None:
        self.weight_sum: dict[str, torch.Tensor] = {}
        self.top_count: dict[str, torch.Tensor] = {}
        self.entropy_sum: dict[str, float | torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    @staticmethod
    def active(module: nn.Module) -> bool:
        return not module.training and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()

    @torch.no_grad()
    def update(self, gate: str, weights: torch.Tensor) -> None:
        """``weights``: ``[batch, num_experts]``, rows summing to 1."""
        w = weights.detach().float()
        top = torch.bincount(w.argmax(-1), minlength=w.shape[-1])
        if gate not in self.rows:
            self.weight_sum[gate], self.top_count[gate] = w.sum(0), top
            self.entropy_sum[gate], self.rows[gate] = entropy(w).sum(), w.shape[0]
        else:
            self.weight_sum[gate] += w.sum(0)
            self.top_count[gate] += top
            self.entropy_sum[gate] += entropy(w).sum()
            self.rows[gate] += w.shape[0]

    def diagnostics(self) -> dict[str, Any]:
        """The conventional keys, then forget what was seen."""
        if not self.rows:
            return {}
        out: dict[str, Any] = {
            "gate_weights": {g: [round(v, 4) for v in (self.weight_sum[g] / n).tolist()] for g, n in self.rows.items()},
            "gate_entropy": {g: round(float(self.entropy_sum[g]) / n, 4) for g, n in self.rows.items()},
            "max_entropy": round(math.log(max(self.sizes.values())), 4),
            "expert_utilisation": {g: [round(v, 4) for v in (self.top_count[g].float() / n).tolist()]
                                   for g, n in self.rows.items()},
        }
        if len(set(self.sizes.values())) > 1:  # gates over different numbers of experts
            out["gate_max_entropy"] = {g: round(math.log(n), 4) for g, n in self.sizes.items()}
        if self.expert_names:
            out["expert_names"] = self.expert_names
        self.reset()
        return out


class HistoryTables:
    """For a sequence encoder with a table per history feature (``self.tables[j]``) and per candidate
    (``self.target_tables[str(j)]``) over ``self.features`` of widths ``self.widths``: ``share_tables`` borrows a
    categorical feature's rows for a history with ``vocabulary:`` and for a candidate (``target_name``) when size and
    width agree, dropping the encoder's own table; ``history_table(j)`` / ``target_table(j)`` give what to embed
    with. Put it before the encoder's base class (``class MyEncoder(HistoryTables, Encoder)``)."""

    features: Sequence[Any]
    widths: Sequence[int]
    tables: nn.ModuleList
    target_tables: nn.ModuleDict

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._borrowed: dict[str, TableRows] = {}  # another encoder's rows: "h{j}" history, "t{j}" candidate

    def share_tables(self, tables: Mapping[str, TableRows]) -> None:
        """Embed a history sharing a categorical feature's vocabulary, and a candidate, with that feature's rows."""
        def fits(name: Any, size: int, width: int) -> TableRows | None:
            rows = tables.get(name) if isinstance(name, str) else None
            return rows if rows is not None and rows.size == size and rows.width == width else None

        for j, f in enumerate(self.features):
            if (rows := fits(f.options.get("vocabulary"), f.cardinality, self.widths[j])) is not None:
                self._borrowed[f"h{j}"] = rows
                self.tables[j] = nn.Identity()  # a placeholder: the rows live in the other encoder
            if "target" in f.options and not f.options.get("shared") and (rows := fits(
                    f.options.get("target_name"), int(f.options["target_cardinality"]), self.widths[j])) is not None:
                self._borrowed[f"t{j}"] = rows
                del self.target_tables[str(j)]

    def history_table(self, j: int) -> nn.Module | TableRows:
        """Feature ``j``'s item embeddings (ids without padding)."""
        return self._borrowed.get(f"h{j}", self.tables[j])

    def target_table(self, j: int) -> nn.Module | TableRows:
        """Feature ``j``'s candidate embeddings."""
        if self.features[j].options.get("shared"):
            return self.history_table(j)
        return self._borrowed[f"t{j}"] if f"t{j}" in self._borrowed else self.target_tables[str(j)]
