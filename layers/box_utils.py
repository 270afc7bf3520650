"""Box conversions, RetinaFace encode/decode and anchor-to-face matching.

Boxes are either centre form [cx, cy, w, h] (priors) or corner form [x1, y1, x2, y2]
(ground truth, decoded detections). Every encode/decode function broadcasts over leading
dimensions, so `loc` may be (N, 4) or (B, N, 4) against priors (N, 4).

Encoding (RetinaFace / SSD, variances v = (0.1, 0.2)):
  box:      t_c = (g_c - p_c) / (v0 * p_wh),   t_wh = log(g_wh / p_wh) / v1
  landmark: t_k = (g_k - p_c) / (v0 * p_wh)    for each of the 5 points
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "point_form", "center_size", "box_iou", "encode", "decode", "encode_landmarks",
    "decode_landmarks", "assign_priors", "match", "torchvision_ops",
]

NUM_LANDMARK_POINTS = 5
# RetinaFace drops a face whose best anchor overlaps it less than this (too small or too
# odd-shaped for any anchor); it then cannot be forced onto an anchor.
MIN_BEST_PRIOR_OVERLAP = 0.2
# Floor for box sides before the log in `encode`: a degenerate (zero-width) face would give
# -inf targets and a non-finite loss.
_MIN_SIDE = 1e-6

_TORCHVISION_OPS: Optional[ModuleType] = None


def torchvision_ops() -> ModuleType:
    """`torchvision.ops` (nms, box_iou, deform_conv2d, drop_block2d), imported on first use: importing
    torchvision takes seconds (it loads torch._dynamo), which `--help`, label checks and the evaluator
    do not need. Modules that call it in forward() call it once when built, so tracing and compiling
    only ever read the cached module."""
    global _TORCHVISION_OPS
    if _TORCHVISION_OPS is None:
        import torchvision.ops

        _TORCHVISION_OPS = torchvision.ops
    return _TORCHVISION_OPS


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """(N, 4) x (M, 4) corner-form boxes -> (N, M) IoU (torchvision's)."""
    return torchvision_ops().box_iou(boxes1, boxes2)


def point_form(boxes: torch.Tensor) -> torch.Tensor:
    """[cx, cy, w, h] -> [x1, y1, x2, y2]."""
    half = boxes[..., 2:] / 2
    return torch.cat([boxes[..., :2] - half, boxes[..., :2] + half], dim=-1)


def center_size(boxes: torch.Tensor) -> torch.Tensor:
    """[x1, y1, x2, y2] -> [cx, cy, w, h]."""
    return torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], dim=-1)


def encode(matched: torch.Tensor, priors: torch.Tensor, variances: Sequence[float]) -> torch.Tensor:
    """Corner-form boxes matched to each prior (..., N, 4) -> regression targets (..., N, 4)."""
    centre = (matched[..., :2] + matched[..., 2:]) / 2
    size = (matched[..., 2:] - matched[..., :2]).clamp_min(_MIN_SIDE)
    t_centre = (centre - priors[..., :2]) / (variances[0] * priors[..., 2:])
    t_size = torch.log(size / priors[..., 2:]) / variances[1]
    return torch.cat([t_centre, t_size], dim=-1)


def decode(loc: torch.Tensor, priors: torch.Tensor, variances: Sequence[float]) -> torch.Tensor:
    """Regressions (..., N, 4) against priors (N, 4) -> corner-form boxes (..., N, 4), normalised."""
    centre = priors[..., :2] + loc[..., :2] * variances[0] * priors[..., 2:]
    size = priors[..., 2:] * torch.exp(loc[..., 2:] * variances[1])
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def _points(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] != 2 * NUM_LANDMARK_POINTS:
        raise ValueError(f"landmarks must have {2 * NUM_LANDMARK_POINTS} values in the last dim, got {tuple(x.shape)}")
    return x.reshape(*x.shape[:-1], NUM_LANDMARK_POINTS, 2)


def encode_landmarks(matched: torch.Tensor, priors: torch.Tensor, variances: Sequence[float]) -> torch.Tensor:
    """Landmarks matched to each prior (..., N, 10) [x0, y0, ..., x4, y4] -> targets (..., N, 10)."""
    points = _points(matched)
    encoded = (points - priors[..., None, :2]) / (variances[0] * priors[..., None, 2:])
    return encoded.reshape(matched.shape)


def decode_landmarks(ldm: torch.Tensor, priors: torch.Tensor, variances: Sequence[float]) -> torch.Tensor:
    """Landmark regressions (..., N, 10) -> points (..., N, 10) normalised; point = p_c + t * v0 * p_wh."""
    points = priors[..., None, :2] + _points(ldm) * variances[0] * priors[..., None, 2:]
    return points.reshape(ldm.shape)


