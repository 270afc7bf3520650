"""Bidirectional feature pyramids over P3/P4/P5.

`BiFPN` is V1's cell (§2.3: EfficientDet's BiFPN cut to three levels, fast normalised
fusion, Swish, separable convs without activation). `BiFPNLight` is V2's cell (§3:
depthwise-separable conv blocks with ReLU inside, SiLU fusion, P5 fusing three inputs).

Shape handling is written so that any input size works and the ONNX export keeps batch, H and
W dynamic:
- "same" 3x3 stride-1 convs are symmetric padding 1 (identical to TF-"same" for stride 1);
- up-sampling is nearest to the exact size of the finer map (as the published code does, so
  it runs at every input size, odd feature maps included);
- V1's 3x3/2 max-pool reproduces the published TF-"same" zero padding exactly for every map
  size n: extra = (ceil(n/2) - 1) * 2 - n + 3 rows, extra // 2 before and the rest after,
  i.e. 0 before / 1 after for even n and 1 / 1 for odd n (see `SameMaxPool`; in ONNX the
  padding is computed from the map's shape inside the graph).

Sections (§) refer to docs/ARCHITECTURE.md.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from models.folding import ConvBNSequential, conv_bn_forward

EPSILON = 1e-4  # fusion-weight normaliser (EfficientDet)

Features = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def normalised_fusion_weights(weights: torch.Tensor) -> torch.Tensor:
    """Fast normalised fusion weights: relu(w_raw) / (sum relu(w_raw) + eps)."""
    w = torch.relu(weights)
    return w / (w.sum() + EPSILON)


def weighted_sum(weights: Sequence, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i w_i x_i over the inputs; `weights` may be longer (V1's p5_w2 quirk: 3 weights
    normalised together, 2 inputs), and its extra entries are ignored."""
    out = weights[0] * inputs[0]
    for i in range(1, len(inputs)):
        out = out + weights[i] * inputs[i]
    return out


