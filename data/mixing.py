"""Detection MixUp and CutMix on a collated batch.

Input: ``images`` (B, 3, H, W) float tensor (mean-subtracted pixels are fine: both
operations are affine per pixel) and ``targets``, a list of B tensors of shape (K_i, 15)
``[x1, y1, x2, y2, 10 landmark coords, label]`` with coordinates normalised to [0, 1]
and label 1 (face with landmarks) or -1 (face without landmarks, landmarks all -1), as
the RetinaFace MultiBox loss expects. Both functions return new tensors (inputs are not
modified) and targets of shape (K_i, 16): column 15 is a per-box loss weight (1 unless
changed below). Inputs that already have the 16th column keep and multiply it, so the
two operations can be chained.

Partners: image ``i`` is mixed with ``partner[i]``, a random cyclic permutation without
fixed points, so no image is mixed with itself (with B = 1 nothing is mixed).

MixUp (``mixup``): per image ``lam ~ Beta(alpha, alpha)``, replaced by ``max(lam, 1 - lam)``
so the primary image dominates; pixels ``lam * a + (1 - lam) * b``; the output keeps the
primary's boxes with weight ``* lam`` followed by the partner's boxes with weight
``* (1 - lam)``.

CutMix (``cutmix``): with probability ``prob`` per image, a rectangle covering a
fraction U(area_range) of the image with aspect ratio in [1/2, 2] is copied from the same
place in the partner image. Box rules (``cut_paste_targets``, ``min_visible`` = 0.5):

* a primary box is kept (weight unchanged) if at least ``min_visible`` of its area lies
  outside the rectangle; its coordinates are unchanged;
* a partner box is kept (weight unchanged) if at least ``min_visible`` of its area lies
  inside the rectangle, and is clipped to the rectangle;
* landmarks: a kept primary box keeps its landmarks only if none of the 5 points lies
  strictly inside the rectangle; a kept partner box only if all 5 points lie inside the
  rectangle (borders included). Otherwise its 10 landmark values become -1 and its label
  -1 (a face without landmarks: still a positive for the class and box losses).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

LANDMARKS = slice(4, 14)
LABEL = 14
WEIGHT = 15


def _check_batch(images: Tensor, targets: Sequence[Tensor]) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a floating (B, 3, H, W) tensor, got {shape}")
    if len(targets) != images.shape[0]:
        raise ValueError(f"got {len(targets)} target tensors for a batch of {images.shape[0]} images")
    for i, t in enumerate(targets):
        if t.dim() != 2 or t.shape[1] not in (15, 16):
            raise ValueError(f"targets[{i}] must have shape (K, 15) or (K, 16), got {tuple(t.shape)}")


def add_weight_column(targets: Sequence[Tensor]) -> List[Tensor]:
    """(K, 15) -> (K, 16) with weight 1; (K, 16) tensors are copied unchanged."""
    out = []
    for t in targets:
        if t.shape[1] == 16:
            out.append(t.clone())
        else:
            out.append(torch.cat([t, t.new_ones(t.shape[0], 1)], dim=1))
    return out


def random_partners(batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation with no fixed points (identity when batch_size == 1)."""
    order = rng.permutation(batch_size)
    partners = np.empty(batch_size, dtype=np.int64)
    partners[order] = np.roll(order, -1)
    return partners


def mixup(
    images: Tensor,
    targets: Sequence[Tensor],
    alpha: float = 0.2,
    rng: Optional[np.random.Generator] = None,
) -> Tuple[Tensor, List[Tensor]]:
    """Blend every image with a partner; keep both box sets weighted lam / 1 - lam."""
    _check_batch(images, targets)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = rng if rng is not None else np.random.default_rng()
    weighted = add_weight_column(targets)
    batch = images.shape[0]
    if batch < 2:
        return images.clone(), weighted
    partners = random_partners(batch, rng)
    lam = rng.beta(alpha, alpha, size=batch)
    lam = np.maximum(lam, 1.0 - lam)

    lam_t = torch.as_tensor(lam, dtype=images.dtype, device=images.device).view(-1, 1, 1, 1)
    mixed = lam_t * images + (1.0 - lam_t) * images[torch.as_tensor(partners, device=images.device)]
    out_targets = []
    for i in range(batch):
        own = weighted[i].clone()
        other = weighted[partners[i]].clone()
        own[:, WEIGHT] *= float(lam[i])
        other[:, WEIGHT] *= float(1.0 - lam[i])
        out_targets.append(torch.cat([own, other], dim=0))
    return mixed, out_targets


def _intersection_area(boxes: Tensor, region: Tensor) -> Tensor:
    w = (torch.minimum(boxes[:, 2], region[2]) - torch.maximum(boxes[:, 0], region[0])).clamp_min(0)
    h = (torch.minimum(boxes[:, 3], region[3]) - torch.maximum(boxes[:, 1], region[1])).clamp_min(0)
    return w * h


