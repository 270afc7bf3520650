"""Deployment form of a FeatherFace: the same function as the trained network, with fewer and
cheaper operations. Used by the ONNX export (`target="onnx"`) and by FaceDetector's PyTorch
backend (`target="torch"`).

Every rewrite is exact in real arithmetic; in float32 the outputs move by rounding only
(tests/test_rewrites.py pins them to the export parity tolerances on V1, V2 and the converted
published v1_original, at odd sizes and batch > 1):

- batch norms folded into the convolution before them (utils/deploy/fuse.py), including the
  BN after every deformable conv (it becomes DeformConv's bias);
- BiFPN fusion weights relu(w) / (sum relu(w) + eps) computed once, at conversion; for ONNX
  also divided by each fusion's own-level weight, which moves into the conv after it
  (models/bifpn.py FusionWeights: one multiply of the largest map fewer per fusion);
- the parameter-free channel shuffle folded into the input-channel order of the next conv
  (V2 and v1_original: the first conv of the shuffle block; v1 and v1_slim: the heads);
- the three 1x1 heads of a level merged into one conv whose class channels give the two
  logit differences, so the 2-class softmax becomes a sigmoid: softmax(a, b) = (sigmoid(a - b),
  sigmoid(b - a));
- CBAM's two MLP calls share their second layer (fc2(u) + fc2(v) = W2 (u + v) + 2 b2);
- each deformable conv: the offset and modulator convs of the layers that read the same input
  computed by one conv; the 2 of the mask 2 * sigmoid(m) folded into the kernel.

ONNX-only rewrites, chosen by measuring ONNX Runtime's CPU provider (README, Speed):
- CBAM's channel mean becomes a MatMul with the channel weights (ReduceMean over the channel axis
  is about 9x slower there; a Split + Max tree for the channel max measured no faster than ReduceMax);
- V2's grouped 3x3/1x1 convs become dense convs with zero blocks: ORT's blocked-layout (NCHWc)
  kernels accept them, so the SSH, shuffle and heads run without layout reorders;
- deformable convs whose output is narrower than their input are "projected": a 1x1 projection
  (a MatMul in the graph) gives each tap's contribution (tap-major, K x Cout channels) and a 1x1
  DeformConv with one offset group per tap samples only those, K*Cout instead of K*Cin values per
  pixel (the tap's fixed displacement goes into the offset bias). `deform="gridsample"` builds every
  deformable conv from standard ops only (Conv, GridSample, Mul, ReduceSum) for runtimes without
  DeformConv;
- optional (`stem_padded`, export `--pad_stem`): the 8-channel stem widened to 16 zero channels, for
  ORT's 16-channel blocked layout on AVX-512 (`pad_stem`).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from layers.box_utils import torchvision_ops
from models.attention import CBAM, ChannelGate, SharedCBAM, SpatialGate
from models.context import SSH, ChannelShuffle, SSHGrouped, channel_shuffle
from models.deform_conv import DeformableConv2d, deform_conv2d, deform_conv2d_siblings
from models.featherface import FeatherFace
from models.heads import LevelHeads
from utils.deploy.fuse import fuse_batchnorm

TARGETS = ("onnx", "torch")
DEFORM_FORMS = ("auto", "deformconv", "projected", "gridsample")
STEM_BLOCK = 16  # ONNX Runtime's NCHWc block on AVX-512 (8 on AVX2): the width of a padded stem
Outputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _check(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    return value


# ---------------------------------------------------------------------------------------------
# Weight-level helpers


def shuffle_permutation(channels: int, groups: int, order: str) -> torch.Tensor:
    """p with channel_shuffle(x)[:, i] == x[:, p[i]]."""
    index = torch.arange(channels, dtype=torch.float64).view(1, channels, 1, 1)
    return channel_shuffle(index, groups, order).view(-1).long()


def dense_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The groups=1 weight (Cout, Cin, kh, kw) of a grouped conv: zeros outside its diagonal blocks."""
    g = conv.groups
    cout, cin_g = conv.weight.shape[:2]
    weight = conv.weight.new_zeros(cout, cin_g * g, *conv.weight.shape[2:])
    out_g = cout // g
    for i in range(g):
        weight[i * out_g:(i + 1) * out_g, i * cin_g:(i + 1) * cin_g] = conv.weight[i * out_g:(i + 1) * out_g]
    return weight


