"""MobileNetV1 x0.25 ("mobilenet0.25"), stages 1-3, as RetinaFace and FeatherFace use it.

Spec section 2.1: 213,072 parameters; outputs C3/C4/C5 with 64/128/256 channels at strides
8/16/32. Module indices match the commonly distributed ImageNet checkpoint
(`module.stage1.0.0.weight`, ...), so its weights load by name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple, Union

import torch
from torch import nn


def conv_bn(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.LeakyReLU(0.1, inplace=True),
    )


def conv_dw(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 + BN + LeakyReLU, then pointwise 1x1 + BN + LeakyReLU."""
    return nn.Sequential(
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


class CheckpointMismatchError(ValueError):
    """A weights file does not fit the model it is loaded into."""


def load_pretrained_backbone(backbone: MobileNetV1, path: Union[str, Path]) -> None:
    """Load ImageNet weights from the commonly distributed `mobilenetV1X0.25_pretrain.tar`.

    Accepts a dict with `state_dict` (keys prefixed `module.`) or a plain state dict. The
    classifier (`fc.*`) is dropped. Missing or unexpected keys raise CheckpointMismatchError
    naming them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone not found: {path}")
    try:
        # The file is a legacy pickle that also stores the optimizer; tensors only otherwise.
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user error
        raise CheckpointMismatchError(f"cannot read pretrained backbone {path}: {exc}") from exc
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"{path} holds no state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        raise CheckpointMismatchError(
            f"{path} is not a MobileNetV1-0.25 backbone: missing keys {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{'...' if len(unexpected) > 8 else ''}, wrong shapes {wrong_shape[:8]}"
        )
    backbone.load_state_dict(state)