def _drop_landmarks(targets: Tensor, mask: Tensor) -> None:
    targets[mask, LANDMARKS] = -1.0
    targets[mask, LABEL] = -1.0


def cut_paste_targets(
    primary: Tensor,
    partner: Tensor,
    region: Sequence[float],
    min_visible: float = 0.5,
) -> Tensor:
    """Targets (K, 16) after pasting ``region`` = (x0, y0, x1, y1) (normalised) of the partner."""
    if not 0.0 < min_visible <= 1.0:
        raise ValueError(f"min_visible must be in (0, 1], got {min_visible}")
    primary, partner = add_weight_column([primary, partner])
    r = torch.as_tensor(region, dtype=primary.dtype, device=primary.device)
    if r.numel() != 4 or not (r[0] < r[2] and r[1] < r[3]):
        raise ValueError(f"region must be (x0, y0, x1, y1) with x0 < x1 and y0 < y1, got {list(region)}")

    def areas(t: Tensor) -> Tensor:
        return (t[:, 2] - t[:, 0]).clamp_min(0) * (t[:, 3] - t[:, 1]).clamp_min(0)

    def has_landmarks(t: Tensor) -> Tensor:
        return t[:, LABEL] > 0

    # Primary: kept if enough of it is still visible around the pasted rectangle.
    area = areas(primary)
    covered = _intersection_area(primary, r)
    primary = primary[(area - covered) >= min_visible * area]
    pts = primary[:, LANDMARKS].reshape(-1, 5, 2)
    strictly_inside = (pts[..., 0] > r[0]) & (pts[..., 0] < r[2]) & (pts[..., 1] > r[1]) & (pts[..., 1] < r[3])
    _drop_landmarks(primary, has_landmarks(primary) & strictly_inside.any(dim=1))

    # Partner: kept if enough of it lies inside the rectangle, then clipped to it.
    area = areas(partner)
    inside = _intersection_area(partner, r)
    partner = partner[(area > 0) & (inside >= min_visible * area)]
    partner[:, 0].clamp_(min=r[0])
    partner[:, 1].clamp_(min=r[1])
    partner[:, 2].clamp_(max=r[2])
    partner[:, 3].clamp_(max=r[3])
    pts = partner[:, LANDMARKS].reshape(-1, 5, 2)
    within = (pts[..., 0] >= r[0]) & (pts[..., 0] <= r[2]) & (pts[..., 1] >= r[1]) & (pts[..., 1] <= r[3])
    _drop_landmarks(partner, has_landmarks(partner) & ~within.all(dim=1))

    return torch.cat([primary, partner], dim=0)


def random_region(
    height: int,
    width: int,
    rng: np.random.Generator,
    area_range: Tuple[float, float] = (0.1, 0.5),
) -> Tuple[int, int, int, int]:
    """Integer pixel rectangle (x0, y0, x1, y1), x1/y1 exclusive, fully inside the image."""
    area = rng.uniform(*area_range)
    ratio = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))  # width / height, relative to the image
    w = int(np.clip(round(np.sqrt(area * ratio) * width), 1, width))
    h = int(np.clip(round(np.sqrt(area / ratio) * height), 1, height))
    x0 = int(rng.integers(0, width - w + 1))
    y0 = int(rng.integers(0, height - h + 1))
    return x0, y0, x0 + w, y0 + h


def cutmix(
    images: Tensor,
    targets: Sequence[Tensor],
    prob: float = 0.5,
    rng: Optional[np.random.Generator] = None,
    area_range: Tuple[float, float] = (0.1, 0.5),
    min_visible: float = 0.5,
) -> Tuple[Tensor, List[Tensor]]:
    """Paste a random rectangle of a partner image into each image with probability ``prob``."""
    _check_batch(images, targets)
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if not 0.0 < area_range[0] <= area_range[1] <= 1.0:
        raise ValueError(f"area_range must satisfy 0 < low <= high <= 1, got {area_range}")
    rng = rng if rng is not None else np.random.default_rng()
    original = add_weight_column(targets)
    weighted = list(original)
    batch, _, height, width = images.shape
    out = images.clone()
    if batch < 2:
        return out, weighted
    partners = random_partners(batch, rng)
    for i in range(batch):
        if rng.random() >= prob:
            continue
        j = int(partners[i])
        x0, y0, x1, y1 = random_region(height, width, rng, area_range)
        # Read from the untouched inputs so pasted content is never pasted again.
        out[i, :, y0:y1, x0:x1] = images[j, :, y0:y1, x0:x1]
        region = (x0 / width, y0 / height, x1 / width, y1 / height)
        weighted[i] = cut_paste_targets(original[i], original[j], region, min_visible)
    return out, weighted
