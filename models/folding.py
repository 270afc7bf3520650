"""Batch-norm folding: the one place for the formula.

In eval mode a BatchNorm2d is the per-channel affine map bn(y) = y * s + t with
s = gamma / sqrt(running_var + eps) and t = beta - running_mean * s, so conv -> BN equals one
conv with weight W * s and bias b * s + t. Two users:

- the model itself: `ConvBNSequential` (every conv -> BN pair of a Sequential), `conv_bn_forward`
  (a named conv and BN: CBAM's spatial gate, the BiFPN's separable convs) and `folded_parameters`
  (the SSH's sibling deformable convs, models/context.py). An eval-mode BN is folded on every call
  (a few tiny ops on the weights, nothing cached, so it always reflects the current parameters),
  which skips the BN pass over the feature map: on the CPU in channels-last that pass is slow for
  narrow maps (the 16-channel 320x320 map of the backbone alone costs about 2 ms at 640x640). The
  BN's own mode decides: a frozen (eval-mode) BN inside a training model folds too, and gradients
  flow through the fold to the conv, gamma and beta as through the BN. BNs in training mode or
  without running statistics, maps too small for the fold to pay (`FOLD_MIN_VALUES`) and ONNX
  export take the ordinary conv -> BN path. Equal to conv -> BN up to float rounding.
- utils/deploy/fuse.py: the deployment form folds once, in float64, and drops the BN.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from models.deform_conv import DeformableConv2d


def bn_scale_shift(bn: nn.BatchNorm2d, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """(s, t), each (C,), with bn(y) == y * s + t per channel for `bn` in eval mode (computed in
    `dtype` when given, else in the BN's own)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm2d without running statistics (track_running_stats=False)")
    var, mean, gamma, beta = bn.running_var, bn.running_mean, bn.weight, bn.bias
    if dtype is not None:  # converted only when asked: an eval-mode model folds on every call
        var, mean = var.to(dtype), mean.to(dtype)
        gamma, beta = [None if p is None else p.to(dtype) for p in (gamma, beta)]
    scale = torch.rsqrt(var + bn.eps)
    if gamma is not None:
        scale = scale * gamma
    if beta is None:
        return scale, mean * -scale
    return scale, torch.addcmul(beta, mean, scale, value=-1)


def fold_bn(weight: Tensor, bias: Optional[Tensor], bn: nn.BatchNorm2d,
            dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """(weight', bias') of the conv equal to bn(conv(x)): weight (Cout, ...) scaled per output channel."""
    if bn.num_features != weight.shape[0]:
        raise ValueError(f"BatchNorm2d has {bn.num_features} channels, the conv gives {weight.shape[0]}")
    scale, shift = bn_scale_shift(bn, dtype)
    if dtype is not None:
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    folded = weight * scale.view(-1, *[1] * (weight.dim() - 1))
    return folded, shift if bias is None else torch.addcmul(shift, bias, scale)


# Folding costs a handful of tiny ops on the weights (~12 us on a CPU); a BN pass costs about
# 0.5 ns per value of its map (estimated as BN channels x the conv's input H x W). Below this
# many values per image the BN pass is cheaper.
FOLD_MIN_VALUES = 2**16


def folds_at_call(bn: nn.Module, x: Tensor) -> bool:
    """True when an eval-mode forward folds `bn` into the conv that reads `x` (B, C, H, W)."""
    # The export check comes before the size test: an exporter's symbolic H and W must not meet a
    # size comparison (it would become a guard on the dynamic axes).
    return (type(bn) is nn.BatchNorm2d and not bn.training and bn.running_mean is not None
            and not torch.onnx.is_in_onnx_export()
            and bn.num_features * x.shape[-2] * x.shape[-1] >= FOLD_MIN_VALUES)


def folded_parameters(conv: Union[nn.Conv2d, DeformableConv2d], bn: nn.Module,
                      x: Tensor) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
    """(weight, bias) of the one conv equal to bn(conv(x)) when `folds_at_call(bn, x)`, else None."""
    if not folds_at_call(bn, x):
        return None
    if isinstance(conv, DeformableConv2d):
        return fold_bn(conv.regular_conv.weight, conv.regular_conv.bias, bn)
    return fold_bn(conv.weight, conv.bias, bn)


def conv_bn_forward(conv: Union[nn.Conv2d, DeformableConv2d], bn: nn.Module, x: Tensor) -> Tensor:
    """bn(conv(x)), as one conv call with folded weights when `folds_at_call(bn, x)`."""
    folded = folded_parameters(conv, bn, x)
    if folded is None:
        return bn(conv(x))
    if isinstance(conv, DeformableConv2d):
        return conv(x, *folded)
    return conv._conv_forward(x, *folded)


class ConvBNSequential(nn.Sequential):
    """nn.Sequential (same children, same state-dict keys) that runs every (conv, BatchNorm2d)
    pair of neighbours through `conv_bn_forward` (folded in eval mode, conv then BN otherwise)."""

    def forward(self, x: Tensor) -> Tensor:
        layers, i = list(self), 0
        while i < len(layers):
            following = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layers[i], (nn.Conv2d, DeformableConv2d)) and type(following) is nn.BatchNorm2d:
                x = conv_bn_forward(layers[i], following, x)
                i += 2
            else:
                x = layers[i](x)
                i += 1
        return x