def is_grouped(conv: nn.Module) -> bool:
    """A grouped conv that is not depthwise (depthwise convs stay as they are)."""
    return isinstance(conv, nn.Conv2d) and 1 < conv.groups < conv.in_channels


def rebuilt_conv(conv: nn.Conv2d, dense: bool = False, input_permutation: Optional[torch.Tensor] = None) -> nn.Conv2d:
    """A copy of `conv`, optionally densified (groups=1) and/or reading permuted input channels:
    new(x) == conv(x[:, p]) for p = input_permutation (which needs, and forces, a dense weight)."""
    if input_permutation is not None and conv.groups == conv.in_channels > 1:
        raise ValueError("a channel permutation cannot be folded into a depthwise conv")
    dense = dense or input_permutation is not None
    weight = dense_weight(conv) if dense and conv.groups > 1 else conv.weight.detach().clone()
    if input_permutation is not None:
        permuted = torch.zeros_like(weight)
        permuted[:, input_permutation] = weight
        weight = permuted
    groups = 1 if dense else conv.groups
    new = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, groups, bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def zero_padded_conv(conv: nn.Conv2d, out_channels: int, in_channels: int) -> nn.Conv2d:
    """A copy of `conv` (groups 1 or depthwise) widened with all-zero filters and inputs: the first
    conv.out_channels outputs equal conv's on the first conv.in_channels inputs, the others are 0
    (zero weights and bias)."""
    depthwise = conv.groups == conv.in_channels > 1
    if depthwise and out_channels != in_channels:
        raise ValueError("a depthwise conv keeps as many outputs as inputs")
    if not depthwise and conv.groups != 1:
        raise ValueError("only dense and depthwise convs can be widened")
    new = nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    in_channels if depthwise else 1, bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[: conv.out_channels, : conv.weight.shape[1]] = conv.weight
        if conv.bias is not None:
            new.bias.zero_()
            new.bias[: conv.out_channels] = conv.bias
    return new


def pad_stem(body: nn.Module, channels: int = STEM_BLOCK) -> None:
    """In place, on a BN-folded MobileNetV1 (models/backbone.py): the stem conv (3 -> 8, stride 2) and
    the depthwise conv after it get `channels` channels, the extra ones all zero (LeakyReLU(0) = 0),
    and the pointwise conv after them reads those zero channels with zero weights. Same function;
    in ONNX Runtime on x86 with AVX-512, whose blocked layout (NCHWc) works in 16-channel blocks, the
    8-channel half-resolution map no longer has to be reordered to plain NCHW for the pointwise conv."""
    stem, first = body.stage1[0], body.stage1[1]
    width = stem[0].out_channels
    if channels < width:
        raise ValueError(f"the stem has {width} channels; cannot pad it to {channels}")
    stem[0] = zero_padded_conv(stem[0], channels, stem[0].in_channels)
    first[0] = zero_padded_conv(first[0], channels, channels)
    first[3] = zero_padded_conv(first[3], first[3].out_channels, channels)


def _without_identity(seq: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*[m for m in seq if not isinstance(m, nn.Identity)])


# ---------------------------------------------------------------------------------------------
# Attention


