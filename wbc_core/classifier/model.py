"""A small convnet for 48-96 px cell crops, with the domain head DANN trains through gradient reversal.

Sized for CPUs: four conv stages (3x3 conv, BatchNorm, ReLU, 2x2 max-pool; the last two stages have two
convs), global average pooling and a linear class head: about 0.4 M parameters and 0.1 GFLOP per 64 px
crop, so a few hundred crops train for an epoch in seconds on two cores and a slide's cells classify in
milliseconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from wbc_core.config_io import dataclass_from_dict


@dataclass
class NetConfig:
    width: int = 32          # channels of the first stage; doubled at each of the next three
    dropout: float = 0.2
    domain_hidden: int = 64  # DANN discriminator hidden units

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> NetConfig:
        return dataclass_from_dict(cls, data, "network config keys")


class GradientReversal(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``-weight`` backward (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: float) -> torch.Tensor:  # type: ignore[override]
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.weight * grad, None


def grad_reverse(x: torch.Tensor, weight: float) -> torch.Tensor:
    return GradientReversal.apply(x, weight)


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CellNet(nn.Module):
    """Feature extractor + class head (+ domain head for DANN). Input: (N, 3, S, S) standardised RGB."""

    def __init__(self, num_classes: int, cfg: NetConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or NetConfig()
        w = cfg.width
        self.features = nn.Sequential(
            *_conv(3, w), nn.MaxPool2d(2),
            *_conv(w, 2 * w), nn.MaxPool2d(2),
            *_conv(2 * w, 4 * w), *_conv(4 * w, 4 * w), nn.MaxPool2d(2),
            *_conv(4 * w, 8 * w), *_conv(8 * w, 8 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feature_dim = 8 * w
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(self.feature_dim, num_classes))
        self.domain_head = nn.Sequential(nn.Linear(self.feature_dim, cfg.domain_hidden), nn.ReLU(inplace=True),
                                         nn.Linear(cfg.domain_hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def reset_head(self, num_classes: int) -> None:
        self.head[1] = nn.Linear(self.feature_dim, num_classes)


#: Crops are scaled to [0, 1] and standardised with these (roughly the statistics of stained smears).
MEAN = (0.70, 0.62, 0.72)
STD = (0.20, 0.22, 0.16)


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float in [0, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float().div_(255.0)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) float in [0, 1] -> network input."""
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
