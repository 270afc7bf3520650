"""Context modules (SSH) and the channel shuffles that follow them.

V1 (§2.4/2.5): SSH whose 3x3 convs are modulated deformable convs, then a channel shuffle
(parameter-free, or the published conv block). V2 (§3): grouped SSH with plain convs and a
light grouped-conv shuffle. Sections (§) refer to docs/ARCHITECTURE.md.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from models.deform_conv import DeformableConv2d, deform_conv2d_siblings, shared_coordinates
from models.folding import ConvBNSequential, folded_parameters


def channel_shuffle(x: torch.Tensor, groups: int, order: str = "standard") -> torch.Tensor:
    """Permute channels across groups.

    "standard" (ShuffleNet): view (B, g, C/g, H, W) -> transpose. "official": the published
    FeatherFace ChannelShuffle2 views (B, C/g, g, H, W) -> transpose; for g=2 the two are
    inverse permutations, so a checkpoint trained with one is wrong with the other.

    A channels-last map (eval-mode inference on the CPU) is shuffled along its innermost axis and
    stays channels-last, so the convs after it keep oneDNN's fast layout (same values).
    """
    b, c, h, w = x.shape
    if order == "standard":
        split = (groups, c // groups)
    elif order == "official":
        split = (c // groups, groups)
    else:
        raise ValueError(f"unknown shuffle order {order!r}")
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        nhwc = x.permute(0, 2, 3, 1).reshape(b, h, w, *split)
        return nhwc.transpose(3, 4).reshape(b, h, w, c).permute(0, 3, 1, 2)
    return x.reshape(b, *split, h, w).transpose(1, 2).reshape(b, c, h, w)


class ChannelShuffle(nn.Module):
    """Parameter-free channel shuffle."""

    def __init__(self, groups: int = 2, order: str = "standard") -> None:
        super().__init__()
        self.groups, self.order = groups, order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups, self.order)


def conv_shuffle_block(channels: int, order: str = "official") -> nn.Sequential:
    """The published V1 shuffle block: shuffle(2), 1x1 C->C/2, BN, dw3x3, BN, 1x1 C/2->C, BN, ReLU.

    Indices match the published checkpoint (`ssh1_cs.1.weight` ...). 4,640 params at C=64.
    """
    half = channels // 2
    return ConvBNSequential(
        ChannelShuffle(2, order),
        nn.Conv2d(channels, half, 1, bias=False),
        nn.BatchNorm2d(half),
        nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False),
        nn.BatchNorm2d(half),
        nn.Conv2d(half, channels, 1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


def light_shuffle_block(channels: int, groups: int = 4) -> nn.Sequential:
    """V2 shuffle: shuffle(g), grouped 1x1 C->C/2 + BN + ReLU, grouped 1x1 C/2->C + BN + ReLU."""
    half = channels // 2
    return ConvBNSequential(
        ChannelShuffle(groups, "standard"),
        nn.Conv2d(channels, half, 1, groups=groups, bias=False),
        nn.BatchNorm2d(half),
        nn.ReLU(inplace=True),
        nn.Conv2d(half, channels, 1, groups=groups, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


def deform_bn(in_ch: int, out_ch: int, act: bool, leaky: float = 0.1) -> nn.Sequential:
    """DCB (deformable conv + BN) or, with act, DCBR (+ LeakyReLU)."""
    layers = [DeformableConv2d(in_ch, out_ch, 3, 1, 1), nn.BatchNorm2d(out_ch)]
    if act:
        layers.append(nn.LeakyReLU(leaky, inplace=True))
    return ConvBNSequential(*layers)


class _ThreeBranchContext(nn.Module):
    """SSH dataflow shared by V1 and V2: a C/2 branch and two C/4 branches (5x5- and 7x7-like
    receptive fields from stacked 3x3 convs sharing their first conv), concatenated + ReLU."""

    conv3x3: nn.Module
    conv5x5_1: nn.Module
    conv5x5_2: nn.Module
    conv7x7_2: nn.Module
    conv7x7_3: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3 = self.conv3x3(x)
        mid = self.conv5x5_1(x)
        branch5 = self.conv5x5_2(mid)
        branch7 = self.conv7x7_3(self.conv7x7_2(mid))
        return torch.relu(torch.cat([branch3, branch5, branch7], dim=1))


class SSH(_ThreeBranchContext):
    """V1 SSH (§2.4): three receptive fields from stacked deformable 3x3 convs.

    forward (B, C, H, W) -> (B, C, H, W) = ReLU(concat[C/2, C/4, C/4]). Parameters per level:
    57,855 at C=52, 77,655 at C=64, 21,105 at C=24.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels % 4:
            raise ValueError(f"SSH needs channels divisible by 4, got {channels}")
        quarter = channels // 4
        self.conv3x3 = deform_bn(channels, channels // 2, act=False)
        self.conv5x5_1 = deform_bn(channels, quarter, act=True)
        self.conv5x5_2 = deform_bn(quarter, quarter, act=False)
        self.conv7x7_2 = deform_bn(quarter, quarter, act=True)
        self.conv7x7_3 = deform_bn(quarter, quarter, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The dataflow of _ThreeBranchContext, with the two branches reading x (and the two
        # reading mid) run as siblings (`deform_branches`).
        branch3, mid = deform_branches([self.conv3x3, self.conv5x5_1], x)
        branch5, mid7 = deform_branches([self.conv5x5_2, self.conv7x7_2], mid)
        return torch.relu(torch.cat([branch3, branch5, self.conv7x7_3(mid7)], dim=1))


def deform_branches(branches: Sequence[nn.Sequential], x: torch.Tensor) -> List[torch.Tensor]:
    """Outputs of SSH branches (deformable conv, BN[, LeakyReLU], as `deform_bn` builds them)
    that all read `x`: their offsets and masks come from one conv (`shared_coordinates`) and,
    without autograd on the CPU, their samples from one plan (`deform_conv2d_siblings`); BN
    folded exactly when `ConvBNSequential` would fold it. Same values as each branch alone."""
    dcns = [branch[0] for branch in branches]
    offsets, masks = shared_coordinates(dcns, x)
    weights, biases, rests = [], [], []
    for dcn, branch in zip(dcns, branches):
        bn, rest = branch[1], list(branch)[2:]
        folded = folded_parameters(dcn, bn, x)
        if folded is None:
            folded, rest = (dcn.regular_conv.weight, dcn.regular_conv.bias), [bn] + rest
        weights.append(folded[0])
        biases.append(folded[1])
        rests.append(rest)
    first = dcns[0]
    outs = deform_conv2d_siblings(x, offsets, masks, weights, biases, first.stride, first.padding,
                                  backend=[dcn.backend for dcn in dcns])
    for i, rest in enumerate(rests):
        for layer in rest:
            outs[i] = layer(outs[i])
    return outs


def _grouped_conv_bn(in_ch: int, out_ch: int, groups: int, act: bool) -> list:
    layers = [nn.Conv2d(in_ch, out_ch, 3, 1, 1, groups=groups, bias=False), nn.BatchNorm2d(out_ch)]
    return layers + [nn.ReLU(inplace=True)] if act else layers


def _pointwise_bn_relu(in_ch: int, out_ch: int) -> list:
    return [nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class SSHGrouped(_ThreeBranchContext):
    """V2 SSH (§3): 1x1 reductions then grouped 3x3 convs, no deformable convs.

    2,064 params at C=32, groups 4. forward (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, groups: int = 4) -> None:
        super().__init__()
        half, quarter = channels // 2, channels // 4
        self.conv3x3 = ConvBNSequential(*_pointwise_bn_relu(channels, half), *_grouped_conv_bn(half, half, groups, False))
        self.conv5x5_1 = ConvBNSequential(
            *_pointwise_bn_relu(channels, quarter), *_grouped_conv_bn(quarter, quarter, groups, False)
        )
        self.conv5x5_2 = ConvBNSequential(*_grouped_conv_bn(quarter, quarter, groups, False))
        self.conv7x7_2 = ConvBNSequential(*_grouped_conv_bn(quarter, quarter, groups, True))
        self.conv7x7_3 = ConvBNSequential(*_grouped_conv_bn(quarter, quarter, groups, False))