@torch.no_grad()
def assign_priors(threshold: float, truths: torch.Tensor, priors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Which face each prior regresses to, and whether it is foreground (RetinaFace rules).

    truths (K, 4) corner form, priors (N, 4) centre form -> (truth_idx (N,) long,
    foreground (N,) bool). A prior takes the face it overlaps most and is background when
    that IoU < `threshold`; every face is forced onto its best prior (winning even over a
    higher-IoU face), except faces whose best IoU < 0.2, which are ignored. With no face,
    or no face kept, every prior is background (truth_idx 0).
    """
    if truths.ndim != 2 or truths.shape[1] != 4 or priors.ndim != 2 or priors.shape[1] != 4:
        raise ValueError(f"need truths (K, 4) and priors (N, 4), got {tuple(truths.shape)} and {tuple(priors.shape)}")
    num_truths, num_priors = truths.shape[0], priors.shape[0]
    device = priors.device
    truth_idx = torch.zeros(num_priors, dtype=torch.long, device=device)
    foreground = torch.zeros(num_priors, dtype=torch.bool, device=device)
    if num_truths == 0 or num_priors == 0:
        return truth_idx, foreground

    overlaps = box_iou(truths.to(device=device, dtype=priors.dtype), point_form(priors))  # (K, N)
    best_prior_overlap, best_prior_idx = overlaps.max(dim=1)  # (K,)
    valid = best_prior_overlap >= MIN_BEST_PRIOR_OVERLAP
    if not bool(valid.any()):
        return truth_idx, foreground

    best_truth_overlap, truth_idx = overlaps.max(dim=0)  # (N,)
    # Force each kept face onto its best prior. When two faces share a best prior the later
    # face wins (RetinaFace's loop order); scatter "amax" does that deterministically.
    forced = torch.full((num_priors,), -1, dtype=torch.long, device=device)
    truth_ids = torch.arange(num_truths, device=device)
    forced.scatter_reduce_(0, best_prior_idx[valid], truth_ids[valid], reduce="amax")
    is_forced = forced >= 0
    truth_idx = torch.where(is_forced, forced, truth_idx)
    foreground = is_forced | (best_truth_overlap >= threshold)
    return truth_idx, foreground


@torch.no_grad()
def match(threshold: float, truths: torch.Tensor, priors: torch.Tensor, variances: Sequence[float],
          labels: torch.Tensor, landmarks: torch.Tensor, weights: Optional[torch.Tensor] = None
          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets for the priors of one image (what MultiBoxLoss trains on).

    truths (K, 4) corner form, priors (N, 4) centre form, labels (K,) (1 = face with
    landmarks, -1 = face without), landmarks (K, 10), optional per-face weights (K,).
    Returns (loc_t (N, 4), conf_t (N,) long, landm_t (N, 10), weight_t (N,)): encoded box and
    landmarks of each prior's face (see `assign_priors`) and its label, 0 for background
    priors; weight_t is the face's weight on foreground priors and 1 elsewhere.
    """
    num_truths = truths.shape[0] if truths.ndim == 2 else -1
    if labels.shape != (num_truths,) or landmarks.shape != (num_truths, 2 * NUM_LANDMARK_POINTS):
        raise ValueError(f"match needs truths (K, 4), labels (K,) and landmarks (K, 10), got "
                         f"{tuple(truths.shape)}, {tuple(labels.shape)} and {tuple(landmarks.shape)}")
    if weights is not None and weights.shape != (num_truths,):
        raise ValueError(f"weights must be (K,) = ({num_truths},), got {tuple(weights.shape)}")
    truth_idx, foreground = assign_priors(threshold, truths, priors)
    weight_t = priors.new_ones(priors.shape[0])
    if not bool(foreground.any()):  # no face, or every face ignored: all background
        zeros = priors.new_zeros
        return (zeros(priors.shape[0], 4), torch.zeros_like(truth_idx), zeros(priors.shape[0], 2 * NUM_LANDMARK_POINTS),
                weight_t)
    device, dtype = priors.device, priors.dtype
    conf_t = labels.to(device)[truth_idx].round().long() * foreground
    loc_t = encode(truths.to(device=device, dtype=dtype)[truth_idx], priors, variances)
    landm_t = encode_landmarks(landmarks.to(device=device, dtype=dtype)[truth_idx], priors, variances)
    if weights is not None:
        weight_t = torch.where(foreground, weights.to(device=device, dtype=dtype)[truth_idx], weight_t)
    return loc_t, conf_t, landm_t, weight_t
