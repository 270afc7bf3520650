"""Convolutional Block Attention Module (CBAM) in the two forms FeatherFace uses.

V1 (§2.2): one CBAM per feature map, channel MLP with bias, reduction 16, spatial gate on
[max, mean]. V2 (§3): a manager with one channel gate per level and ONE spatial gate
shared by all levels, MLP without bias, reduction 32, spatial gate on [mean, max].
Both are applied residually by the network: y = ReLU(x + CBAM(x)).

Pools are written as x.mean/amax over (H, W) rather than pools with a kernel equal to the
input size, so nothing here depends on the input shape (dynamic ONNX export).

Sections (§) refer to docs/ARCHITECTURE.md.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from models.folding import conv_bn_forward


class ChannelGate(nn.Module):
    """x * sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))), the MLP shared by both pools."""

    def __init__(self, channels: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, channels, bias=bias)

    def mlp(self, v: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(v)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))
        return x * torch.sigmoid(scale)[:, :, None, None]


class SpatialGate(nn.Module):
    """x * sigmoid(BN(conv7x7([pool_a, pool_b] over channels))).

    `max_first=True` is V1's order [max, mean]; V2 uses [mean, max].
    """

    def __init__(self, max_first: bool = True, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.max_first = max_first
        self.conv = nn.Conv2d(2, 1, 7, 1, 3, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mx, mean = x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)
        pooled = torch.cat([mx, mean] if self.max_first else [mean, mx], dim=1)
        return x * torch.sigmoid(conv_bn_forward(self.conv, self.bn, pooled))


class CBAM(nn.Module):
    """V1 CBAM (reduction 16): spatial_gate(channel_gate(x)). Params 2*C*(C//r) + C//r + C + 100."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.channel_gate = ChannelGate(channels, max(channels // reduction, 1), bias=True)
        # The published code uses BN momentum 0.01 in the spatial gate.
        self.spatial_gate = SpatialGate(max_first=True, bn_momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial_gate(self.channel_gate(x))


class SharedCBAM(nn.Module):
    """V2 CBAM manager: a channel gate per level, one spatial gate shared across levels.

    forward(list of maps) -> list of CBAM'd maps (not yet residual).
    """

    def __init__(self, channels: Sequence[int], reduction: int = 32) -> None:
        super().__init__()
        self.channel_gates = nn.ModuleList(
            ChannelGate(c, max(c // reduction, 4), bias=False) for c in channels
        )
        self.spatial_gate = SpatialGate(max_first=False)

    def forward(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [self.spatial_gate(gate(f)) for gate, f in zip(self.channel_gates, feats)]


def residual_attention(feats: Sequence[torch.Tensor], attended: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """FeatherFace applies attention residually: ReLU(x + CBAM(x))."""
    return [torch.relu(f + a) for f, a in zip(feats, attended)]
