"""PEPNet: Parameter and Embedding Personalized Network.

Chang et al., "PEPNet: Parameter and Embedding Personalized Network for Infusing with Personalized Prior
Information", KDD 2023. Gates conditioned on *prior* features (``gate_features``: e.g. ``[user_id, item_id]``,
embedded in the tower's own tables) personalise the model in two places, each gate a GateNU
``2 * sigmoid(W_2 ReLU(W_1 z))`` (1 on average, so it can amplify as well as damp):

* EPNet: ``O_ep = delta_ep * x``, element-wise on the input vector ``x`` (the field embeddings), with
  ``delta_ep = GateNU(E(prior) ++ stop_gradient(x))``, shared by all tasks;
* PPNet: each task's tower is an MLP on ``O_ep`` whose every layer input ``h_l`` is gated by its own
  ``GateNU(E(prior) ++ stop_gradient(O_ep))``; with ``gate_output`` (default) also the last hidden layer, the
  input of the head's output layer, as in the paper (``H_{l+1} = f((delta_l * H_l) W_l + b_l)`` for every layer
  up to the logit).

``output_activation`` is the last task layer's ``f`` (the head's input): ``relu`` as in the paper, or ``leaky_relu``,
whose units cannot die (narrow task towers can lose most of the head's input to dead ReLUs; the trainer's dead-unit
warning names the task). ``task_bias_init`` starts the task layers' biases at a constant (e.g. 0.01).

This tower sets ``uses_inputs``: it receives the categorical ids to embed the prior features (``sparse=True``:
updated by the sparse optimiser, exported to ONNX like the encoders' tables). ``diagnostics()`` reports the mean
EPNet gate over the input's columns and each task's mean PPNet gate per layer (``matrices.ppnet_gates``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from recmtl import FeatureInfo, Tower, hookimpl
from recmtl.layers import GateStats, check_units, fp32

#: the last task layer's activation (the head's input): the others are ReLU
OUTPUT_ACTIVATIONS = {"relu": torch.relu, "leaky_relu": nn.functional.leaky_relu}


class GateNU(nn.Module):
    """``2 * sigmoid(W_2 ReLU(W_1 z))``: one gate value per output unit, float32 (also under autocast)."""

    def __init__(self, input_dim: int, hidden: int, output_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, output_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return 2 * torch.sigmoid(fp32(self.net(z)))  # fp32 under bf16 autocast (gates multiply layer by layer)


class PEPNet(Tower):
    uses_inputs = True
    dead_units_hint = ("for pepnet, output_activation: leaky_relu (keeps every gate), or gate_output: false (no gate "
                       "on the head's input, at a cost in quality)")

    def __init__(self, input_dim: int, task_names: list[str], features: dict[str, list[FeatureInfo]],
                 gate_features: list[str] | None = None, gate_embedding_dim: int = 8, gate_units: int = 64,
                 task_units: list[int] = (128, 64), dropout: float = 0.0, sparse: bool = True,
                 init_std: float = 0.05, gate_output: bool = True, output_activation: str = "relu",
                 task_bias_init: float | None = None) -> None:
        super().__init__(input_dim, task_names)
        cats = list(features.get("categorical", []))
        names = [f.name for f in cats]
        prior = list(gate_features) if gate_features is not None else names
        if not prior:
            raise ValueError("pepnet needs prior features: gate_features names categorical features (e.g. [user_id, "
                             "item_id]); the model has none")
        for name in prior:
            if name not in names:
                raise ValueError(f"gate_features names '{name}', which is not a categorical feature "
                                 f"(categorical features: {', '.join(names) or 'none'})")
        if gate_embedding_dim < 1 or gate_units < 1:
            raise ValueError("gate_embedding_dim and gate_units must be at least 1")
        task_units = check_units("task_units", task_units)
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"output_activation must be one of {', '.join(OUTPUT_ACTIVATIONS)}, got {output_activation!r}")
        self.output_activation = output_activation
        positions = [names.index(n) for n in prior]
        cards = [max(int(cats[i].cardinality), 1) for i in positions]
        self.register_buffer("positions", torch.tensor(positions, dtype=torch.long))
        self.register_buffer("offsets", torch.from_numpy(np.concatenate([[0], np.cumsum(cards)[:-1]]).astype(np.int64)))
        self.prior = nn.Embedding(int(sum(cards)), gate_embedding_dim, sparse=sparse)
        nn.init.normal_(self.prior.weight, std=init_std)
        prior_dim = len(prior) * gate_embedding_dim
        self.epnet = GateNU(prior_dim + input_dim, gate_units, input_dim)
        widths = [input_dim] + task_units
        gated = widths if gate_output else widths[:-1]  # the layer inputs, and the head's input with gate_output
        self.ppnet = nn.ModuleDict({t: nn.ModuleList(GateNU(prior_dim + input_dim, gate_units, w) for w in gated)
                                    for t in task_names})
        self.layers = nn.ModuleDict({t: nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
                                     for t in task_names})
        if task_bias_init is not None:
            for linears in self.layers.values():
                for linear in linears:
                    nn.init.constant_(linear.bias, float(task_bias_init))
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._out = widths[-1]
        self._ep_sum, self._pp_sum, self._rows = None, {}, 0

    @property
    def output_dims(self) -> dict[str, int]:
        return {t: self._out for t in self.task_names}

    def forward(self, x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = inputs["categorical"][:, self.positions] + self.offsets
        prior = self.prior(ids).flatten(1)
        delta_ep = self.epnet(torch.cat([prior, x.detach()], dim=1))
        o_ep = delta_ep * x
        z = torch.cat([prior, o_ep.detach()], dim=1)
        record = GateStats.active(self)  # evaluation rows only, never while exporting
        if record:
            self._rows += x.shape[0]
            self._ep_sum = delta_ep.sum(0).detach() + (0 if self._ep_sum is None else self._ep_sum)
        out = {}
        for t in self.task_names:
            h, linears = o_ep, self.layers[t]
            for i, gate in enumerate(self.ppnet[t]):  # each layer's input, then (gate_output) the head's input
                delta = gate(z)
                if record:
                    self._pp_sum[(t, i)] = float(delta.detach().mean(1).sum()) + self._pp_sum.get((t, i), 0.0)
                h = delta * h
                if i < len(linears):
                    pre = linears[i](h)
                    last = i == len(linears) - 1
                    h = self.drop(OUTPUT_ACTIVATIONS[self.output_activation](pre) if last else torch.relu(pre))
            out[t] = h
        return out

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.epnet.parameters())

    def diagnostics(self) -> dict[str, Any]:
        if not self._rows:
            return {}
        n, layers = self._rows, len(self.ppnet[self.task_names[0]])
        cols = [f"layer {i + 1}" for i in range(len(self.layers[self.task_names[0]]))] + ["output"] * (
            layers > len(self.layers[self.task_names[0]]))
        diag = {"epnet_gate_mean": round(float(self._ep_sum.mean()) / n, 4),
                "matrices": {"ppnet_gates": {"rows": list(self.task_names), "cols": cols,
                                             "values": [[round(self._pp_sum.get((t, i), 0.0) / n, 4) for i in range(layers)]
                                                        for t in self.task_names]}}}
        self._ep_sum, self._pp_sum, self._rows = None, {}, 0
        return diag


@hookimpl
def recmtl_register_towers() -> dict[str, type[Tower]]:
    return {"pepnet": PEPNet}
