"""CNN encoder for image features: a small convolutional backbone per image feature.

Each block is conv 3x3 (padding 1) -> batch norm -> ReLU -> 2x2 max pooling (pooling stops once the
feature map is 2 pixels wide); the last map is flattened and projected to ``output_dim`` with a ReLU. The
LeNet/VGG pattern (LeCun et al. 1998; Simonyan & Zisserman, ICLR 2015) at a size that trains on a CPU.
Input ``[batch, n_images, channels, height, width]`` in [0, 1]; output ``[batch, n_images * output_dim]``. Field
view: one field of width ``output_dim`` per image feature.
"""
from __future__ import annotations

import torch
from torch import nn

from recmtl import Encoder, FeatureInfo, hookimpl


class CNNEncoder(Encoder):
    kind = "image"
    has_fields = True

    def __init__(self, features: list[FeatureInfo], channels: list[int] = (16, 32), output_dim: int = 64,
                 dropout: float = 0.0, batch_norm: bool = True) -> None:
        super().__init__(features)
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive widths, got {channels}")
        if output_dim < 1:
            raise ValueError(f"output_dim must be positive, got {output_dim}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self._dim = int(output_dim)
        self.backbones = nn.ModuleList(self._backbone(f, channels, batch_norm, dropout) for f in features)

    def _backbone(self, feature: FeatureInfo, channels: list[int], batch_norm: bool, dropout: float) -> nn.Sequential:
        c, h, w = (int(feature.options[k]) for k in ("channels", "height", "width"))
        layers: list[nn.Module] = []
        for width in channels:
            layers += [nn.Conv2d(c, width, 3, padding=1)]
            layers += [nn.BatchNorm2d(width)] if batch_norm else []
            layers += [nn.ReLU()]
            if min(h, w) >= 4:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = width
        layers += [nn.Flatten(), nn.Dropout(dropout), nn.Linear(c * h * w, self._dim), nn.ReLU()]
        return nn.Sequential(*layers)

    @property
    def output_dim(self) -> int:
        return self._dim * len(self.features)

    @property
    def field_dim(self) -> int:
        return self._dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [net(x[:, j]) for j, net in enumerate(self.backbones)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def fields(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[1]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [net(x[:, j]) for j, net in enumerate(self.backbones)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), torch.stack(parts, dim=1)


@hookimpl
def recmtl_register_encoders() -> dict[str, type[Encoder]]:
    return {"cnn": CNNEncoder}
