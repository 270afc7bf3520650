"""Anchor (prior) boxes, in the order the detection heads flatten their outputs.

Order (docs/ARCHITECTURE.md §1.2, "Anchor (prior) order"): level k (stride 8, 16, 32) -> row i
-> column j -> min_size m; each prior is [cx, cy, w, h] normalised by the input size:
[(j + 0.5) * s / W, (i + 0.5) * s / H, m / W, m / H]. A head output (B, A*k, H_k, W_k)
permuted to NHWC and reshaped to (B, H_k*W_k*A, k), levels concatenated P3, P4, P5, lines
up with this tensor row for row.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import torch

from data.config import ModelConfig

# Defaults are the model config's (the one home of anchor settings).
DEFAULT_MIN_SIZES: Tuple[Tuple[int, ...], ...] = ModelConfig.min_sizes
DEFAULT_STEPS: Tuple[int, ...] = ModelConfig.steps


def _check_image_size(image_size: Sequence[int]) -> Tuple[int, int]:
    if len(image_size) != 2 or any(int(v) != v or v <= 0 for v in image_size):
        raise ValueError(f"image_size must be (H, W) with positive integers, got {tuple(image_size)}")
    return int(image_size[0]), int(image_size[1])


def _check_levels(min_sizes: Sequence[Sequence[int]], steps: Sequence[int]) -> None:
    if len(min_sizes) != len(steps):
        raise ValueError(f"min_sizes has {len(min_sizes)} levels but steps has {len(steps)}")


def num_priors(image_size: Sequence[int], min_sizes: Sequence[Sequence[int]] = DEFAULT_MIN_SIZES,
               steps: Sequence[int] = DEFAULT_STEPS) -> int:
    """Number of priors for an input of `image_size` (H, W), without building them."""
    height, width = _check_image_size(image_size)
    _check_levels(min_sizes, steps)
    return sum(math.ceil(height / s) * math.ceil(width / s) * len(m) for s, m in zip(steps, min_sizes))


def prior_boxes(image_size: Sequence[int], min_sizes: Sequence[Sequence[int]] = DEFAULT_MIN_SIZES,
                steps: Sequence[int] = DEFAULT_STEPS, clip: bool = False) -> torch.Tensor:
    """Priors for an input of `image_size` (H, W) -> float32 (N, 4) [cx, cy, w, h] normalised."""
    height, width = _check_image_size(image_size)
    _check_levels(min_sizes, steps)
    levels = []
    for step, sizes in zip(steps, min_sizes):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        # float64 then one cast, so values equal the reference's Python-float arithmetic.
        cy = (torch.arange(rows, dtype=torch.float64) + 0.5) * step / height
        cx = (torch.arange(cols, dtype=torch.float64) + 0.5) * step / width
        grid_y, grid_x = torch.meshgrid(cy, cx, indexing="ij")  # (rows, cols)
        sizes_t = torch.as_tensor(sizes, dtype=torch.float64)
        shape = (rows, cols, len(sizes))
        level = torch.stack([
            grid_x[:, :, None].expand(shape),
            grid_y[:, :, None].expand(shape),
            (sizes_t / width).expand(shape),
            (sizes_t / height).expand(shape),
        ], dim=-1)  # (rows, cols, A, 4): row -> col -> min_size when flattened
        levels.append(level.reshape(-1, 4))
    priors = torch.cat(levels).to(torch.float32)
    if clip:
        priors.clamp_(0.0, 1.0)
    return priors


@functools.lru_cache(maxsize=32)
def _cached(height: int, width: int, min_sizes: Tuple[Tuple[int, ...], ...], steps: Tuple[int, ...],
            clip: bool) -> torch.Tensor:
    return prior_boxes((height, width), min_sizes, steps, clip)


def cached_prior_boxes(image_size: Sequence[int], min_sizes: Sequence[Sequence[int]] = DEFAULT_MIN_SIZES,
                       steps: Sequence[int] = DEFAULT_STEPS, clip: bool = False,
                       device: Optional[torch.device | str] = None) -> torch.Tensor:
    """`prior_boxes` memoised by (H, W, min_sizes, steps, clip).

    Returns a fresh copy (on `device`, default CPU), so callers may modify it freely; the
    copy costs far less than rebuilding the priors for every batch of an evaluation loop.
    """
    height, width = _check_image_size(image_size)
    key_sizes = tuple(tuple(int(v) for v in m) for m in min_sizes)
    key_steps = tuple(int(s) for s in steps)
    priors = _cached(height, width, key_sizes, key_steps, bool(clip))
    return priors.to(device=device if device is not None else priors.device, copy=True)


def prior_boxes_for(config: ModelConfig, image_size: Sequence[int],
                    device: Optional[torch.device | str] = None) -> torch.Tensor:
    """Priors for `config`'s anchor settings at `image_size` (H, W); a fresh (N, 4) copy."""
    return cached_prior_boxes(image_size, config.min_sizes, config.steps, device=device)
