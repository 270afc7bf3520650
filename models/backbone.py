"""MobileNetV1 x0.25 ("mobilenet0.25"), stages 1-3, as RetinaFace and FeatherFace use it.

docs/ARCHITECTURE.md §2.1: 213,072 parameters (stages 10,128 / 99,392 / 103,552); outputs
C3/C4/C5 with 64/128/256 channels at strides 8/16/32. Module indices match the commonly
distributed ImageNet checkpoint (`module.stage1.0.0.weight`, ...), so its weights load by name
(`utils.checkpoint.load_pretrained_backbone`).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from models.folding import ConvBNSequential


def conv_bn(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """3x3 conv (no bias) + BN + LeakyReLU(0.1): the stem."""
    return ConvBNSequential(
        nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.LeakyReLU(0.1, inplace=True),
    )


def conv_dw(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 + BN + LeakyReLU, then pointwise 1x1 + BN + LeakyReLU."""
    return ConvBNSequential(
        nn.Conv2d(in_ch, in_ch, 3, stride, 1, groups=in_ch, bias=False),
        nn.BatchNorm2d(in_ch),
        nn.LeakyReLU(0.1, inplace=True),
        nn.Conv2d(in_ch, out_ch, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.LeakyReLU(0.1, inplace=True),
    )


class MobileNetV1(nn.Module):
    """Stages 1-3 of MobileNetV1 x0.25. forward -> (C3 (B,64,H/8,W/8), C4 (B,128,H/16,W/16),
    C5 (B,256,H/32,W/32)), spatial sizes rounded up."""

    out_channels: Tuple[int, int, int] = (64, 128, 256)

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            conv_bn(3, 8, 2), conv_dw(8, 16, 1), conv_dw(16, 32, 2),
            conv_dw(32, 32, 1), conv_dw(32, 64, 2), conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(conv_dw(64, 128, 2), *[conv_dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(conv_dw(128, 256, 2), conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        c5 = self.stage3(c4)
        return c3, c4, c5
