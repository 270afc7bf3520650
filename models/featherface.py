"""FeatherFace V1 and V2 assembled from a frozen `ModelConfig`.

Dataflow (docs/ARCHITECTURE.md §2, §3): MobileNetV1-0.25 stages 1-3 -> residual CBAM on
C3/C4/C5 -> BiFPN -> [residual CBAM] -> SSH per level -> channel shuffle per level ->
class/box/landmark heads.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from data.config import CONFIGS, ModelConfig, get_config
from layers.box_utils import torchvision_ops
from models.attention import CBAM, SharedCBAM, residual_attention
from models.backbone import MobileNetV1
from models.bifpn import BiFPN, BiFPNLight
from models.context import SSH, ChannelShuffle, SSHGrouped, conv_shuffle_block, light_shuffle_block
from models.heads import LevelHeads

Outputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class FeatherFace(nn.Module):
    """FeatherFace detector (V1 family or V2), built from a `ModelConfig`.

    forward(x (B, 3, H, W), BGR minus mean) -> (bbox_regressions (B, N, 4),
    classifications (B, N, 2), landmarks (B, N, 10)), N = A * sum_s ceil(H/s) * ceil(W/s).
    Classifications are logits in training mode and softmax scores in eval mode. Any H, W >= 1
    and B >= 0 work; other ranks, channel counts or integer input are a ValueError (`check_input`).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        if config.dropblock_prob > 0:
            torchvision_ops()  # imported while building, never inside forward (tracing, compiling)
        c, levels = config.out_channels, config.backbone_channels
        self.body = MobileNetV1()
        if config.arch == "v1":
            if not config.deformable:
                raise ValueError("V1 models use deformable SSH; set arch='v2' for the plain-conv student")
            self.backbone_cbam = (
                nn.ModuleList(CBAM(ch, config.cbam_reduction) for ch in levels) if config.backbone_cbam else None
            )
            self.bifpn = BiFPN(c, levels, config.bifpn_cells)
            self.bifpn_cbam = (
                nn.ModuleList(CBAM(c, config.cbam_reduction) for _ in levels) if config.post_bifpn_cbam else None
            )
            self.ssh = nn.ModuleList(SSH(c) for _ in levels)
            if config.shuffle == "conv":
                self.shuffle = nn.ModuleList(conv_shuffle_block(c, config.shuffle_order) for _ in levels)
            elif config.shuffle == "free":
                self.shuffle = nn.ModuleList(ChannelShuffle(2, config.shuffle_order) for _ in levels)
            else:
                raise ValueError(f"unknown shuffle {config.shuffle!r}; use 'free' or 'conv'")
        elif config.arch == "v2":
            self.backbone_cbam = SharedCBAM(levels, config.cbam_reduction)
            self.bifpn = BiFPNLight(c, levels, config.bifpn_cells)
            self.bifpn_cbam = SharedCBAM([c] * len(levels), config.cbam_reduction)
            self.ssh = nn.ModuleList(SSHGrouped(c) for _ in levels)
            self.shuffle = nn.ModuleList(light_shuffle_block(c) for _ in levels)
        else:
            raise ValueError(f"unknown arch {config.arch!r}; use 'v1' or 'v2'")
        a = config.num_anchors
        self.bbox_head = LevelHeads(c, a, 4, len(levels))
        self.class_head = LevelHeads(c, a, 2, len(levels))
        self.landmark_head = LevelHeads(c, a, 10, len(levels))

    def _attend(self, attention: Union[nn.ModuleList, SharedCBAM, None], feats: List[torch.Tensor]) -> List[torch.Tensor]:
        if attention is None:
            return list(feats)
        if isinstance(attention, SharedCBAM):
            return residual_attention(feats, attention(feats))
        return residual_attention(feats, [cbam(f) for cbam, f in zip(attention, feats)])

    def features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Per-level features fed to the heads: [(B, C, H/8, W/8), (B, C, H/16, W/16), (B, C, H/32, W/32)]."""
        feats = self._attend(self.backbone_cbam, list(self.body(x)))
        feats = self._attend(self.bifpn_cbam, list(self.bifpn(tuple(feats))))
        if self.training and self.config.dropblock_prob > 0:
            p, size = self.config.dropblock_prob, self.config.dropblock_size
            # Maps smaller than a block (tiny inputs) are left alone: nothing sensible to drop.
            feats = [torchvision_ops().drop_block2d(f, p, size) if min(f.shape[-2:]) >= size else f for f in feats]
        return [shuffle(ssh(f)) for ssh, shuffle, f in zip(self.ssh, self.shuffle, feats)]

    def forward(self, x: torch.Tensor) -> Outputs:
        check_input(x)
        if not self.training and x.device.type == "cpu" and not torch.onnx.is_in_onnx_export():
            # Inference on the CPU runs channels-last: oneDNN's convolutions and the pools then
            # skip a layout conversion per layer (about 25 % of v1's eager time at 640x640).
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.features(x)
        bbox = self.bbox_head(feats)  # (B, N, 4)
        cls = self.class_head(feats)  # (B, N, 2)
        ldm = self.landmark_head(feats)  # (B, N, 10)
        if not self.training:
            cls = F.softmax(cls, dim=-1)
        return bbox, cls, ldm

    def module_groups(self) -> Dict[str, Optional[nn.Module]]:
        """The named parts used by parameter tables (validate_parameters.py); None for a part the
        model does not have (v1_slim's post-BiFPN CBAM)."""
        return {
            "backbone": self.body,
            "backbone_cbam": self.backbone_cbam,
            "bifpn": self.bifpn,
            "bifpn_cbam": self.bifpn_cbam,
            "ssh": self.ssh,
            "channel_shuffle": self.shuffle,
            "heads": nn.ModuleList([self.bbox_head, self.class_head, self.landmark_head]),
        }


def check_input(x: torch.Tensor) -> None:
    """Raise a ValueError unless x is a floating-point (B, 3, H, W) batch (docs/ARCHITECTURE.md
    §1.1). Only static facts are tested (rank, channels, dtype), so exports keep B, H, W dynamic."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"FeatherFace expects a (B, 3, H, W) BGR batch, got a tensor of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"FeatherFace expects a floating-point batch (BGR minus the channel means), got {x.dtype}")


def count_parameters(module: nn.Module | None) -> int:
    """Number of parameter values (BN running statistics excluded); 0 for an absent part."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def build_model(name_or_config: Union[str, ModelConfig]) -> FeatherFace:
    """Build a FeatherFace by registered name ("v1", "v1_original", "v1_slim", "v2") or config."""
    config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    return FeatherFace(config)


MODELS = {name: (lambda n=name: build_model(n)) for name in CONFIGS}