class ResidualCBAM(nn.Module):
    """relu(x + SpatialGate(ChannelGate(x))) for one map (V1 CBAM or one level of V2's manager).

    forward (B, C, H, W) -> (B, C, H, W). `onnx=True` computes the channel mean of x * scale as a
    matmul of x with scale / C (ONNX Runtime's ReduceMean over channels is several times slower).
    """

    def __init__(self, gate: ChannelGate, spatial: SpatialGate, onnx: bool) -> None:
        super().__init__()
        self.onnx, self.max_first = onnx, spatial.max_first
        self.fc1 = gate.fc1
        self.fc2 = nn.Linear(gate.fc2.in_features, gate.fc2.out_features, bias=gate.fc2.bias is not None)
        with torch.no_grad():
            self.fc2.weight.copy_(gate.fc2.weight)
            if gate.fc2.bias is not None:
                self.fc2.bias.copy_(2 * gate.fc2.bias)  # fc2(u) + fc2(v) = W2 (u + v) + 2 b2
        self.conv = spatial.conv  # its BN is folded in
        if not isinstance(spatial.bn, nn.Identity):
            raise ValueError("ResidualCBAM expects the spatial gate's BN folded into its conv (fuse_batchnorm first)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hidden = torch.relu(self.fc1(x.mean(dim=(2, 3)))) + torch.relu(self.fc1(x.amax(dim=(2, 3))))
        scale = torch.sigmoid(self.fc2(hidden))  # (B, C)
        y = x * scale[:, :, None, None]
        if self.onnx:
            mean = torch.matmul((scale / c).unsqueeze(1), x.reshape(b, c, h * w)).reshape(b, 1, h, w)
        else:
            mean = y.mean(dim=1, keepdim=True)
        mx = y.amax(dim=1, keepdim=True)
        pooled = torch.cat([mx, mean] if self.max_first else [mean, mx], dim=1)
        return torch.relu(x + y * torch.sigmoid(self.conv(pooled)))


def residual_attention_layers(attention: Optional[nn.Module], onnx: bool) -> Optional[nn.ModuleList]:
    if attention is None:
        return None
    if isinstance(attention, SharedCBAM):
        return nn.ModuleList(ResidualCBAM(g, attention.spatial_gate, onnx) for g in attention.channel_gates)
    if isinstance(attention, nn.ModuleList) and all(isinstance(m, CBAM) for m in attention):
        return nn.ModuleList(ResidualCBAM(m.channel_gate, m.spatial_gate, onnx) for m in attention)
    raise TypeError(f"unsupported attention module {type(attention).__name__}")


# ---------------------------------------------------------------------------------------------
# Deformable convolution


class DeformableSampler(nn.Module):
    """The sampling half of a BN-folded DCNv2 layer: out = sum_k W_k * (sigmoid(m_k) * x(p + p_k + d_k)) + b,
    with the 2 of the published 2 * sigmoid(m) folded into W. Offsets d and modulators m come
    from outside (`CoordinateConv`). forms: "deformconv", "projected", "gridsample", "torch"
    (the model's own CPU kernel, models/deform_conv.py)."""

    def __init__(self, dcn: DeformableConv2d, form: str) -> None:
        super().__init__()
        self.form = _check(form, ("deformconv", "projected", "gridsample", "torch"), "deformable-conv form")
        if dcn.stride != (1, 1):
            raise ValueError("the deployment form supports stride-1 deformable convs (FeatherFace's SSH)")
        weight = dcn.regular_conv.weight.detach() * 2.0
        cout, cin, kh, kw = weight.shape
        self.taps, self.out_channels, self.padding, self.kernel_size = kh * kw, cout, dcn.padding, (kh, kw)
        bias = dcn.regular_conv.bias
        self.register_buffer("bias", bias.detach().clone() if bias is not None else weight.new_zeros(cout))
        if self.form in ("projected", "gridsample"):
            # (K * Cout, Cin, 1, 1), tap-major: channels t*Cout..(t+1)*Cout-1 are tap t's contribution.
            self.register_buffer("tap_weight", weight.permute(2, 3, 0, 1).reshape(self.taps * cout, cin, 1, 1).clone())
        if self.form == "projected":
            # Summing the K sampled taps back to Cout channels: identity blocks side by side.
            self.register_buffer("weight", torch.eye(cout).repeat(1, self.taps).view(cout, self.taps * cout, 1, 1))
        elif self.form == "gridsample":
            rows, cols = self.tap_grid()
            # Pixel p samples at p + tap + offset; GridSample (align_corners=False) wants (2 * pos + 1) / size - 1.
            self.register_buffer("tap_rows", (2 * rows + 1).float().view(1, self.taps, 1, 1))
            self.register_buffer("tap_cols", (2 * cols + 1).float().view(1, self.taps, 1, 1))
        else:
            self.register_buffer("weight", weight.clone())

    def tap_grid(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(K,) float64 fixed row and column displacement of each tap (row-major taps)."""
        kh, kw = self.kernel_size
        rows = torch.arange(kh).repeat_interleave(kw).double() - self.padding[0]
        cols = torch.arange(kw).repeat(kh).double() - self.padding[1]
        return rows, cols

    def tap_displacement(self) -> torch.Tensor:
        """(2K,) fixed (dy, dx) of each tap; the projected form adds it to the offsets."""
        return torch.stack(self.tap_grid(), 1).reshape(-1)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, modulator: torch.Tensor) -> torch.Tensor:
        mask = torch.sigmoid(modulator)
        if self.form == "torch":
            return deform_conv2d(x, offset, self.weight, self.bias, padding=self.padding, mask=mask)
        if self.form == "deformconv":
            return torchvision_ops().deform_conv2d(x, offset, self.weight, self.bias, padding=self.padding, mask=mask)
        b, _, h, w = x.shape
        if self.form == "projected":
            # (B, K * Cout, H, W) as a MatMul, not a 1x1 Conv: ONNX Runtime would run the conv in its
            # blocked layout and then reorder its widest output (234 channels) back for DeformConv.
            # bmm of the expanded weight: torch.matmul would pin the exported batch to the example's 1.
            weight = self.tap_weight.flatten(1).expand(b, -1, -1)
            taps = torch.bmm(weight, x.flatten(2)).unflatten(2, (h, w))
            return torchvision_ops().deform_conv2d(taps, offset, self.weight, self.bias, mask=mask)
        taps = F.conv2d(x, self.tap_weight)  # (B, K * Cout, H, W)
        rows = torch.arange(h, dtype=x.dtype, device=x.device).view(1, 1, h, 1) * 2
        cols = torch.arange(w, dtype=x.dtype, device=x.device).view(1, 1, 1, w) * 2
        grid_y = (2 * offset[:, 0::2] + (rows + self.tap_rows)) / h - 1  # (B, K, H, W)
        grid_x = (2 * offset[:, 1::2] + (cols + self.tap_cols)) / w - 1
        grid = torch.stack([grid_x, grid_y], dim=-1).reshape(b * self.taps, h, w, 2)
        sampled = F.grid_sample(taps.reshape(b * self.taps, self.out_channels, h, w), grid, mode="bilinear",
                                padding_mode="zeros", align_corners=False)
        sampled = sampled.reshape(b, self.taps, self.out_channels, h, w) * mask.unsqueeze(2)
        return sampled.sum(dim=1) + self.bias.view(1, -1, 1, 1)


class CoordinateConv(nn.Module):
    """The offset and modulator convs of several deformable convs reading the same input, as one
    conv. forward(x) -> its output: the layers' offsets, then their modulators (`sizes` channels
    each, in that order: layer g's offsets at 2Kg.., its modulators at 2KG + Kg.., as
    models/deform_conv.py's `shared_coordinates` and `deform_conv2d_siblings` have them)."""

    def __init__(self, layers: Sequence[DeformableConv2d], samplers: Sequence[DeformableSampler]) -> None:
        super().__init__()
        offset_weights, offset_biases, modulator_weights, modulator_biases = [], [], [], []
        for dcn, sampler in zip(layers, samplers):
            offset_bias = dcn.offset_conv.bias.detach().double()
            if sampler.form == "projected":  # a 1x1 DeformConv: each tap's fixed displacement joins its offset
                offset_bias = offset_bias + sampler.tap_displacement()
            offset_weights.append(dcn.offset_conv.weight.detach())
            offset_biases.append(offset_bias.float())
            modulator_weights.append(dcn.modulator_conv.weight.detach())
            modulator_biases.append(dcn.modulator_conv.bias.detach())
        self.sizes = [w.shape[0] for w in offset_weights + modulator_weights]
        first = layers[0].offset_conv
        self.conv = nn.Conv2d(first.in_channels, sum(self.sizes), first.kernel_size, first.stride, first.padding)
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat(offset_weights + modulator_weights))
            self.conv.bias.copy_(torch.cat(offset_biases + modulator_biases))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _deform_layer(branch: nn.Sequential) -> Tuple[DeformableConv2d, Optional[float]]:
    """(deformable conv, LeakyReLU slope or None) of a BN-folded SSH branch."""
    layers = [m for m in branch if not isinstance(m, nn.Identity)]
    dcn = layers[0]
    if not isinstance(dcn, DeformableConv2d) or len(layers) > 2:
        raise TypeError("expected a BN-folded (DeformableConv2d[, LeakyReLU]) SSH branch")
    slope = layers[1].negative_slope if len(layers) == 2 else None
    return dcn, slope


class DeformableContext(nn.Module):
    """V1 SSH with shared coordinate convs: one for conv3x3 + conv5x5_1 (they read x), one for
    conv5x5_2 + conv7x7_2 (they read the 5x5_1 output), one for conv7x7_3."""

    def __init__(self, ssh: SSH, form_for: Callable[[int, int], str]) -> None:
        super().__init__()
        names = ("conv3x3", "conv5x5_1", "conv5x5_2", "conv7x7_2", "conv7x7_3")
        dcns, self.slopes = zip(*(_deform_layer(getattr(ssh, n)) for n in names))
        self.samplers = nn.ModuleList(
            DeformableSampler(d, form_for(d.regular_conv.in_channels, d.regular_conv.out_channels)) for d in dcns)
        s = self.samplers
        self.coords_x = CoordinateConv(dcns[0:2], s[0:2])
        self.coords_mid = CoordinateConv(dcns[2:4], s[2:4])
        self.coords_7x7 = CoordinateConv(dcns[4:5], s[4:5])

    def _act(self, i: int, y: torch.Tensor) -> torch.Tensor:
        return y if self.slopes[i] is None else F.leaky_relu(y, self.slopes[i])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3, mid = self._siblings((0, 1), self.coords_x, x)
        branch5, mid7 = self._siblings((2, 3), self.coords_mid, mid)
        (branch7,) = self._siblings((4,), self.coords_7x7, mid7)
        return torch.relu(torch.cat([branch3, branch5, branch7], dim=1))

    def _siblings(self, layers: Sequence[int], coords: CoordinateConv, x: torch.Tensor) -> List[torch.Tensor]:
        """The layers `layers` (reading x) after their activations."""
        samplers = [self.samplers[i] for i in layers]
        out = coords(x)
        if len(layers) > 1 and all(s.form == "torch" for s in samplers):
            # One sampling plan for the siblings (models/deform_conv.py).
            split = sum(coords.sizes[:len(layers)])
            outs = deform_conv2d_siblings(x, out[:, :split], torch.sigmoid(out[:, split:]),
                                          [s.weight for s in samplers], [s.bias for s in samplers],
                                          padding=samplers[0].padding)
        else:
            parts = out.split(coords.sizes, dim=1)  # offsets of each layer, then modulators
            outs = [s(x, parts[g], parts[len(layers) + g]) for g, s in enumerate(samplers)]
        return [self._act(i, y) for i, y in zip(layers, outs)]


class PlainContext(nn.Module):
    """V2 SSH (grouped convs, BN folded; densified for ONNX)."""

    def __init__(self, ssh: SSHGrouped, dense: bool) -> None:
        super().__init__()
        for name in ("conv3x3", "conv5x5_1", "conv5x5_2", "conv7x7_2", "conv7x7_3"):
            layers = [rebuilt_conv(m, dense=dense) if is_grouped(m) else m for m in _without_identity(getattr(ssh, name))]
            setattr(self, name, nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.conv5x5_1(x)
        return torch.relu(torch.cat([self.conv3x3(x), self.conv5x5_2(mid), self.conv7x7_3(self.conv7x7_2(mid))], 1))


# ---------------------------------------------------------------------------------------------
# Heads


class MergedHeads(nn.Module):
    """One 1x1 conv per level giving, per anchor, [4 box, 2 class-logit differences, 10 landmark]
    values; forward(feats) -> (bbox (B, N, 4), scores (B, N, 2), landmarks (B, N, 10)) with the
    scores equal to softmax over the two class logits."""

    def __init__(self, bbox: LevelHeads, cls: LevelHeads, ldm: LevelHeads,
                 input_permutation: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        anchors = bbox.convs[0].out_channels // bbox.values_per_anchor
        self.sizes = [bbox.values_per_anchor, cls.values_per_anchor, ldm.values_per_anchor]
        if self.sizes[1] != 2:
            raise ValueError("MergedHeads turns a 2-class softmax into a sigmoid; got "
                             f"{self.sizes[1]} classes")
        self.width = sum(self.sizes)
        self.convs = nn.ModuleList()
        for box_conv, cls_conv, ldm_conv in zip(bbox.convs, cls.convs, ldm.convs):
            cin = box_conv.in_channels
            w_box, w_cls, w_ldm = (c.weight.detach().double().view(anchors, -1, cin) for c in (box_conv, cls_conv, ldm_conv))
            b_box, b_cls, b_ldm = (c.bias.detach().double().view(anchors, -1) for c in (box_conv, cls_conv, ldm_conv))
            # softmax(a, b) = (sigmoid(a - b), sigmoid(b - a)): the conv gives a - b and b - a.
            w_cls = w_cls - w_cls.flip(1)
            b_cls = b_cls - b_cls.flip(1)
            weight = torch.cat([w_box, w_cls, w_ldm], 1).reshape(anchors * self.width, cin)
            bias = torch.cat([b_box, b_cls, b_ldm], 1).reshape(anchors * self.width)
            conv = nn.Conv2d(cin, anchors * self.width, 1)
            with torch.no_grad():
                conv.weight.copy_(weight.float().view(anchors * self.width, cin, 1, 1))
                conv.bias.copy_(bias.float())
            self.convs.append(rebuilt_conv(conv, input_permutation=input_permutation)
                              if input_permutation is not None else conv)

    def forward(self, feats: Sequence[torch.Tensor]) -> Outputs:
        per_level = [conv(f).permute(0, 2, 3, 1).reshape(f.shape[0], -1, self.width)
                     for conv, f in zip(self.convs, feats)]
        bbox, logit_diff, landmarks = torch.cat(per_level, dim=1).split(self.sizes, dim=-1)
        return bbox, torch.sigmoid(logit_diff), landmarks


# ---------------------------------------------------------------------------------------------
# The whole network


def _shuffle_block(block: nn.Module, dense: bool) -> nn.Module:
    """A shuffle block with its leading shuffle folded into the input order of its first conv; a
    parameter-free shuffle becomes the identity (the caller folds it into the heads)."""
    if isinstance(block, ChannelShuffle):
        return nn.Identity()
    layers = list(_without_identity(block))
    shuffle, first = layers[0], layers[1]
    if not isinstance(shuffle, ChannelShuffle) or not isinstance(first, nn.Conv2d):
        raise TypeError("expected a shuffle block starting with ChannelShuffle then Conv2d")
    perm = shuffle_permutation(first.in_channels, shuffle.groups, shuffle.order)
    rest = [rebuilt_conv(m, dense=dense) if dense and is_grouped(m) else m for m in layers[2:]]
    return nn.Sequential(rebuilt_conv(first, input_permutation=perm), *rest)


class DeployedFeatherFace(nn.Module):
    """Inference-only FeatherFace with the rewrites of this module; forward as FeatherFace.eval():
    x (B, 3, H, W) -> (bbox (B, N, 4), scores (B, N, 2), landmarks (B, N, 10)). `config` is the
    source model's config (for priors, metadata and export)."""

    def __init__(self, model: nn.Module, target: str = "onnx", deform: str = "auto", stem_padded: bool = False) -> None:
        super().__init__()
        _check(target, TARGETS, "deployment target")
        _check(deform, DEFORM_FORMS, "deformable-conv form")
        onnx = target == "onnx"
        m = fuse_batchnorm(model)  # a folded copy; the caller's model is untouched
        self.config = m.config
        self.body = m.body
        if stem_padded:
            pad_stem(self.body)
        self.backbone_attention = residual_attention_layers(m.backbone_cbam, onnx)
        for cell in m.bifpn:  # fusion weights as constants, folded for ONNX (models/bifpn.py FusionWeights)
            cell.fold_fusion_weights() if onnx else cell.freeze_fusion_weights()
        self.bifpn = m.bifpn
        self.bifpn_attention = residual_attention_layers(m.bifpn_cbam, onnx)
        form_for = _form_rule(target, deform)
        self.context = nn.ModuleList(
            DeformableContext(ssh, form_for) if isinstance(ssh, SSH) else PlainContext(ssh, dense=onnx)
            for ssh in m.ssh)
        shuffles, head_perm = [], None
        for block in m.shuffle:
            shuffles.append(_shuffle_block(block, dense=onnx))
            if isinstance(block, ChannelShuffle):
                head_perm = shuffle_permutation(m.config.out_channels, block.groups, block.order)
        self.shuffle = nn.ModuleList(shuffles)
        self.heads = MergedHeads(m.bbox_head, m.class_head, m.landmark_head, head_perm)
        self.eval()

    def forward(self, x: torch.Tensor) -> Outputs:
        feats = list(self.body(x))
        if self.backbone_attention is not None:
            feats = [att(f) for att, f in zip(self.backbone_attention, feats)]
        feats = list(self.bifpn(tuple(feats)))
        if self.bifpn_attention is not None:
            feats = [att(f) for att, f in zip(self.bifpn_attention, feats)]
        feats = [shuffle(context(f)) for context, shuffle, f in zip(self.context, self.shuffle, feats)]
        return self.heads(feats)


def _form_rule(target: str, deform: str) -> Callable[[int, int], str]:
    """Which sampler each deformable conv gets, from (Cin, Cout)."""
    if target == "torch":
        # The model's own no-grad sampler (embedding_bag, models/deform_conv.py) beats PyTorch's
        # grid_sample on FeatherFace's SSH layers (2 threads, 80x80: 52->26 7.4 vs 10.1 ms, 52->13
        # 5.2 vs 6.1, 13->13 3.7 vs 5.8).
        return lambda cin, cout: "torch"
    if deform == "auto":
        # Projected sampling reads K*Cout instead of K*Cin values per pixel: it pays when Cout < Cin.
        return lambda cin, cout: "projected" if cout < cin else "deformconv"
    return lambda cin, cout: deform


def deploy_model(model: nn.Module, target: str = "onnx", deform: str = "auto", stem_padded: bool = False) -> nn.Module:
    """The deployment form of `model` (see the module docstring); `model` itself is not changed.

    target "onnx" (graph for ONNX Runtime) or "torch" (eager inference); deform (ONNX only):
    "auto" (projected DeformConv where the output is narrower than the input, plain DeformConv
    elsewhere), "deformconv", "projected" or "gridsample" (standard ops only, no DeformConv);
    stem_padded: the 8-channel stem widened to STEM_BLOCK zero-padded channels (`pad_stem`).
    A module that is not a FeatherFace (a stand-in with a `config`) only gets its batch norms folded.
    """
    if not isinstance(model, FeatherFace):
        _check(target, TARGETS, "deployment target")
        return fuse_batchnorm(model)
    return DeployedFeatherFace(model, target, deform, stem_padded)
