"""Batch-norm folding for inference: conv -> BN pairs become one conv with a bias.

In eval mode BN is a per-channel affine map, so it can be absorbed into the convolution before
it (the formula is in models/folding.py, which eval-mode models also apply on every call). Here
it is done once, in float64, and the BN is dropped: the folded model computes the same function
(to float32 rounding) with one pass over each feature map fewer. It is for inference only: the BN
statistics are gone, so it cannot be trained or saved as a FeatherFace checkpoint.

Pairs folded: consecutive (Conv2d | DeformableConv2d, BatchNorm2d) children of any
nn.Sequential (backbone, BiFPN projections, V2 conv blocks, SSH branches, shuffle blocks),
plus the attribute pairs listed in `_ATTRIBUTE_PAIRS` (V1 SeparableConv pointwise -> bn,
CBAM spatial gate conv -> bn). The BN is replaced by nn.Identity. The other inference folds
(fusion weights, channel shuffles, merged heads, deformable-conv forms) are in
utils/deploy/rewrites.py, which starts from this.
"""
from __future__ import annotations

import copy
from typing import Dict, Tuple, Type, Union

import torch
from torch import nn

from models.attention import SpatialGate
from models.bifpn import SeparableConv
from models.deform_conv import DeformableConv2d
from models.folding import fold_bn

ConvLike = Union[nn.Conv2d, DeformableConv2d]

# Modules whose conv -> BN pair are attributes rather than Sequential neighbours.
_ATTRIBUTE_PAIRS: Dict[Type[nn.Module], Tuple[str, str]] = {
    SeparableConv: ("pointwise", "bn"),
    SpatialGate: ("conv", "bn"),
}


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d (with bias) equal to bn(conv(x)) with `bn` in eval mode."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    # float64 keeps the folded weights as close as possible to the two-step computation.
    with torch.no_grad():
        weight, bias = fold_bn(conv.weight, conv.bias, bn, dtype=torch.float64)
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    return fused


def _fold_into(conv: ConvLike, bn: nn.BatchNorm2d) -> nn.Module:
    """The module replacing `conv` once `bn` is folded into it."""
    if isinstance(conv, DeformableConv2d):
        # The deformable conv passes regular_conv.bias to deform_conv2d, so folding the BN
        # into its regular conv (now with a bias) is exact; offsets and masks are untouched.
        conv.regular_conv = fold_conv_bn(conv.regular_conv, bn)
        return conv
    return fold_conv_bn(conv, bn)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return isinstance(conv, (nn.Conv2d, DeformableConv2d)) and type(bn) is nn.BatchNorm2d


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every conv -> BN pair folded (the input is untouched)."""
    fused = copy.deepcopy(model).eval()
    for module in list(fused.modules()):
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if _foldable(module[i], module[i + 1]):
                    module[i] = _fold_into(module[i], module[i + 1])
                    module[i + 1] = nn.Identity()
        for cls, (conv_name, bn_name) in _ATTRIBUTE_PAIRS.items():
            if isinstance(module, cls) and _foldable(getattr(module, conv_name), getattr(module, bn_name)):
                setattr(module, conv_name, _fold_into(getattr(module, conv_name), getattr(module, bn_name)))
                setattr(module, bn_name, nn.Identity())
    return fused


def count_batchnorms(model: nn.Module) -> int:
    """Number of BatchNorm layers left in `model` (0 for a fully folded FeatherFace)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
