"""Per-level 1x1 prediction heads (class / box / five landmarks), not shared across levels."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class LevelHeads(nn.Module):
    """One 1x1 conv per pyramid level predicting `values_per_anchor` numbers per anchor.

    forward(list of (B, C, H_l, W_l)) -> (B, sum_l H_l*W_l*A, values_per_anchor), flattened
    NHWC so the order is (level, row, col, anchor), matching the prior boxes
    (docs/ARCHITECTURE.md §1.2).
    """

    def __init__(self, channels: int, num_anchors: int, values_per_anchor: int, num_levels: int = 3) -> None:
        super().__init__()
        self.values_per_anchor = values_per_anchor
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, num_anchors * values_per_anchor, 1) for _ in range(num_levels)
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        k = self.values_per_anchor
        # (B, A*k, H, W) -> (B, H, W, A*k) -> (B, H*W*A, k). Unflattening dim 1 infers H*W*A from that
        # dim alone, so an empty batch works (reshape(B, -1, k) cannot infer -1 from 0 elements).
        outs = [conv(f).permute(0, 2, 3, 1).flatten(1).unflatten(1, (-1, k)) for conv, f in zip(self.convs, feats)]
        return torch.cat(outs, dim=1)