def fuse(weights: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fast normalised fusion (EfficientDet): sum_i w_i x_i with the normalised weights."""
    return weighted_sum(normalised_fusion_weights(weights), inputs)


class FusionWeights(nn.Module):
    """Base of the BiFPN cells: their learnt fusion weights (p4_w1, p3_w1, p4_w2, p5_w2) and the
    fusion nodes that use them, `fused(name, ...)` = conv(silu(sum_i w_i x_i)) with the conv named
    in FUSION_CONVS. Two deployment forms, both exact in real arithmetic (utils/deploy/rewrites.py):

    - `freeze_fusion_weights()` replaces the weights at run time by their normalised values as
      Python constants, so a traced graph holds constants instead of recomputing relu / sum /
      divide on every call;
    - `fold_fusion_weights()` also divides each node's weights by its first one, w0 (the weight of
      the node's own-level map), and moves w0 into the node's conv: silu(w0 z) = w0 z sigmoid(w0 z)
      and that conv starts with a conv layer, which absorbs the w0 into its weight. The node then
      computes z = a + (w1 / w0) b + ..., with the multiply of an up-sampled input applied before
      the nearest up-sampling (they commute), and conv(z * sigmoid(w0 z)): one multiply of the
      largest map fewer per node, and ONNX Runtime fuses z * sigmoid(w0 z) into one kernel. A node
      whose w0 is 0 (its raw weight clipped by the ReLU) keeps the frozen form. The convs' weights
      change, so a folded cell is for inference only.
    """

    FUSION_NAMES = ("p4_w1", "p3_w1", "p4_w2", "p5_w2")
    FUSION_CONVS = {"p4_w1": "conv4_up", "p3_w1": "conv3_up", "p4_w2": "conv4_down", "p5_w2": "conv5_down"}

    def __init__(self) -> None:
        super().__init__()
        self.frozen_fusion: dict | None = None
        self.folded_fusion = False

    def fuse_named(self, name: str, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """sum_i w_i x_i with the normalised weights of fusion `name` (frozen ones when frozen)."""
        if self.frozen_fusion is not None:
            return weighted_sum(self.frozen_fusion[name], inputs)
        return fuse(getattr(self, name), inputs)

    def fused(self, name: str, own: torch.Tensor, upsampled: torch.Tensor | None = None,
              others: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The fusion node `name`: its conv applied to silu of the weighted sum of `own` (the map of
        the node's level), `upsampled` (a coarser map, brought to own's size) and `others` (at
        own's size), weighted in that order."""
        conv = getattr(self, self.FUSION_CONVS[name])
        if self.folded_fusion and self.frozen_fusion[name][0] > 0:
            w0, *rest = self.frozen_fusion[name]
            ratios = iter(w / w0 for w in rest)
            z = own
            if upsampled is not None:
                z = z + upsample_to(upsampled * next(ratios), own)
            for x in others:
                z = z + x * next(ratios)
            return conv(z * torch.sigmoid(z * w0))
        inputs = [own] + ([upsample_to(upsampled, own)] if upsampled is not None else []) + list(others)
        return conv(F.silu(self.fuse_named(name, inputs)))

    def freeze_fusion_weights(self) -> None:
        with torch.no_grad():
            self.frozen_fusion = {name: [float(v) for v in normalised_fusion_weights(getattr(self, name).double())]
                                  for name in self.FUSION_NAMES}

    def fold_fusion_weights(self) -> None:
        if self.folded_fusion:
            return
        self.freeze_fusion_weights()
        with torch.no_grad():
            for name, conv_name in self.FUSION_CONVS.items():
                w0 = self.frozen_fusion[name][0]
                if w0 > 0:
                    first = next(m for m in getattr(self, conv_name).modules() if isinstance(m, nn.Conv2d))
                    first.weight.mul_(w0)
        self.folded_fusion = True


def upsample_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Nearest up-sampling of x to ref's spatial size.

    In an ONNX export at a fixed input size (export_dynamic_onnx.py --static_size) where ref is
    exactly twice x, the same up-sampling is traced as a factor of 2: ONNX Runtime runs a Resize
    with constant scales in its blocked layout, and one with a `sizes` input outside it. (Equal
    results: both take source pixel floor(i / 2).) Dynamic shapes keep the size form."""
    size = tuple(ref.shape[-2:])
    if (torch.onnx.is_in_onnx_export() and all(isinstance(n, int) for n in size + tuple(x.shape[-2:]))
            and size == (2 * x.shape[-2], 2 * x.shape[-1])):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.interpolate(x, size=size, mode="nearest")


def same_max_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-2 max-pool with TF-"same" zero padding: (0 before, 1 after) on an even side,
    (1, 1) on an odd one. (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2)).

    Computed without padding the map: PyTorch's pool ignores its own padding (and, with
    ceil_mode, the missing cells of the last window), so the windows that reach TF's zero
    padding (the last row and column, and the first ones on an odd side) are then raised to 0
    in place. Equal bit for bit to pooling the zero-padded map, and a copy of the map cheaper."""
    h, w = x.shape[-2], x.shape[-1]
    out = F.max_pool2d(x, 3, 2, padding=(h % 2, w % 2), ceil_mode=True)
    out[..., -1, :].clamp_(min=0)
    out[..., -1].clamp_(min=0)
    if h % 2:
        out[..., 0, :].clamp_(min=0)
    if w % 2:
        out[..., 0].clamp_(min=0)
    return out


@torch.library.custom_op("featherface::same_max_pool", mutates_args=())
def same_max_pool_op(x: torch.Tensor) -> torch.Tensor:
    """`same_max_pool` as one opaque op for the ONNX exporter. torch.export cannot prove that
    the parity padding's output size equals ceil(n/2) (it must, to add the pooled map to the
    next level), so the exporter sees this op with that size declared, and
    utils/deploy/export.py translates it to a SAME_UPPER MaxPool raised to a zero border."""
    return same_max_pool(x)


@same_max_pool_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.new_empty(b, c, (h + 1) // 2, (w + 1) // 2)


class SameMaxPool(nn.Module):
    """3x3 stride-2 max-pool with TF-"same" zero padding, exact for every input size.

    TF-"same" pads (0 before, 1 after) an even side and (1, 1) an odd one, so the last
    window is always centred on the last row/column. In eager mode that padding is applied
    directly (`same_max_pool`); in an ONNX export the op is opaque (`same_max_pool_op`) and
    becomes a SAME_UPPER MaxPool whose windows that reach the padding are raised to zero
    (utils/deploy/export.py), so batch, H and W stay dynamic. Output (B, C, ceil(H/2), ceil(W/2)).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return same_max_pool_op(x)
        return same_max_pool(x)


class SeparableConv(nn.Module):
    """V1 fusion conv: depthwise 3x3 (no bias) -> pointwise 1x1 (bias) -> BN, no activation.
    C^2 + 12C parameters."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=True)
        self.bn = nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn_forward(self.pointwise, self.bn, self.depthwise(x))


def projection(in_ch: int, out_ch: int, bias: bool) -> nn.Sequential:
    """1x1 conv + BN (eps 1e-3, momentum 0.01) bringing a backbone map to the BiFPN width."""
    return ConvBNSequential(nn.Conv2d(in_ch, out_ch, 1, bias=bias), nn.BatchNorm2d(out_ch, eps=1e-3, momentum=0.01))


class BiFPNCell(FusionWeights):
    """One V1 BiFPN cell (§2.3). The first cell projects the backbone maps (twice for
    P4/P5: separate projections feed the top-down and bottom-up paths).

    Parameters: 4 (C^2 + 12C) + 10, plus 847C for the projections of the first cell
    (C=52: 57,366 first, 13,322 later)."""

    def __init__(self, channels: int, in_channels: Sequence[int] | None = None) -> None:
        super().__init__()
        self.first = in_channels is not None
        if self.first:
            c3, c4, c5 = in_channels
            self.p3_down_channel = projection(c3, channels, bias=True)
            self.p4_down_channel = projection(c4, channels, bias=True)
            self.p5_down_channel = projection(c5, channels, bias=True)
            self.p4_down_channel_2 = projection(c4, channels, bias=True)
            self.p5_down_channel_2 = projection(c5, channels, bias=True)
        self.p4_w1 = nn.Parameter(torch.ones(2))
        self.p3_w1 = nn.Parameter(torch.ones(2))
        self.p4_w2 = nn.Parameter(torch.ones(3))
        self.p5_w2 = nn.Parameter(torch.ones(3))  # 3 weights, 2 used (published quirk)
        self.conv4_up = SeparableConv(channels)
        self.conv3_up = SeparableConv(channels)
        self.conv4_down = SeparableConv(channels)
        self.conv5_down = SeparableConv(channels)
        self.downsample = SameMaxPool()

    def forward(self, feats: Features) -> Features:
        if self.first:
            c3, c4, c5 = feats
            p3_in, p4_in, p5_in = self.p3_down_channel(c3), self.p4_down_channel(c4), self.p5_down_channel(c5)
        else:
            p3_in, p4_in, p5_in = feats
        p4_td = self.fused("p4_w1", p4_in, upsampled=p5_in)
        p3_out = self.fused("p3_w1", p3_in, upsampled=p4_td)
        if self.first:
            p4_in, p5_in = self.p4_down_channel_2(c4), self.p5_down_channel_2(c5)
        p4_out = self.fused("p4_w2", p4_in, others=[p4_td, self.downsample(p3_out)])
        p5_out = self.fused("p5_w2", p5_in, others=[self.downsample(p4_out)])
        return p3_out, p4_out, p5_out


class BiFPN(nn.Sequential):
    """`num_cells` stacked V1 cells; forward((C3, C4, C5)) -> (P3, P4, P5), each (B, C, ., .)."""

    def __init__(self, channels: int, in_channels: Sequence[int], num_cells: int = 3) -> None:
        super().__init__(*[BiFPNCell(channels, in_channels if i == 0 else None) for i in range(num_cells)])


class DepthwiseSeparableConv(nn.Module):
    """V2 conv block: dw3x3 (no bias) -> BN -> ReLU -> pw1x1 (no bias) -> BN."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = ConvBNSequential(
            nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class BiFPNLightCell(FusionWeights):
    """One V2 BiFPN cell (§3). P5_out fuses [P5_in, pool(P4_out), pool(P4_td)].
    C=32: 20,298 parameters in the first cell (with the projections), 5,770 in a later one."""

    def __init__(self, channels: int, in_channels: Sequence[int] | None = None) -> None:
        super().__init__()
        self.projections = (
            nn.ModuleList(projection(c, channels, bias=False) for c in in_channels) if in_channels else None
        )
        self.p4_w1 = nn.Parameter(torch.ones(2))
        self.p3_w1 = nn.Parameter(torch.ones(2))
        self.p4_w2 = nn.Parameter(torch.ones(3))
        self.p5_w2 = nn.Parameter(torch.ones(3))
        self.conv4_up = DepthwiseSeparableConv(channels)
        self.conv3_up = DepthwiseSeparableConv(channels)
        self.conv4_down = DepthwiseSeparableConv(channels)
        self.conv5_down = DepthwiseSeparableConv(channels)
        self.downsample = nn.MaxPool2d(3, 2, padding=1)

    def forward(self, feats: Features) -> Features:
        if self.projections is not None:
            feats = [proj(f) for proj, f in zip(self.projections, feats)]
        p3_in, p4_in, p5_in = feats
        p4_td = self.fused("p4_w1", p4_in, upsampled=p5_in)
        p3_out = self.fused("p3_w1", p3_in, upsampled=p4_td)
        p4_out = self.fused("p4_w2", p4_in, others=[p4_td, self.downsample(p3_out)])
        p5_out = self.fused("p5_w2", p5_in, others=[self.downsample(p4_out), self.downsample(p4_td)])
        return p3_out, p4_out, p5_out


class BiFPNLight(nn.Sequential):
    """`num_cells` stacked V2 cells; forward((C3, C4, C5)) -> (P3, P4, P5)."""

    def __init__(self, channels: int, in_channels: Sequence[int], num_cells: int = 2) -> None:
        super().__init__(*[BiFPNLightCell(channels, in_channels if i == 0 else None) for i in range(num_cells)])
